"""webdataset backend: one deterministic tar per store shard, `shard-XXXXXX.tar`.

Each valid row r is a sample with `__key__` = f"{r:09d}" and members
`<key>.latents.npy`, `<key>.feat.<m>.npy` (+ `<key>.scale.<m>.npy` for int8),
`<key>.clstoken.<m>.npy`, `<key>.cls` (label as text), `<key>.key.txt`, and the same with a
`flip.` prefix for the flipped view (`<key>.flip.latents.npy`, ...). `<m>` is the encoder's
member-safe name from manifest `encoders[name].member`. Pixel stores add `<key>.pixels.npy`
(uint8 [3, H, W], pixel codec "none") or `<key>.pixels.png` (the same crop as an RGB PNG, codec
"png", which webdataset's own decoders read; decoded here with Pillow); never a flipped copy.
Skipped rows are not written. Headers
are fixed (mtime 0, uid/gid 0, mode 0644, no user names) and members sorted, so a shard's bytes
depend only on its content. Plain `tarfile` reads the shards, and so does webdataset.

Local shard files are read by `iter_local`, a parser of the tar headers (ustar, pax `x`/`g`, GNU
long names; checksums checked, truncation refused) plus `os.preadv` at the known offsets; npy
payloads become `np.frombuffer` views after `numpy.lib.format` parses their header (no pickle).
Eager, it reads each sample with one read; lazy, it reads only headers and returns `NpyRef`s that
the loader reads straight into its batch (and the kernel is asked to read ahead of the pass).
`iter_tar` (plain `tarfile`) is the reference it is tested against; `iter_urls` streams anything
webdataset's `gopen` opens (`pipe:`, http...). All three group members into samples with the one
grouper `members.group_members`.

Checksums (format version 2): each sample has one more member, `<key>.crc32c.json`, holding the
crc32c (8 hex digits) of every other member's bytes, e.g. `{"cls": "1c291ca3", ...}`. It travels
inside the shard, so a `pipe:` or http stream needs no second file, and plain tar/webdataset
readers just see one more small member (1 KiB per sample with its header). `sample_sums` and
`check_members` check it before the reader hands out a sample (eager reads, `pipe:` streams, random access); lazy
members (`NpyRef`) carry their expected crc32c and check it when their payload is read, before
the loader puts it in a batch. Format version 1 shards have no such member; only their tar
header checksums are checked.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from numpy.lib import format as fmt

from ..checksum import crc32c
from ..errors import DamagedData, StoreError
from ..layout import StoreLayout, dequantize_int8
from ..manifest import FORMAT_VERSION, PARTIAL_SUFFIX, atomic_open, sha256_file
from .base import Backend
from .members import group_members, member_key

CRC_SUFFIX = "crc32c.json"

KEY_WIDTH = 9


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def sample_key(row: int) -> str:
    return f"{row:0{KEY_WIDTH}d}"


PNG_LEVEL = 6  # zlib level of pixel PNGs (Pillow's default); fixed, so a shard's bytes are reproducible


def member_suffix(array_name: str, members: dict[str, str], pixel_codec: str = "none") -> str:
    """Tar member suffix of a logical array name ("flip/features/enc" -> "flip.feat.<m>.npy")."""
    if array_name == "pixels":
        return "pixels.png" if pixel_codec == "png" else "pixels.npy"
    prefix = ""
    name = array_name
    if name.startswith("flip/"):
        prefix, name = "flip.", name[len("flip/"):]
    if name == "latents":
        return prefix + "latents.npy"
    if name == "labels":
        return prefix + "cls"
    if name == "keys":
        return prefix + "key.txt"
    kind, _, enc = name.partition("/")
    tag = {"features": "feat", "feature_scales": "scale", "cls": "clstoken"}.get(kind)
    if tag is None or enc not in members:
        raise StoreError(f"no webdataset member name for array {array_name!r}")
    return f"{prefix}{tag}.{members[enc]}.npy"


def png_bytes(chw: np.ndarray) -> bytes:
    """An RGB PNG of uint8 pixels [3, H, W] (Pillow, zlib level PNG_LEVEL, no metadata chunks)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.asarray(chw, dtype=np.uint8).transpose(1, 2, 0)), "RGB").save(
        buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def decode_png(data: Any, shape: tuple[int, ...], where: str, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [3, H, W] pixels of a PNG member (into `out` when given); DamagedData naming `where`
    when it is not an RGB PNG of that size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data)), formats=["PNG"]) as im:
            if im.mode != "RGB" or im.size != (shape[2], shape[1]):
                raise ValueError(f"{im.mode} {im.size[0]}x{im.size[1]}, expected RGB {shape[2]}x{shape[1]}")
            hwc = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds
        raise DamagedData(f"{where}: not a readable pixel PNG ({type(e).__name__}: {e})") from None
    if out is None:
        return np.ascontiguousarray(hwc.transpose(2, 0, 1))
    out[...] = hwc.transpose(2, 0, 1)
    return out


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def clean_shard(root: Path, shard: int) -> None:
    f = root / shard_name(shard)
    for p in root.glob(f"{f.name}.*{PARTIAL_SUFFIX}"):
        p.unlink(missing_ok=True)
    f.unlink(missing_ok=True)


def crc_member(members: dict[str, bytes]) -> bytes:
    """The `<key>.crc32c.json` bytes of a sample's members ({suffix: bytes}): sorted, compact."""
    sums = {suffix: f"{crc32c(b):08x}" for suffix, b in sorted(members.items())}
    return json.dumps(sums, sort_keys=True, separators=(",", ":")).encode("ascii")


def write_shard(root: Path, shard: int, rows: range, data: dict[str, np.ndarray],
                valid: np.ndarray, members: dict[str, str], format_version: int = FORMAT_VERSION,
                pixel_codec: str = "none") -> dict[str, str]:
    """Write the shard's valid rows as one tar (temp name, fsync, rename); return {name: sha256}.

    format_version >= 2 adds each sample's `<key>.crc32c.json` member."""
    clean_shard(root, shard)
    final = root / shard_name(shard)
    tmp = final.with_name(f"{final.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    suffixes = {name: member_suffix(name, members, pixel_codec) for name in data}
    with atomic_open(final, tmp=tmp) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i, row in enumerate(rows):
                if not valid[i]:
                    continue
                key = sample_key(row)
                sample: dict[str, bytes] = {}
                for name in data:
                    v = data[name][i]
                    if name == "labels":
                        b = str(int(v)).encode("ascii")
                    elif name == "keys":
                        b = str(v).encode("utf-8")
                    elif name == "pixels" and pixel_codec == "png":
                        b = png_bytes(v)
                    else:
                        b = _npy_bytes(v)
                    sample[suffixes[name]] = b
                if format_version >= 2:
                    sample[CRC_SUFFIX] = crc_member(sample)
                for suffix in sorted(sample):
                    b = sample[suffix]
                    tar.addfile(_tarinfo(f"{key}.{suffix}", len(b)), io.BytesIO(b))
    return {final.name: sha256_file(final)}


def _row_of(key: str) -> str:
    return f" (row {int(key)})" if key.isdigit() else ""


def sample_sums(key: str, raw: dict[str, Any], where: str) -> dict[str, int]:
    """The crc32c of every member of a sample, from its `<key>.crc32c.json`, after checking that it
    covers exactly the sample's other members. Raises DamagedData naming the member and row."""
    at = f"{where} sample {key}{_row_of(key)}"
    sums_raw = raw.get(CRC_SUFFIX)
    if sums_raw is None:
        raise DamagedData(f"{at}: member '{key}.{CRC_SUFFIX}' (the sample's checksums) is missing")
    try:
        sums = {str(k): int(v, 16) for k, v in json.loads(bytes(sums_raw).decode("ascii")).items()}
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise DamagedData(f"{at}: member '{key}.{CRC_SUFFIX}' is unreadable ({e}): the file is damaged") from None
    names = set(raw) - {CRC_SUFFIX}
    missing = sorted(set(sums) - names)
    if missing:
        raise DamagedData(f"{at}: member '{key}.{missing[0]}' is missing")
    extra = sorted(names - set(sums))
    if extra:
        raise DamagedData(f"{at}: member '{key}.{extra[0]}' is not covered by the sample's checksums "
                          f"('{key}.{CRC_SUFFIX}'): the file is damaged or was edited")
    return sums


def check_members(key: str, raw: dict[str, Any], sums: dict[str, int], where: str) -> None:
    """Check the crc32c of every member given as bytes or a uint8 array (`NpyRef`s check their own
    when read: give them `ref.expect(sums[suffix])`). Raises DamagedData naming member and row."""
    for suffix in sorted(raw):
        v = raw[suffix]
        if suffix == CRC_SUFFIX or isinstance(v, LazyArray):
            continue
        have = crc32c(v if isinstance(v, (bytes, np.ndarray)) else bytes(v))
        want = sums[suffix]
        if have != want:
            raise DamagedData(f"{where} sample {key}{_row_of(key)}: member '{key}.{suffix}': crc32c mismatch "
                              f"(stored {want:08x}, computed {have:08x}): the file is damaged")


def iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a local shard, read sequentially with tarfile (the reference reader)."""
    if not path.exists():
        raise DamagedData(f"shard file {path} is missing")

    def entries():
        try:
            with tarfile.open(path, mode="r|") as tar:
                for ti in tar:
                    if not ti.isreg():
                        continue
                    f = tar.extractfile(ti)
                    yield ti.name, f.read() if f is not None else b""
        except tarfile.TarError as e:
            raise DamagedData(f"shard file {path} is not a readable tar ({e})") from e

    return group_members(entries(), f"shard file {path}")


# ----------------------------------------------------------------------------- fast local reads

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_FIRST_READ = 1 << 16           # bytes read ahead for a shard's first sample (size not yet known)
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: size is not skipped
_FS_ENCODING = "utf-8"


def _pread(fd: int, off: int, n: int, path: Path) -> np.ndarray:
    """n bytes at off into a fresh writable uint8 buffer."""
    buf = np.empty(n, dtype=np.uint8)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], off + got)
        if k <= 0:
            raise DamagedData(f"shard file {path}: could not read bytes [{off}, {off + n}) (file shrank while reading?)")
        got += k
    return buf


class _Window:
    """Reads of one file served from the last buffer read when they fall inside it.

    read_through (the lazy pass, which reads headers only): a read that misses the page cache
    first reads the next `_READ_THROUGH` bytes of the file in one sequential read, so that a
    cold shard is fetched like a plain read (not header page by header page) and the payloads
    the loader reads later are cached. Warm reads cost nothing extra: the cache is probed with
    `preadv(..., RWF_NOWAIT)`, which fails instead of waiting for the disk.
    """

    def __init__(self, fd: int, path: Path, read_through: bool = False):
        self.fd, self.path = fd, path
        self.size = os.fstat(fd).st_size
        self.buf: np.ndarray | None = None
        self.off = 0
        self.read_through = read_through and hasattr(os, "RWF_NOWAIT")
        self.fetched = 0  # read through up to here

    def get(self, off: int, n: int, ahead: int = 0) -> np.ndarray:
        """View of bytes [off, off + n); a miss reads max(n, ahead) bytes (up to the file's end)."""
        b = self.buf
        if b is not None and self.off <= off and off + n <= self.off + len(b):
            return b[off - self.off:off - self.off + n]
        self.restart(off, max(n, ahead))
        return self.buf[:n]

    def restart(self, off: int, n: int) -> None:
        """Read a fresh buffer of n bytes at off (fewer at the file's end)."""
        n = max(0, min(n, self.size - off))
        if self.read_through and off + n > self.fetched:
            buf = np.empty(n, dtype=np.uint8)
            try:
                got = os.preadv(self.fd, [buf], off, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError:  # the file system cannot tell: plain reads from now on
                got, self.read_through = 0, False
            if got == n:
                self.buf, self.off = buf, off
                return
            if self.read_through:
                end = min(self.size, off + max(n, _READ_THROUGH))
                _pread(self.fd, off, end - off, self.path)
                self.fetched = end
        self.buf = _pread(self.fd, off, n, self.path)
        self.off = off


def _nts(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(_FS_ENCODING, "surrogateescape")


def _nti(b: bytes) -> int:
    """A tar number field: octal text, or GNU base-256 for large values."""
    if b[0] in (0o200, 0o377):
        n = int.from_bytes(b[1:], "big")
        return n - 256 ** (len(b) - 1) if b[0] == 0o377 else n
    return int(b.split(b"\0", 1)[0].strip() or b"0", 8)


def _checksum_ok(v: np.ndarray, h: bytes) -> bool:
    """The header's checksum field matches the sum of its bytes (field as spaces), unsigned or
    signed as tarfile accepts."""
    try:
        want = _nti(h[148:156])
    except ValueError:
        return False
    field = 8 * 32  # the checksum field counts as 8 spaces
    if want == int(np.add.reduce(v, dtype=np.int64)) - sum(h[148:156]) + field:
        return True
    signed = v.view(np.int8)
    return want == int(signed.sum(dtype=np.int64)) - int(signed[148:156].sum(dtype=np.int64)) + field


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """Records of a pax extended header ("<len> <key>=<value>\\n" each)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise DamagedData(f"{where}: malformed pax header record at byte {pos}") from None
        rec = data[sp + 1:pos + length]
        if length <= 0 or not rec.endswith(b"\n") or b"=" not in rec:
            raise DamagedData(f"{where}: malformed pax header record at byte {pos}")
        k, _, v = rec[:-1].partition(b"=")
        out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_entries(win: _Window, ahead: int = 0) -> Iterator[tuple[str, int, int, int]]:
    """(name, first header offset, data offset, size) of each regular member, in archive order.

    Header reads go through `win` (ahead: bytes to read on a miss). Checks what tarfile checks
    (header checksums) and more: members must lie inside the file and the archive must end with
    its end-of-archive block, so a truncated shard is refused instead of read short.
    """
    path = win.path
    off, start = 0, None
    long_name: str | None = None
    pax: dict[str, str] = {}
    last = "the start of the archive"
    while True:
        if off + BLOCK > win.size:
            raise DamagedData(f"shard file {path}: ends at byte {win.size}, inside or right after member {last}, "
                             "without the tar end-of-archive block (truncated?)")
        v = win.get(off, BLOCK, ahead)
        h = bytes(v)
        if h == _ZERO_BLOCK:
            if start is not None:
                raise DamagedData(f"shard file {path}: extended header at byte {start} is followed by the end "
                                 "of the archive")
            return
        if not _checksum_ok(v, h):
            raise DamagedData(f"shard file {path}: bad tar header checksum at byte {off} (after member {last}); "
                             "the file is corrupt")
        typ = h[156:157]
        try:
            size = _nti(h[124:136])
        except ValueError:
            raise DamagedData(f"shard file {path}: unreadable size field in the tar header at byte {off}") from None
        if start is None:
            start = off
        data = off + BLOCK
        if typ in (b"x", b"g", b"L", b"K"):  # metadata for the next header
            if data + size > win.size:
                raise DamagedData(f"shard file {path}: extended header at byte {off} runs past the end of the file "
                                 "(truncated?)")
            payload = bytes(win.get(data, size, ahead))
            if typ == b"x":
                pax.update(_pax_records(payload, f"shard file {path}: pax header at byte {off}"))
            elif typ == b"L":
                long_name = _nts(payload)
            off = data + -(-size // BLOCK) * BLOCK
            continue
        name = _nts(h[0:100])
        if h[345] != 0:  # ustar prefix
            name = _nts(h[345:500]) + "/" + name
        if long_name is not None:
            name = long_name
        if pax:
            name = pax.get("path", name)
            if "size" in pax:
                size = int(pax["size"])
            if any(k.startswith("GNU.sparse") for k in pax):
                typ = b"S"
        if typ == b"S":
            raise DamagedData(f"shard file {path}: member {name!r} is a sparse file, which irepa shards never hold")
        if typ == b"\0" and name.endswith("/"):
            typ = b"5"
        if typ in _NO_DATA:
            off = data
        else:
            if data + size > win.size:
                raise DamagedData(f"shard file {path}: member {name!r} needs bytes [{data}, {data + size}) but the "
                                 f"file has {win.size} bytes (truncated?)")
            if typ in _REGULAR:
                yield name, start, data, size
            off = data + -(-size // BLOCK) * BLOCK
        last = repr(name)
        start = long_name = None
        if pax:
            pax = {}


# ----------------------------------------------------------------------------- lazy arrays


class LazyArray:
    """An array of a local shard not read yet: `read()` returns it (what the eager reader
    returns, dtype `dtype`), `read_into(out)` writes it into `out` (any dtype, numpy casting):
    the loader reads each member straight into its batch, and only the view it uses."""

    shape: tuple[int, ...]
    dtype: np.dtype
    where: str

    def read(self) -> np.ndarray:
        raise NotImplementedError

    def read_into(self, out: np.ndarray) -> None:
        out[...] = self.read()

    def astype(self, dtype: Any, copy: bool = True) -> "LazyArray":
        raise NotImplementedError


_FDS: dict[tuple[str, tuple[int, int]], int] = {}
_FDS_PID = os.getpid()
_FDS_MAX = 64
_FDS_LOCK = threading.Lock()


def _shard_fd(path: Path, ident: tuple[int, int]) -> int:
    """An open descriptor of a shard file (kept, up to _FDS_MAX per process), refusing a file
    that was replaced since it was indexed (`ident`: st_dev, st_ino)."""
    global _FDS_PID
    key = (str(path), ident)
    with _FDS_LOCK:
        if _FDS_PID != os.getpid():  # a forked DataLoader worker: its own descriptors
            for fd in _FDS.values():
                os.close(fd)
            _FDS.clear()
            _FDS_PID = os.getpid()
        fd = _FDS.get(key)
        if fd is not None:
            return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DamagedData(f"shard file {path} disappeared after it was indexed") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ident:
            os.close(fd)
            raise DamagedData(f"shard file {path} was replaced after it was indexed; restart the reader")
        if len(_FDS) >= _FDS_MAX:
            os.close(_FDS.pop(next(iter(_FDS))))
        _FDS[key] = fd
        return fd


@dataclass(frozen=True)
class NpyRef(LazyArray):
    """An .npy member of a local shard: its payload's offset, shape and stored dtype."""

    path: Path
    ident: tuple[int, int]
    offset: int
    shape: tuple[int, ...]
    stored: np.dtype
    fortran: bool
    member: str
    as_dtype: np.dtype | None = None  # what read() returns (default: the stored dtype)
    head_crc: int = 0                 # crc32c of the member's .npy header bytes
    crc: int | None = None            # expected crc32c of the whole member (None: not checked)

    @property
    def dtype(self) -> np.dtype:
        return self.stored if self.as_dtype is None else self.as_dtype

    @property
    def where(self) -> str:
        return f"shard file {self.path} member {self.member!r}{_row_of(self.member.split('.', 1)[0])}"

    def expect(self, crc: int) -> "NpyRef":
        """This reference, checking that the member's bytes have crc32c `crc` when read."""
        ref = object.__new__(NpyRef)  # dataclasses.replace costs ~30 us, a copy of the fields ~1 us
        ref.__dict__.update(self.__dict__)
        ref.__dict__["crc"] = crc
        return ref

    def _raw(self, out: np.ndarray) -> None:
        flat = out.reshape(-1).view(np.uint8)
        fd = _shard_fd(self.path, self.ident)
        view, got, n = memoryview(flat), 0, flat.nbytes
        while got < n:
            k = os.preadv(fd, [view[got:]], self.offset + got)
            if k <= 0:
                raise DamagedData(f"{self.where}: could not read its {n} bytes at byte {self.offset} (file shrank?)")
            got += k
        if self.crc is not None:

            have = crc32c(flat, self.head_crc)
            if have != self.crc:
                raise DamagedData(f"{self.where}: crc32c mismatch (stored {self.crc:08x}, computed {have:08x}): "
                                  "the file is damaged")

    def _stored(self) -> np.ndarray:
        a = np.empty(self.shape[::-1] if self.fortran else self.shape, self.stored)
        self._raw(a)
        return a.T if self.fortran else a

    def read(self) -> np.ndarray:
        a = self._stored()
        return a if self.as_dtype is None else a.astype(self.as_dtype, copy=False)

    def read_into(self, out: np.ndarray) -> None:
        if out.shape != self.shape:
            raise StoreError(f"{self.where}: shape {self.shape}, expected {out.shape}")
        if out.dtype == self.stored and not self.fortran and out.flags.c_contiguous:
            self._raw(out)
        else:
            out[...] = self._stored()

    def astype(self, dtype: Any, copy: bool = True) -> "NpyRef":
        dtype = np.dtype(dtype)
        return self if dtype == self.dtype else replace(self, as_dtype=dtype)


@dataclass(frozen=True)
class PngPixels(LazyArray):
    """A sample's pixel PNG (its bytes already read and checked), decoded to uint8 [3, H, W] when
    read: the shuffle buffer holds the compressed bytes, the batch gets the pixels."""

    data: bytes
    shape: tuple[int, ...]
    where: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def read(self) -> np.ndarray:
        return decode_png(self.data, self.shape, self.where)

    def read_into(self, out: np.ndarray) -> None:
        if out.shape != self.shape:
            raise StoreError(f"{self.where}: shape {self.shape}, expected {out.shape}")
        decode_png(self.data, self.shape, self.where, out)

    def astype(self, dtype: Any, copy: bool = True) -> "PngPixels":
        if np.dtype(dtype) != np.uint8:
            raise StoreError(f"{self.where}: pixels are uint8; got a request for {np.dtype(dtype)}")
        return self


@dataclass(frozen=True)
class Dequantized(LazyArray):
    """int8 tokens and their per-token scales, dequantised when read."""

    q: NpyRef
    s: NpyRef
    as_dtype: np.dtype | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.as_dtype is None else self.as_dtype

    @property
    def where(self) -> str:
        return self.q.where

    def read(self) -> np.ndarray:
        f = dequantize_int8(self.q._stored(), self.s._stored())
        return f if self.as_dtype is None else f.astype(self.as_dtype, copy=False)

    def read_into(self, out: np.ndarray) -> None:
        if out.shape != self.shape:
            raise StoreError(f"{self.where}: shape {self.shape}, expected {out.shape}")
        out[...] = dequantize_int8(self.q._stored(), self.s._stored())

    def astype(self, dtype: Any, copy: bool = True) -> "Dequantized":
        dtype = np.dtype(dtype)
        return self if dtype == self.dtype else replace(self, as_dtype=dtype)


# ----------------------------------------------------------------------------- local shard iteration

_LAZY_AHEAD = 1 << 12    # header reads of the lazy pass: a header, the next member's npy header...
_READ_THROUGH = 8 << 20  # lazy pass on a cold file: bytes fetched into the page cache per miss


def _npy_ref(win: _Window, ident: tuple[int, int], name: str, data: int, size: int) -> NpyRef:
    where = f"shard file {win.path} member {name!r}"
    try:
        head = bytes(win.get(data, min(size, 12), _LAZY_AHEAD))
        hlen = _npy_header_len(head, size)
        header = bytes(win.get(data, hlen, _LAZY_AHEAD))
        shape, fortran, dtype, need = _npy_header(header)
        if size - hlen != need:
            raise ValueError(f"payload has {size - hlen} bytes, the header's {dtype} {shape} needs {need}")
        head_crc = crc32c(header)
    except StoreError:
        raise
    except Exception as e:
        raise DamagedData(f"{where}: not a readable .npy member ({e})") from e
    return NpyRef(win.path, ident, data + hlen, tuple(shape), dtype, bool(fortran), name, head_crc=head_crc)


def iter_local(path: Path, lazy: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Samples of a local shard file as (key, {suffix: member}).

    Eager (default): members are uint8 views of one buffer per sample, read with one `preadv`
    whose size is the previous sample's span (a shard of same-sized samples: one read each).
    lazy: npy members are `NpyRef`s (headers read and checked, payloads not), other members
    bytes; a cold file is read through to the page cache as the pass goes (see `_Window`), so
    the payload reads that follow hit the cache. Checksums are the reader's (`sample_sums` / `check_members`).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DamagedData(f"shard file {path} is missing") from None
    try:
        win = _Window(fd, path, read_through=lazy)
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        at = {"key": None, "first": 0, "guess": _FIRST_READ}

        def entries() -> Iterator[tuple[str, Any]]:
            for name, hdr, data, size in _tar_entries(win, ahead=_LAZY_AHEAD if lazy else _FIRST_READ):
                key = member_key(name)
                if key is not None and key != at["key"]:  # a new sample starts at this header
                    if at["key"] is not None:
                        at["guess"] = hdr - at["first"] + BLOCK  # the last sample's span and the next header
                    at["key"], at["first"] = key, hdr
                    if not lazy:
                        win.restart(hdr, at["guess"])
                if not lazy:
                    yield name, win.get(data, size, ahead=size + BLOCK)
                elif name.endswith(".npy"):
                    yield name, _npy_ref(win, ident, name, data, size)
                else:
                    yield name, bytes(win.get(data, size, _LAZY_AHEAD))

        yield from group_members(entries(), f"shard file {path}", error=DamagedData)
    finally:
        os.close(fd)


def tar_index(path: Path) -> dict[str, tuple[int, int, list[tuple[str, int, int]]]]:
    """{key: (span start, span end, [(suffix, data offset, size)])} of a local shard (headers only)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DamagedData(f"shard file {path} is missing") from None
    try:
        entries = ((name, (hdr, data, size)) for name, hdr, data, size in _tar_entries(_Window(fd, path)))
        out: dict[str, tuple[int, int, list[tuple[str, int, int]]]] = {}
        for key, members in group_members(entries, f"shard file {path}", error=DamagedData):
            spans = list(members.values())
            out[key] = (min(h for h, _, _ in spans), max(d + n for _, d, n in spans),
                        [(suffix, d, n) for suffix, (_, d, n) in members.items()])
        return out
    finally:
        os.close(fd)


def read_indexed(path: Path, entry: tuple[int, int, list[tuple[str, int, int]]]) -> dict[str, np.ndarray]:
    """One sample of `tar_index`, read with one `preadv`: {suffix: uint8 view}."""
    start, end, members = entry
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DamagedData(f"shard file {path} is missing") from None
    try:
        buf = _pread(fd, start, end - start, path)
    finally:
        os.close(fd)
    return {suffix: buf[d - start:d - start + n] for suffix, d, n in members}


def is_local_url(url: str) -> str | None:
    """The file path of a webdataset URL that names a local file (plain path or file:), else None."""
    if url.startswith("file:"):
        url = url[len("file:"):]
    elif ":" in url.split("/", 1)[0] and not os.path.exists(url):  # pipe:, http:, s3:, ...
        return None
    return url if os.path.isfile(url) else None


def iter_urls(urls: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of shards given as webdataset URLs (local paths, `pipe:` commands, http...),
    opened with webdataset's `gopen` and read as a tar stream."""
    from webdataset.gopen import gopen  # imports torch: keep it lazy

    for u in urls:
        where = f"webdataset stream {u}"
        try:
            stream = gopen(u, "rb")
        except Exception as e:
            raise StoreError(f"{where}: cannot be opened ({type(e).__name__}: {e})") from None

        def entries(stream=stream, where=where) -> Iterator[tuple[str, bytes]]:
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for ti in tar:
                        if ti.isreg():
                            f = tar.extractfile(ti)
                            yield ti.name, f.read() if f is not None else b""
            except tarfile.TarError as e:
                raise DamagedData(f"{where} is not a readable tar ({e})") from None

        try:
            yield from group_members(entries(), where, error=DamagedData)
        finally:
            try:
                stream.close()
            except Exception as e:  # a `pipe:` command that failed
                raise StoreError(f"{where}: {type(e).__name__}: {e}") from None


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}  # a store repeats a few


def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, payload bytes) of a whole .npy header (magic included),
    parsed by numpy.lib.format and remembered."""
    got = _NPY_HEADERS.get(head)
    if got is None:
        fp = io.BytesIO(head)
        major, _ = fmt.read_magic(fp)
        shape, fortran, dtype = fmt.read_array_header_1_0(fp) if major == 1 else fmt.read_array_header_2_0(fp)
        if dtype.hasobject:
            raise ValueError("object arrays need pickle, which irepa never reads")
        got = (shape, fortran, dtype, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        if len(_NPY_HEADERS) >= 4096:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[head] = got
    return got


def _npy_header_len(head: bytes, size: int) -> int:
    """Bytes of the .npy header (magic included) from the member's first 12 bytes."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise ValueError("no .npy magic string")
    major = head[6]
    if major not in (1, 2):
        raise ValueError(f".npy format version {major}.{head[7]} (irepa writes 1.0)")
    hlen = 10 + int.from_bytes(head[8:10], "little") if major == 1 else 12 + int.from_bytes(head[8:12], "little")
    if hlen > size:
        raise ValueError(f"header of {hlen} bytes in a member of {size}")
    return hlen


def load_npy(b: bytes | np.ndarray | memoryview, where: str) -> np.ndarray:
    """An .npy member's array as a view of its bytes (np.frombuffer after numpy.lib.format
    parses the header; writable if the bytes are). Object arrays are refused: no pickle."""
    buf = np.frombuffer(b, dtype=np.uint8) if not isinstance(b, np.ndarray) else b.reshape(-1)
    try:
        hlen = _npy_header_len(bytes(buf[:12]), len(buf))
        shape, fortran, dtype, need = _npy_header(bytes(buf[:hlen]))
        if len(buf) - hlen != need:
            raise ValueError(f"payload has {len(buf) - hlen} bytes, the header's {dtype} {shape} needs {need}")
        a = buf[hlen:].view(dtype) if need else np.empty(0, dtype)
        return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
    except Exception as e:
        raise DamagedData(f"{where}: not a readable .npy member ({e})") from e


# ----------------------------------------------------------------------------- the backend

_SHARD_FILE = re.compile(r"shard-(\d{6,})\.tar")


@dataclass(frozen=True)
class WdsShards:
    """Per-store read state of a webdataset store: where its shards are and whether to check."""

    root: Path
    checks: bool


class WdsBackend(Backend):
    """The streaming backend: shard iteration (local or `pipe:`), the trainer's stream loader."""

    name = "wds"
    loader_kind = "stream"
    random_access = False
    pixel_codecs = ("none", "png")

    def create(self, root: Path, layout: StoreLayout, format_version: int) -> list[str]:
        root.mkdir(parents=True, exist_ok=True)
        return []

    def write_shard(self, root: Path, layout: StoreLayout, shard: int, rows: range, data: dict[str, np.ndarray],
                    valid: np.ndarray, members: dict[str, str], format_version: int) -> dict[str, str]:
        return write_shard(root, shard, rows, data, valid, members, format_version, layout.pixel_codec)

    def clean_shard(self, root: Path, layout: StoreLayout, shard: int) -> None:
        clean_shard(root, shard)

    def shard_of_file(self, rel: str, layout_arrays: dict[str, Any], num_shards: int) -> int | None:
        m = _SHARD_FILE.fullmatch(rel)
        return int(m.group(1)) if m and int(m.group(1)) < num_shards and shard_name(int(m.group(1))) == rel else None

    def array_bytes(self, root: Path, manifest: dict) -> dict[str, int]:
        members = {n: e["member"] for n, e in manifest["encoders"].items()}
        codec = (manifest.get("pixels") or {}).get("codec", "none")
        by_suffix = {member_suffix(name, members, codec): name for name in manifest["arrays"]}
        by_suffix[CRC_SUFFIX] = "checksums"
        out = {name: 0 for name in manifest["arrays"]}
        out["checksums"] = out["other"] = 0
        for s in range(manifest["num_shards"]):
            p = root / shard_name(s)
            if not p.is_file():
                continue
            total, owned = p.stat().st_size, 0
            for start, _, entries in tar_index(p).values():
                prev = start
                for suffix, data, size in sorted(entries, key=lambda e: e[1]):
                    cost = data - prev + -(-size // BLOCK) * BLOCK  # its headers and padded data
                    out[by_suffix.get(suffix, "other")] += cost
                    owned += cost
                    prev = data + -(-size // BLOCK) * BLOCK
            out["other"] += total - owned  # end-of-archive blocks, tar record padding
        return out

    def read_checks(self, format_version: int) -> list[str]:
        if format_version >= 2:
            return ["crc32c of every tar member (each sample's <key>.crc32c.json), checked before a sample is "
                    "used: eager and lazy local reads, random access and pipe: streams",
                    "tar header checksums; truncated shards and missing or extra samples are refused"]
        return ["tar header checksums; truncated shards and missing or extra samples are refused",
                "format 1 stores have no per-member checksums: payload bytes are checked only by "
                "`irepa-cache verify` (sha256)"]

    def open_reader(self, root: Path, manifest: dict, listed: set[str], checks: bool) -> WdsShards:
        return WdsShards(root, checks)
