"""webdataset backend: one deterministic tar per store shard, `shard-XXXXXX.tar`.

Each valid row r is a sample with `__key__` = f"{r:09d}" and members
`<key>.latents.npy`, `<key>.feat.<m>.npy` (+ `<key>.scale.<m>.npy` for int8),
`<key>.clstoken.<m>.npy`, `<key>.cls` (label as text), `<key>.key.txt`, and the same with a
`flip.` prefix for the flipped view (`<key>.flip.latents.npy`, ...). `<m>` is the encoder's
member-safe name from manifest `encoders[name].member`. Skipped rows are not written. Headers
are fixed (mtime 0, uid/gid 0, mode 0644, no user names) and members sorted, so a shard's bytes
depend only on its content. Plain `tarfile` reads the shards, and so does webdataset.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import StoreError
from .manifest import PARTIAL_SUFFIX, atomic_open, sha256_file

KEY_WIDTH = 9


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def sample_key(row: int) -> str:
    return f"{row:0{KEY_WIDTH}d}"


def member_suffix(array_name: str, members: dict[str, str]) -> str:
    """Tar member suffix of a logical array name ("flip/features/enc" -> "flip.feat.<m>.npy")."""
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


def write_shard(root: Path, shard: int, rows: range, data: dict[str, np.ndarray],
                valid: np.ndarray, members: dict[str, str]) -> dict[str, str]:
    """Write the shard's valid rows as one tar (temp name, fsync, rename); return {name: sha256}."""
    clean_shard(root, shard)
    final = root / shard_name(shard)
    tmp = final.with_name(f"{final.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    suffixes = {name: member_suffix(name, members) for name in data}
    order = sorted(data, key=lambda n: suffixes[n])
    with atomic_open(final, tmp=tmp) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i, row in enumerate(rows):
                if not valid[i]:
                    continue
                key = sample_key(row)
                for name in order:
                    v = data[name][i]
                    if name == "labels":
                        b = str(int(v)).encode("ascii")
                    elif name == "keys":
                        b = str(v).encode("utf-8")
                    else:
                        b = _npy_bytes(v)
                    tar.addfile(_tarinfo(f"{key}.{suffixes[name]}", len(b)), io.BytesIO(b))
    return {final.name: sha256_file(final)}


def _group(entries: Iterable[tuple[str, bytes]], where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group (member name, bytes) into (key, {suffix: bytes}) in archive order."""
    cur_key, cur = None, {}
    for name, data in entries:
        key, dot, suffix = name.partition(".")
        if not dot:
            raise StoreError(f"{where}: member {name!r} has no '<key>.<suffix>' form")
        if key != cur_key:
            if cur_key is not None:
                yield cur_key, cur
            cur_key, cur = key, {}
        if suffix in cur:
            raise StoreError(f"{where}: duplicate member {name!r}")
        cur[suffix] = data
    if cur_key is not None:
        yield cur_key, cur


def iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a local shard, read sequentially with tarfile."""
    if not path.exists():
        raise StoreError(f"shard file {path} is missing")

    def entries():
        try:
            with tarfile.open(path, mode="r|") as tar:
                for ti in tar:
                    if not ti.isreg():
                        continue
                    f = tar.extractfile(ti)
                    yield ti.name, f.read() if f is not None else b""
        except tarfile.TarError as e:
            raise StoreError(f"shard file {path} is not a readable tar ({e})") from e

    return _group(entries(), str(path))


def iter_urls(urls: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of shards given as webdataset URLs (local paths, `pipe:` commands, http...)."""
    from webdataset.tariterators import tarfile_samples  # imports torch: keep it lazy

    for s in tarfile_samples([{"url": u} for u in urls]):
        key = s["__key__"]
        yield key, {k: v for k, v in s.items() if not k.startswith("__")}


def load_npy(b: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(b), allow_pickle=False)
    except Exception as e:
        raise StoreError(f"{where}: not a readable .npy member ({e})") from e
