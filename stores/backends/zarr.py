"""zarr v3 backend: one sharded array per field, one shard file per store shard.

Row-indexed payload arrays (latents, features, scales, cls, pixels) use zarr's sharding codec
with a shard of `shard_size` rows and an inner chunk of one row, so ImageNet is a few thousand
files and a random read touches one sample's bytes. `labels` and `keys` are small: one plain
chunk of `shard_size` rows each (still one file per shard). Payloads are stored uncompressed
(float activations barely compress and decoding would cost the loader CPU); labels/keys use
zstd. `pixels` (uint8 [N, 3, H, W]) are raw rows by default; pixel codec "zstd" puts zarr's
zstd codec (level `ZSTD_LEVEL`) before each row's crc32c, which zarr-python and `ShardedRows`
both decode (bench.storage measures what it saves and costs).

Checksums (format version 2): every inner chunk (one row) ends with the crc32c of its bytes
(zarr's `crc32c` codec), the shard index ends with its own crc32c (part of zarr's sharding
format), and the labels/keys chunks end with a crc32c after zstd. zarr-python and tensorstore
check all of them; so does `ShardedRows`, this package's direct reader, on every row it reads.
Format version 1 stores have no per-row or labels/keys checksums; their shard indexes do, and
those are checked.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..checksum import crc32c
from ..errors import DamagedData, StoreError
from ..layout import StoreLayout
from ..manifest import FORMAT_VERSION, PARTIAL_SUFFIX, atomic_open, fsync_dir, fsync_file, sha256_file, shard_range
from .base import Backend

_SMALL = ("labels", "keys")
ZSTD_LEVEL = 3  # zarr's default level; higher levels barely shrink photos further (bench.storage)
_EMPTY = 2**64 - 1
_INDEX_CACHE = 512  # verified shard indexes kept per array and process (16 B per row each)


def _is_small(name: str) -> bool:
    return name in _SMALL


def chunk_file(name: str, ndim: int, shard: int) -> str:
    """Relative path of the file holding store shard `shard` of array `name`."""
    if _is_small(name):
        return f"{name}/c/{shard}"
    return f"{name}/c/" + "/".join([str(shard)] + ["0"] * (ndim - 1))


def create_arrays(root: Path, layout: StoreLayout, format_version: int = FORMAT_VERSION) -> list[str]:
    """Create the zarr group and every array (idempotent); return the metadata files' relpaths.

    format_version 2 adds zarr's crc32c codec after each inner chunk and after the labels/keys
    compression; 1 is the layout of older stores (kept so that their builds can be resumed)."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    crc = format_version >= 2
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "zarr.json").exists():
        zarr.create_group(store=str(root), zarr_format=3, overwrite=False)
    group = zarr.open_group(str(root), mode="r+")
    s = layout.shard_size
    small_codecs = [ZstdCodec(level=3)] + ([Crc32cCodec()] if crc else [])
    for name, (shape, dtype) in layout.array_specs().items():
        if (root / name / "zarr.json").exists():
            continue
        kw: dict[str, Any] = dict(shape=shape, overwrite=False)
        if name == "keys":
            kw.update(dtype=str, chunks=(s,), compressors=small_codecs, fill_value="")
        elif name == "labels":
            kw.update(dtype="int64", chunks=(s,), compressors=small_codecs, fill_value=-1)
        elif name == "pixels" and layout.pixel_codec == "zstd":
            kw.update(dtype=dtype, chunks=(1, *shape[1:]), shards=(s, *shape[1:]), fill_value=0,
                      compressors=[ZstdCodec(level=ZSTD_LEVEL)] + ([Crc32cCodec()] if crc else []))
        else:
            kw.update(dtype=dtype, chunks=(1, *shape[1:]), shards=(s, *shape[1:]),
                      compressors=Crc32cCodec() if crc else None, fill_value=0)
        try:
            group.create_array(name, **kw)
        except Exception as e:  # a concurrent rank created it first: fine if it is there now
            if not (root / name / "zarr.json").exists():
                raise StoreError(f"store {root}: cannot create zarr array {name!r}: {e}") from e
    meta = sorted(p.relative_to(root).as_posix() for p in root.rglob("zarr.json"))
    for rel in meta:  # zarr renames into place but does not fsync
        fsync_file(root / rel)
    for d in sorted({(root / rel).parent for rel in meta}, key=lambda p: -len(p.parts)):
        fsync_dir(d)
    return meta


def clean_shard(root: Path, layout: StoreLayout, shard: int) -> None:
    """Remove a shard's files and any temporaries left by an interrupted write of it."""
    for name, (shape, _) in layout.array_specs().items():
        f = root / chunk_file(name, len(shape), shard)
        if f.parent.is_dir():
            for p in f.parent.glob(f"{f.name}.*{PARTIAL_SUFFIX}"):
                p.unlink(missing_ok=True)
        f.unlink(missing_ok=True)


def write_shard(root: Path, layout: StoreLayout, shard: int, rows: range,
                data: dict[str, np.ndarray]) -> dict[str, str]:
    """Write one shard-aligned slice per array, fsync it; return {relpath: sha256} of files written.

    labels/keys go through zarr. Payload arrays are encoded here as zarr sharding_indexed files
    (rows in order, each with its crc32c when the array's metadata has that codec, then the
    offset/nbytes index and its crc32c), the same bytes zarr writes for this layout (tests compare
    them), but at memory speed instead of ~0.5 ms per row, and written to a temporary name,
    fsynced and renamed. The array metadata decides the layout, so a resumed format-1 build
    keeps writing format-1 shards.
    """
    import zarr

    group = None
    specs = layout.array_specs()
    clean_shard(root, layout, shard)
    files: dict[str, str] = {}
    for name, (shape, _) in specs.items():
        rel = chunk_file(name, len(shape), shard)
        fast = None if _is_small(name) else ShardedRows.from_metadata(root, name)
        if fast is not None:
            digest = write_shard_file(root / rel, data[name], layout.shard_size, crc=fast.crc, zstd=fast.zstd)
            if digest is not None:
                files[rel] = digest
            continue
        if group is None:
            group = zarr.open_group(str(root), mode="r+")
        group[name][rows.start:rows.stop] = data[name]
        f = root / rel
        if f.exists():  # zarr omits a shard whose rows all equal the fill value
            fsync_file(f)
            files[rel] = sha256_file(f)
    dirs: set[Path] = set()
    for rel in files:
        d = (root / rel).parent
        while d != root and root in d.parents:
            dirs.add(d)
            d = d.parent
    for d in sorted(dirs, key=lambda p: -len(p.parts)):
        fsync_dir(d)
    return dict(sorted(files.items()))


def encode_shard(data: np.ndarray, shard_rows: int, crc: bool = False,
                 zstd: int | None = None) -> list[memoryview] | None:
    """zarr sharding_indexed bytes of one shard whose inner chunks are single raw rows (fill 0),
    each followed by its crc32c (little-endian uint32) when `crc` (zarr's crc32c codec).
    `zstd` (a level): each row is zstd-compressed first (zarr's zstd codec, via numcodecs as
    zarr does it), the crc32c then covers the compressed bytes.

    Rows that are all zero are left out (index entry 2**64-1), as zarr does with
    write_empty_chunks=False; None when every row is empty (zarr writes no file then).
    """

    n = len(data)
    flat = np.ascontiguousarray(data).reshape(n, -1)
    if flat.dtype.byteorder == ">":
        flat = flat.astype(flat.dtype.newbyteorder("<"))
    nonempty = flat.any(axis=1)
    if not nonempty.any():
        return None
    if zstd is not None:
        return _encode_compressed(flat, nonempty, shard_rows, crc, zstd)
    row_bytes = flat.shape[1] * flat.dtype.itemsize
    chunk = row_bytes + (4 if crc else 0)
    index = np.full((shard_rows, 2), _EMPTY, dtype="<u8")
    k = np.flatnonzero(nonempty)
    index[k, 0] = np.arange(len(k), dtype=np.uint64) * np.uint64(chunk)
    index[k, 1] = chunk
    raw = flat.view(np.uint8).reshape(n, row_bytes)
    parts: list[memoryview] = []
    if crc:
        buf = np.empty((len(k), chunk), dtype=np.uint8)
        buf[:, :row_bytes] = raw[k]
        sums = np.array([crc32c(raw[i]) for i in k], dtype="<u4")
        buf[:, row_bytes:] = sums.view(np.uint8).reshape(-1, 4)
        parts.append(memoryview(buf.reshape(-1)))
    elif nonempty.all():
        parts.append(memoryview(raw.reshape(-1)))
    else:  # contiguous runs of non-empty rows
        breaks = np.flatnonzero(np.diff(k) != 1) + 1
        for run in np.split(k, breaks):
            parts.append(memoryview(raw[run[0]:run[-1] + 1].reshape(-1)))
    index_bytes = index.tobytes()
    index_crc = np.array([crc32c(index_bytes)], dtype="<u4").tobytes()
    parts += [memoryview(index_bytes), memoryview(index_crc)]
    return parts


def _encode_compressed(flat: np.ndarray, nonempty: np.ndarray, shard_rows: int, crc: bool,
                       level: int) -> list[memoryview]:
    """encode_shard's zstd variant: chunks of varying size, each a zstd frame (+ its crc32c)."""
    from numcodecs import Zstd

    codec = Zstd(level=level)
    index = np.full((shard_rows, 2), _EMPTY, dtype="<u8")
    parts: list[memoryview] = []
    off = 0
    raw = flat.view(np.uint8).reshape(len(flat), -1)
    for i in np.flatnonzero(nonempty):
        frame = bytes(codec.encode(raw[i]))
        chunk = frame + (crc32c(frame).to_bytes(4, "little") if crc else b"")
        index[i] = (off, len(chunk))
        off += len(chunk)
        parts.append(memoryview(chunk))
    index_bytes = index.tobytes()
    parts += [memoryview(index_bytes), memoryview(crc32c(index_bytes).to_bytes(4, "little"))]
    return parts


def write_shard_file(path: Path, data: np.ndarray, shard_rows: int, crc: bool = False,
                     zstd: int | None = None) -> str | None:
    """Encode and atomically write one shard file (temp name, fsync, rename); return its sha256."""
    import hashlib

    parts = encode_shard(data, shard_rows, crc=crc, zstd=zstd)
    if parts is None:
        return None
    h = hashlib.sha256()
    # the caller fsyncs the shard's directories once for all arrays
    with atomic_open(path, tmp=path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}"), sync_dir=False) as f:
        for p in parts:
            h.update(p)
            f.write(p)
    return h.hexdigest()


_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_BYTES1 = {"name": "bytes"}  # zarr's bytes codec of 1-byte types (no endianness)
_CRC = {"name": "crc32c"}
_SHARD_CODEC = {
    "index_codecs": [_BYTES, _CRC],
    "index_location": "end",
}


class ShardedRows:
    """Direct, checked row reads from a sharded array whose inner chunks are raw little-endian
    rows (optionally followed by their crc32c).

    zarr's own fancy indexing through the sharding codec builds a coordinate index over every
    element of the selected chunks (seconds for a batch), and its per-row reads re-read the shard
    index each time. For the layout this package writes (sharding_indexed, inner chunk = one row,
    bytes codec [+ crc32c], index at the end: offset/nbytes uint64 pairs then a crc32c) a row is
    one preadv of its bytes (and crc) straight into the output buffer, after the shard's index was
    read once and its crc32c checked. A listed file that is missing, an index or a row that fails
    its crc32c, or a short read raise `DamagedData` naming the store, array, row and file (or are
    recorded in `damaged` and filled with zeros). Tests check it against zarr's own reads; other
    layouts fall back to zarr.
    """

    def __init__(self, root: Path, name: str, shape: tuple[int, ...], shard_rows: int, dtype: np.dtype,
                 fill: Any, crc: bool, listed: frozenset[str] = frozenset(), checks: bool = True,
                 zstd: int | None = None):
        self.root, self.name, self.shape, self.shard_rows = root, name, shape, shard_rows
        self.dtype = dtype
        self.fill = fill
        self.crc = crc
        self.zstd = zstd  # level of zarr's zstd codec on each row (pixel codec "zstd"), else None
        self.listed = listed
        self.checks = checks
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.chunk_bytes = self.row_bytes + (4 if crc else 0)
        self._index: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @classmethod
    def from_metadata(cls, root: Path, name: str, listed: frozenset[str] = frozenset(),
                      checks: bool = True) -> "ShardedRows | None":
        try:
            meta = json.loads((root / name / "zarr.json").read_text())
            shape = tuple(meta["shape"])
            shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            (codec,) = meta["codecs"]
            cfg = codec["configuration"]
            inner = list(cfg["codecs"])
            one_byte = np.dtype(meta["data_type"]).itemsize == 1
            crc = bool(inner) and inner[-1] == _CRC
            body = inner[:-1] if crc else inner
            zstd = None
            if len(body) == 2 and body[1].get("name") == "zstd":
                zc = body[1].get("configuration") or {}
                if set(zc) <= {"level", "checksum"} and not zc.get("checksum"):
                    zstd, body = int(zc.get("level", 0)), body[:1]
            ok = (
                codec["name"] == "sharding_indexed"
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                and list(cfg["chunk_shape"]) == [1, *shape[1:]]
                and list(shard[1:]) == list(shape[1:])
                and (body == [_BYTES] or (one_byte and body == [_BYTES1]))
                and all(cfg.get(k) == v for k, v in _SHARD_CODEC.items())
                and meta["data_type"] in ("float32", "float16", "int8", "uint8", "int64")
                and not meta.get("storage_transformers")
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not ok:
            return None
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        return cls(root, name, shape, shard[0], dtype, meta.get("fill_value", 0), crc=crc,
                   listed=listed, checks=checks, zstd=zstd)

    def shard_path(self, shard: int) -> Path:
        return self.root / chunk_file(self.name, len(self.shape), shard)

    def _msg(self, row: int, problem: str) -> str:
        return f"store {self.root}: array {self.name!r} row {row}: {problem}"

    def _verified_index(self, fd: int, path: Path) -> np.ndarray | str:
        """The shard's index [shard_rows, 2] after its crc32c check, or what is wrong with it."""
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        got = self._index.get(ident)
        if got is not None:
            self._index.move_to_end(ident)
            return got
        n = 16 * self.shard_rows + 4
        start = st.st_size - n
        if start < 0:
            return f"file {path} has {st.st_size} bytes, too short for its shard index of {n} (truncated?)"
        raw = np.empty(n, dtype=np.uint8)
        if os.preadv(fd, [raw], start) != n:
            return f"file {path}: short read of its shard index (the file shrank while reading?)"
        if self.checks:

            want = int.from_bytes(raw[-4:].tobytes(), "little")
            have = crc32c(raw[:-4])
            if want != have:
                return (f"the shard index at the end of file {path} fails its crc32c check (stored {want:08x}, "
                        f"computed {have:08x}): the file is damaged")
        index = raw[:-4].view("<u8").reshape(self.shard_rows, 2)
        ends = index[:, 0] + index[:, 1]
        used = index[:, 0] != _EMPTY
        wrong = (index[:, 1] <= (4 if self.crc else 0)) if self.zstd is not None else (index[:, 1] != self.chunk_bytes)
        if (used & (wrong | (ends > start))).any():
            return f"the shard index of file {path} points outside the file or at chunks of the wrong size"
        self._index[ident] = index
        if len(self._index) > _INDEX_CACHE:
            self._index.popitem(last=False)
        return index

    def read(self, rows: np.ndarray, damaged: list[tuple[int, str]] | None = None) -> np.ndarray:
        """Rows (any order, repeats allowed) as a [len(rows), ...] array.

        damaged None: the first damaged row raises DamagedData. A list: each damaged row's
        (position in `rows`, message) is appended and its output is zeros."""

        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if len(rows) == 0:
            return out
        flat = out.reshape(len(rows), -1).view(np.uint8)
        crcbuf = np.empty(4, dtype=np.uint8)
        shards = rows // self.shard_rows

        def bad(js: Any, problem: str) -> None:
            for j in np.atleast_1d(js):
                msg = self._msg(int(rows[j]), problem)
                if damaged is None:
                    raise DamagedData(msg)
                damaged.append((int(j), msg))
                out[j] = 0

        for shard in np.unique(shards):
            sel = np.flatnonzero(shards == shard)
            path = self.shard_path(int(shard))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if path.relative_to(self.root).as_posix() in self.listed:
                    bad(sel, f"file {path} is missing (the manifest lists it)")
                else:  # zarr leaves out a shard whose rows are all fill; the manifest lists no file
                    out[sel] = self.fill
                continue
            try:
                index = self._verified_index(fd, path)
                if isinstance(index, str):
                    bad(sel, index)
                    continue
                for j in sel:
                    k = int(rows[j]) - int(shard) * self.shard_rows
                    off, nbytes = int(index[k, 0]), int(index[k, 1])
                    if off == _EMPTY:
                        out[j] = self.fill
                        continue
                    if self.zstd is not None:
                        problem = self._read_compressed(fd, off, nbytes, flat[j], path)
                        if problem:
                            bad(j, problem)
                        continue
                    bufs = [memoryview(flat[j]), crcbuf] if self.crc else [memoryview(flat[j])]
                    if os.preadv(fd, bufs, off) != nbytes:
                        bad(j, f"short read in file {path} (the file shrank while reading?)")
                        continue
                    if self.crc and self.checks:
                        want = int.from_bytes(crcbuf.tobytes(), "little")
                        have = crc32c(flat[j])
                        if want != have:
                            bad(j, f"crc32c mismatch in file {path} (stored {want:08x}, computed {have:08x}): "
                                   "the file is damaged")
            finally:
                os.close(fd)
        return out

    def _read_compressed(self, fd: int, off: int, nbytes: int, out: np.ndarray, path: Path) -> str | None:
        """One zstd row (and its crc32c) at `off` decoded into `out` (uint8 view of the row);
        what is wrong with it, or None."""
        from numcodecs import Zstd

        buf = np.empty(nbytes, dtype=np.uint8)
        if os.preadv(fd, [buf], off) != nbytes:
            return f"short read in file {path} (the file shrank while reading?)"
        frame = buf[:-4] if self.crc else buf
        if self.crc and self.checks:
            want = int.from_bytes(buf[-4:].tobytes(), "little")
            have = crc32c(frame)
            if want != have:
                return f"crc32c mismatch in file {path} (stored {want:08x}, computed {have:08x}): the file is damaged"
        try:
            raw = np.frombuffer(Zstd().decode(frame), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - a damaged frame (checks off, or a format 1 layout)
            return f"zstd frame in file {path} cannot be decoded ({type(e).__name__}: {e}): the file is damaged"
        if raw.nbytes != out.nbytes:
            return f"zstd frame in file {path} decodes to {raw.nbytes} bytes, a row has {out.nbytes}: the file is damaged"
        out[...] = raw
        return None


class ZarrArrays:
    """Read access to a zarr store's arrays (opened lazily, reopened in forked workers).

    `listed`: relative paths of the data files the manifest lists (a listed file that is missing
    is damage, never fill values). `checks`: verify checksums (benchmarks turn it off)."""

    def __init__(self, root: Path, listed: frozenset[str] = frozenset(), checks: bool = True):
        self.root = root
        self.listed = frozenset(listed)
        self.checks = checks
        self._pid = -1
        self._group = None
        self._arrays: dict[str, Any] = {}
        self._fast: dict[str, ShardedRows | None] = {}

    def __getstate__(self) -> dict:  # picklable for spawned DataLoader workers
        return {"root": self.root, "listed": self.listed, "checks": self.checks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state.get("listed", frozenset()), state.get("checks", True))

    def _g(self):
        if self._group is None or self._pid != os.getpid():
            import zarr

            try:
                self._group = zarr.open_group(str(self.root), mode="r")
            except Exception as e:
                raise StoreError(f"store {self.root}: cannot open the zarr group ({e})") from e
            self._arrays = {}
            self._pid = os.getpid()
        return self._group

    def array(self, name: str):
        g = self._g()
        if name not in self._arrays:
            try:
                self._arrays[name] = g[name]
            except KeyError:
                raise StoreError(f"store {self.root}: zarr array {name!r} is missing") from None
            except Exception as e:  # e.g. an edited zarr.json
                raise StoreError(f"store {self.root}: zarr array {name!r} cannot be opened: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        return self._arrays[name]

    def fast(self, name: str) -> ShardedRows | None:
        if name not in self._fast:
            self.array(name)  # raises a clear error when the array is missing
            self._fast[name] = ShardedRows.from_metadata(self.root, name, self.listed, self.checks)
        return self._fast[name]

    def _zarr_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        try:
            return np.asarray(self.array(name)[start:stop])
        except StoreError:
            raise
        except Exception as e:  # zarr's crc32c codec, zstd, a truncated file...
            first = str(e).splitlines()[0] if str(e) else ""
            raise DamagedData(f"store {self.root}: array {name!r} rows {start}-{stop - 1} cannot be read: "
                              f"{type(e).__name__}: {first}") from None

    def rows(self, name: str, rows_sorted: np.ndarray, damaged: list[tuple[int, str]] | None = None) -> np.ndarray:
        """The given (sorted, unique) rows: direct preads, or zarr reads of contiguous runs."""
        rows_sorted = np.asarray(rows_sorted, dtype=np.int64)
        fast = self.fast(name)
        if fast is not None:
            return fast.read(rows_sorted, damaged)
        a = self.array(name)
        if len(rows_sorted) == 0:
            return np.zeros((0, *a.shape[1:]), dtype=a.dtype)
        breaks = np.flatnonzero(np.diff(rows_sorted) != 1) + 1
        runs = np.split(rows_sorted, breaks)
        return np.concatenate([self._zarr_rows(name, int(r[0]), int(r[-1]) + 1) for r in runs])

    def slice(self, name: str, start: int, stop: int, damaged: list[tuple[int, str]] | None = None) -> np.ndarray:
        fast = self.fast(name)
        if fast is not None:
            return fast.read(np.arange(start, stop, dtype=np.int64), damaged)
        return self._zarr_rows(name, start, stop)

    def per_shard(self, name: str, num_rows: int, shard_size: int,
                  damaged: dict[int, str] | None = None) -> np.ndarray:
        """Every row of a small per-shard-chunk array (labels, keys), read by zarr.

        A listed chunk file that is missing (zarr would read back fill values) or a chunk that
        fails its crc32c / decompression raises DamagedData naming the file, or (damaged given)
        records every row of that chunk and leaves them at the fill value."""
        a = self.array(name)
        files = {s: chunk_file(name, 1, s) for s in range(-(-num_rows // shard_size))}
        missing = [s for s, rel in files.items() if rel in self.listed and not (self.root / rel).is_file()]
        if not missing:
            try:
                return np.asarray(a[:])
            except Exception:  # find the damaged chunk below
                pass
        values = np.full(num_rows, a.fill_value, dtype=a.dtype if a.dtype != np.dtype("O") else object)
        for s, rel in files.items():
            r = shard_range(s, num_rows, shard_size)
            path = self.root / rel
            if s in missing:
                problem = f"file {path} is missing (the manifest lists it)"
            else:
                try:
                    values[r.start:r.stop] = np.asarray(a[r.start:r.stop])
                    continue
                except Exception as e:
                    first = str(e).splitlines()[0] if str(e) else ""
                    problem = (f"file {path} fails its crc32c check (the file is damaged)" if "checksum" in first
                               else f"file {path} cannot be read (the file is damaged?): {type(e).__name__}: {first}")
            msg = f"store {self.root}: array {name!r} rows {r.start}-{r.stop - 1}: {problem}"
            if damaged is None:
                raise DamagedData(msg)
            damaged.update({row: msg for row in r})
        return values


class ZarrBackend(Backend):
    """The default backend: random access (`get_batch`), the trainer's index-order loader."""

    name = "zarr"
    loader_kind = "index"
    random_access = True
    pixel_codecs = ("none", "zstd")

    def create(self, root: Path, layout: StoreLayout, format_version: int) -> list[str]:
        return create_arrays(root, layout, format_version)

    def write_shard(self, root: Path, layout: StoreLayout, shard: int, rows: range, data: dict[str, np.ndarray],
                    valid: np.ndarray, members: dict[str, str], format_version: int) -> dict[str, str]:
        return write_shard(root, layout, shard, rows, data)

    def clean_shard(self, root: Path, layout: StoreLayout, shard: int) -> None:
        clean_shard(root, layout, shard)

    def shard_of_file(self, rel: str, layout_arrays: dict[str, Any], num_shards: int) -> int | None:
        for name, a in layout_arrays.items():
            prefix = name + "/c/"
            if not rel.startswith(prefix):
                continue
            parts = rel[len(prefix):].split("/")
            ndim = 1 if _is_small(name) else len(a["shape"])
            head = parts[0]
            if (len(parts) == ndim and all(p == "0" for p in parts[1:]) and head.isdigit()
                    and str(int(head)) == head and int(head) < num_shards):
                return int(head)
        return None

    def array_bytes(self, root: Path, manifest: dict) -> dict[str, int]:
        out = {name: 0 for name in manifest["arrays"]}
        for name in out:
            d = root / name / "c"
            if d.is_dir():
                for dirpath, _, files in os.walk(d):
                    out[name] += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return out

    def read_checks(self, format_version: int) -> list[str]:
        if format_version >= 2:
            return ["crc32c of every row of every payload array (zarr's crc32c codec; zarr-python and tensorstore "
                    "check it too)",
                    "crc32c of every shard index",
                    "crc32c of the labels and keys chunks",
                    "every file the manifest lists must exist (never read as fill values)"]
        return ["crc32c of every shard index",
                "every file the manifest lists must exist (never read as fill values)",
                "format 1 stores have no per-row checksums: payload bytes are checked only by "
                "`irepa-cache verify` (sha256)"]

    def open_reader(self, root: Path, manifest: dict, listed: set[str], checks: bool) -> ZarrArrays:
        if checks:  # an edited or damaged zarr.json would change how every byte is decoded
            for rel, want in sorted((manifest.get("meta_files") or {}).items()):
                p = root / rel
                if not p.is_file():
                    raise DamagedData(f"store {root}: metadata file {p} is missing (the manifest lists it)")
                if sha256_file(p) != want:
                    raise DamagedData(f"store {root}: metadata file {p} does not match the manifest's sha256 (it was "
                                      "edited or is damaged); irepa-cache verify checks every file")
        return ZarrArrays(root, frozenset(listed), checks)
