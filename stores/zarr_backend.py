"""zarr v3 backend: one sharded array per field, one shard file per store shard.

Row-indexed payload arrays (latents, features, scales, cls) use zarr's sharding codec with a
shard of `shard_size` rows and an inner chunk of one row, so ImageNet is a few thousand files
and a random read touches one sample's bytes. `labels` and `keys` are small: one plain chunk of
`shard_size` rows each (still one file per shard). Payloads are stored uncompressed (float
activations barely compress and decoding would cost the loader CPU); labels/keys use zstd.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError
from .layout import StoreLayout
from .manifest import PARTIAL_SUFFIX, atomic_open, fsync_dir, fsync_file, sha256_file

_FILL = {"labels": -1, "keys": ""}


def _is_small(name: str) -> bool:
    return name in ("labels", "keys")


def chunk_file(name: str, ndim: int, shard: int) -> str:
    """Relative path of the file holding store shard `shard` of array `name`."""
    if _is_small(name):
        return f"{name}/c/{shard}"
    return f"{name}/c/" + "/".join([str(shard)] + ["0"] * (ndim - 1))


def create_arrays(root: Path, layout: StoreLayout) -> list[str]:
    """Create the zarr group and every array (idempotent); return the metadata files' relpaths."""
    import zarr
    from zarr.codecs import ZstdCodec

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "zarr.json").exists():
        zarr.create_group(store=str(root), zarr_format=3, overwrite=False)
    group = zarr.open_group(str(root), mode="r+")
    s = layout.shard_size
    for name, (shape, dtype) in layout.array_specs().items():
        if (root / name / "zarr.json").exists():
            continue
        kw: dict[str, Any] = dict(shape=shape, overwrite=False)
        if name == "keys":
            kw.update(dtype=str, chunks=(s,), compressors=ZstdCodec(level=3), fill_value="")
        elif name == "labels":
            kw.update(dtype="int64", chunks=(s,), compressors=ZstdCodec(level=3), fill_value=-1)
        else:
            kw.update(dtype=dtype, chunks=(1, *shape[1:]), shards=(s, *shape[1:]), compressors=None,
                      fill_value=0)
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
    (rows in order, then the offset/nbytes index and its crc32c), the same bytes zarr writes
    for this layout (tests compare them), but at memory speed instead of ~0.5 ms per row, and
    written to a temporary name, fsynced and renamed.
    """
    import zarr

    group = None
    specs = layout.array_specs()
    clean_shard(root, layout, shard)
    files: dict[str, str] = {}
    for name, (shape, _) in specs.items():
        rel = chunk_file(name, len(shape), shard)
        if not _is_small(name) and ShardedRows.from_metadata(root, name) is not None:
            digest = write_shard_file(root / rel, data[name], layout.shard_size)
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


def encode_shard(data: np.ndarray, shard_rows: int) -> list[memoryview] | None:
    """zarr sharding_indexed bytes of one shard whose inner chunks are single raw rows (fill 0).

    Rows that are all zero are left out (index entry 2**64-1), as zarr does with
    write_empty_chunks=False; None when every row is empty (zarr writes no file then).
    """
    import google_crc32c  # a zarr dependency (its crc32c codec)

    n = len(data)
    flat = np.ascontiguousarray(data).reshape(n, -1)
    if flat.dtype.byteorder == ">":
        flat = flat.astype(flat.dtype.newbyteorder("<"))
    nonempty = flat.any(axis=1)
    if not nonempty.any():
        return None
    row_bytes = flat.shape[1] * flat.dtype.itemsize
    index = np.full((shard_rows, 2), _EMPTY, dtype="<u8")
    k = np.flatnonzero(nonempty)
    index[k, 0] = np.arange(len(k), dtype=np.uint64) * np.uint64(row_bytes)
    index[k, 1] = row_bytes
    raw = flat.view(np.uint8).reshape(n, row_bytes)
    parts: list[memoryview] = []
    if nonempty.all():
        parts.append(memoryview(raw.reshape(-1)))
    else:  # contiguous runs of non-empty rows
        breaks = np.flatnonzero(np.diff(k) != 1) + 1
        for run in np.split(k, breaks):
            parts.append(memoryview(raw[run[0]:run[-1] + 1].reshape(-1)))
    index_bytes = index.tobytes()
    crc = np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()
    parts += [memoryview(index_bytes), memoryview(crc)]
    return parts


def write_shard_file(path: Path, data: np.ndarray, shard_rows: int) -> str | None:
    """Encode and atomically write one shard file (temp name, fsync, rename); return its sha256."""
    import hashlib

    parts = encode_shard(data, shard_rows)
    if parts is None:
        return None
    h = hashlib.sha256()
    # the caller fsyncs the shard's directories once for all arrays
    with atomic_open(path, tmp=path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}"), sync_dir=False) as f:
        for p in parts:
            h.update(p)
            f.write(p)
    return h.hexdigest()


_EMPTY = 2**64 - 1
_SHARD_CODEC = {
    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    "index_location": "end",
}


class ShardedRows:
    """Direct row reads from a sharded array whose inner chunks are raw little-endian rows.

    zarr's own fancy indexing through the sharding codec builds a coordinate index over every
    element of the selected chunks (seconds for a batch), and its per-row reads re-read the shard
    index each time. For the layout this package writes (sharding_indexed, inner chunk = one row,
    bytes codec only, index at the end: offset/nbytes uint64 pairs then a crc32c) a row is two
    preads: its 16-byte index entry and its bytes, written straight into the output buffer.
    Tests check it against zarr's own reads; other layouts fall back to zarr.
    """

    def __init__(self, root: Path, name: str, shape: tuple[int, ...], shard_rows: int, dtype: np.dtype,
                 fill: Any):
        self.root, self.name, self.shape, self.shard_rows = root, name, shape, shard_rows
        self.dtype = dtype
        self.fill = fill
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    @classmethod
    def from_metadata(cls, root: Path, name: str) -> "ShardedRows | None":
        import json

        try:
            meta = json.loads((root / name / "zarr.json").read_text())
            shape = tuple(meta["shape"])
            shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            (codec,) = meta["codecs"]
            cfg = codec["configuration"]
            ok = (
                codec["name"] == "sharding_indexed"
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                and list(cfg["chunk_shape"]) == [1, *shape[1:]]
                and list(shard[1:]) == list(shape[1:])
                and all(cfg.get(k) == v for k, v in _SHARD_CODEC.items())
                and meta["data_type"] in ("float32", "float16", "int8", "int64")
                and not meta.get("storage_transformers")
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not ok:
            return None
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        return cls(root, name, shape, shard[0], dtype, meta.get("fill_value", 0))

    def shard_path(self, shard: int) -> Path:
        return self.root / chunk_file(self.name, len(self.shape), shard)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows (any order, repeats allowed) as a [len(rows), ...] array."""
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if len(rows) == 0:
            return out
        flat = out.reshape(len(rows), -1).view(np.uint8)
        shards = np.asarray(rows, dtype=np.int64) // self.shard_rows
        for shard in np.unique(shards):
            sel = np.flatnonzero(shards == shard)
            path = self.shard_path(int(shard))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # zarr leaves out a shard whose rows are all fill
                out[sel] = self.fill
                continue
            try:
                index_start = os.fstat(fd).st_size - 4 - 16 * self.shard_rows
                if index_start < 0:
                    raise StoreError(f"shard file {path} is too short for its index")
                for j in sel:
                    k = int(rows[j]) - int(shard) * self.shard_rows
                    entry = os.pread(fd, 16, index_start + 16 * k)
                    off, nbytes = (int(v) for v in np.frombuffer(entry, dtype="<u8"))
                    if off == _EMPTY:
                        out[j] = self.fill
                        continue
                    if nbytes != self.row_bytes:
                        raise StoreError(f"shard file {path}: row {int(rows[j])} holds {nbytes} bytes, "
                                         f"expected {self.row_bytes}")
                    got = os.preadv(fd, [memoryview(flat[j])], off)
                    if got != nbytes:
                        raise StoreError(f"shard file {path}: short read of row {int(rows[j])}")
            finally:
                os.close(fd)
        return out


class ZarrArrays:
    """Read access to a zarr store's arrays (opened lazily, reopened in forked workers)."""

    def __init__(self, root: Path):
        self.root = root
        self._pid = -1
        self._group = None
        self._arrays: dict[str, Any] = {}
        self._fast: dict[str, ShardedRows | None] = {}

    def __getstate__(self) -> dict:  # picklable for spawned DataLoader workers
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

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
        return self._arrays[name]

    def fast(self, name: str) -> ShardedRows | None:
        if name not in self._fast:
            self.array(name)  # raises a clear error when the array is missing
            self._fast[name] = ShardedRows.from_metadata(self.root, name)
        return self._fast[name]

    def rows(self, name: str, rows_sorted: np.ndarray) -> np.ndarray:
        """The given (sorted, unique) rows: direct preads, or zarr reads of contiguous runs."""
        rows_sorted = np.asarray(rows_sorted, dtype=np.int64)
        fast = self.fast(name)
        if fast is not None:
            return fast.read(rows_sorted)
        a = self.array(name)
        if len(rows_sorted) == 0:
            return np.zeros((0, *a.shape[1:]), dtype=a.dtype)
        breaks = np.flatnonzero(np.diff(rows_sorted) != 1) + 1
        runs = np.split(rows_sorted, breaks)
        return np.concatenate([np.asarray(a[int(r[0]):int(r[-1]) + 1]) for r in runs])

    def slice(self, name: str, start: int, stop: int) -> np.ndarray:
        fast = self.fast(name)
        if fast is not None:
            return fast.read(np.arange(start, stop, dtype=np.int64))
        return np.asarray(self.array(name)[start:stop])

    def all(self, name: str) -> np.ndarray:
        return np.asarray(self.array(name)[:])
