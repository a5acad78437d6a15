"""Manifest (format versions 1 and 2): schema checks, fingerprints and crash-safe file writes.

The manifest is plain JSON with no timestamps, so a build that is interrupted and resumed ends
with exactly the bytes of one that was not. Fields this version does not know (added by a later
version, or free-form entries such as an encoder's `preprocess`) are kept, never refused.

Format version 2 (this version writes it) differs from 1 only in the shard bytes: zarr rows and
labels/keys chunks carry crc32c checksums, webdataset samples a `<key>.crc32c.json` member
(see `backends/`), and completion records a `build` id. Version 1 stores are read as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from .errors import StoreError

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
PROGRESS_DIR = "_progress"
PARTIAL_SUFFIX = ".partial"
FORMATS = ("zarr", "wds")
STATES = ("building", "complete")
FEATURE_DTYPES = ("float16", "int8")
LATENT_DTYPES = ("float32", "float16")
#: codecs of the pixel array: raw rows, zarr's zstd codec per row (zarr), one PNG per sample (webdataset)
PIXEL_CODECS = ("none", "zstd", "png")


def escape_key(key: str) -> str:
    r"""A source key as valid UTF-8 text, the form stores keep (keys array, manifest, fingerprint).

    A key that is valid text is returned unchanged, so every dataset whose file names are UTF-8
    keeps its keys and fingerprint. A key holding surrogate escapes (what os.listdir returns for
    a file name whose bytes are not UTF-8: Latin-1 b"caf\xe9.png" becomes 'caf\udce9.png') gets
    each such byte written as the four characters \xNN ('caf\\xe9.png' in Python, caf\xe9.png on
    screen), Python's "backslashreplace"; any other lone surrogate is written as \uNNNN. The
    escape cannot be told apart from a name that holds a literal backslash-x sequence; such a
    collision is refused as a duplicate key by the source.
    """
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        pass
    try:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return key.encode("utf-8", "backslashreplace").decode("utf-8")


def dataset_fingerprint(keys: Iterable[str]) -> str:
    """sha256 (hex) of the ordered source keys, each as `escape_key` writes it, joined by newlines."""
    return hashlib.sha256("\n".join(escape_key(k) for k in keys).encode("utf-8")).hexdigest()


def package_version() -> str:
    """Installed version of the irepa distribution, "0+unknown" when it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "0+unknown"
    try:
        return version("irepa")
    except PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry table (makes renames/creations durable); no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A unique temporary sibling name ending in .partial (swept on resume/finalize)."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, tmp: Path | None = None,
                sync_dir: bool = True) -> Iterator[BinaryIO]:
    """Write `path` atomically: yield a file opened on a temporary sibling (`tmp`, default
    `temp_name(path)`); on success fsync it, rename it over `path` and fsync the directory.
    On any error the temporary is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or temp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if sync_dir:
        fsync_dir(path.parent)


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> None:
    """``numpy.savez`` written atomically (temporary name, fsync, rename, fsync the directory)."""
    import numpy as np

    with atomic_open(path) as f:
        np.savez(f, **arrays)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes under a temporary name, fsync, rename over `path`, fsync the directory."""
    with atomic_open(path) as f:
        f.write(data)


def dumps_json(obj: Any) -> bytes:
    """Canonical JSON bytes used for every store file (stable order given stable input)."""
    try:
        text = json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False)
    except ValueError as e:
        raise StoreError(f"cannot write non-finite number into store JSON: {e}") from e
    return (text + "\n").encode("ascii")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as JSON (see atomic_write_bytes)."""
    atomic_write_bytes(path, dumps_json(obj))


def read_json(path: Path, what: str) -> Any:
    """Load a JSON file, turning every failure into a StoreError naming the file."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{what}: {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{what}: {path} is not valid JSON ({e})") from None


def num_shards_for(num_rows: int, shard_size: int) -> int:
    return (num_rows + shard_size - 1) // shard_size


def shard_range(shard: int, num_rows: int, shard_size: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, num_rows))


def shard_record_name(shard: int) -> str:
    return f"{PROGRESS_DIR}/shard-{shard:06d}.json"


# --------------------------------------------------------------------------- validation


def _check(cond: bool, store: Path, msg: str) -> None:
    if not cond:
        raise StoreError(f"store {store}: manifest.json {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_manifest(m: Any, store: Path) -> dict:
    """Check a manifest against format versions 1 and 2; raise StoreError naming the bad field.
    Fields it does not know are kept."""
    _check(isinstance(m, dict), store, "must hold a JSON object")
    _check("format_version" in m, store, "has no 'format_version'; this is not an irepa store")
    fv = m["format_version"]
    _check(
        _is_int(fv) and fv in READ_VERSIONS,
        store,
        f"has format_version {fv!r}; this irepa reads format versions {' and '.join(map(str, READ_VERSIONS))}",
    )
    required = [
        "format", "state", "package_version", "num_rows", "num_samples", "shard_size",
        "num_shards", "dataset", "image", "vae", "latent_stats", "latents_from", "encoders",
        "arrays", "flip", "shards", "skipped", "build_args",
    ]
    missing = [k for k in required if k not in m]
    _check(not missing, store, f"lacks required field(s) {missing}")
    _check(m["format"] in FORMATS, store, f"field 'format' must be one of {FORMATS}, got {m['format']!r}")
    _check(m["state"] in STATES, store, f"field 'state' must be one of {STATES}, got {m['state']!r}")
    _check(_is_int(m["num_rows"]) and m["num_rows"] >= 0, store,
           f"field 'num_rows' must be an int >= 0, got {m['num_rows']!r}")
    _check(_is_int(m["shard_size"]) and m["shard_size"] > 0, store,
           f"field 'shard_size' must be a positive int, got {m['shard_size']!r}")
    ns = num_shards_for(m["num_rows"], m["shard_size"])
    _check(m["num_shards"] == ns, store,
           f"field 'num_shards' is {m['num_shards']!r} but num_rows/shard_size give {ns}")
    _check(isinstance(m["dataset"], dict) and isinstance(m["dataset"].get("fingerprint"), str),
           store, "field 'dataset' must be an object with a string 'fingerprint'")
    _check(isinstance(m["image"], dict), store, "field 'image' must be an object")
    _check(m["vae"] is None or isinstance(m["vae"], dict), store, "field 'vae' must be an object or null")
    lf = m["latents_from"]
    _check(lf is None or (isinstance(lf, dict) and isinstance(lf.get("path"), str)
                          and isinstance(lf.get("fingerprint"), str)),
           store, "field 'latents_from' must be null or {path, fingerprint}")
    _check(isinstance(m["flip"], bool), store, "field 'flip' must be true or false")
    _check(isinstance(m["encoders"], dict), store, "field 'encoders' must be an object")
    for name, e in m["encoders"].items():
        _check(isinstance(e, dict), store, f"encoders.{name} must be an object")
        for k in ("token_grid", "dim", "feature_dtype", "member"):
            _check(k in e, store, f"encoders.{name} lacks '{k}'")
        _check(isinstance(e["token_grid"], list) and len(e["token_grid"]) == 2
               and all(_is_int(v) and v > 0 for v in e["token_grid"]), store,
               f"encoders.{name}.token_grid must be [h, w] of positive ints, got {e['token_grid']!r}")
        _check(_is_int(e["dim"]) and e["dim"] > 0, store, f"encoders.{name}.dim must be a positive int")
        _check(e["feature_dtype"] in FEATURE_DTYPES, store,
               f"encoders.{name}.feature_dtype must be one of {FEATURE_DTYPES}, got {e['feature_dtype']!r}")
    _check(isinstance(m["arrays"], dict), store, "field 'arrays' must be an object")
    for name, a in m["arrays"].items():
        _check(isinstance(a, dict) and isinstance(a.get("shape"), list) and isinstance(a.get("dtype"), str),
               store, f"arrays.{name} must be {{shape: [...], dtype: str}}")
        _check(a["shape"][:1] == [m["num_rows"]], store,
               f"arrays.{name} has {a['shape'][:1]} rows, expected num_rows {m['num_rows']}")
    _check(isinstance(m["skipped"], list), store, "field 'skipped' must be a list")
    _check(isinstance(m["shards"], list), store, "field 'shards' must be a list")
    if m["state"] == "complete":
        _check(_is_int(m["num_samples"]), store, "field 'num_samples' must be an int in a complete store")
        _check(len(m["shards"]) == ns, store,
               f"lists {len(m['shards'])} shards, expected {ns}")
        for i, s in enumerate(m["shards"]):
            _check(isinstance(s, dict) and s.get("id") == i and isinstance(s.get("files"), dict),
                   store, f"shards[{i}] must be {{id: {i}, rows, files, num_skipped}}")
        for s in m["skipped"]:
            _check(isinstance(s, dict) and _is_int(s.get("row")) and 0 <= s["row"] < m["num_rows"],
                   store, f"skipped entry {s!r} must be {{row, key, reason}} with a row in range")
        _check(m["num_samples"] == m["num_rows"] - len(m["skipped"]), store,
               f"num_samples {m['num_samples']} != num_rows {m['num_rows']} - {len(m['skipped'])} skipped")
    return m


def read_manifest(store: str | os.PathLike) -> dict:
    """Read and validate `<store>/manifest.json`."""
    store = Path(store)
    p = store / MANIFEST_NAME
    if not p.exists():
        if not store.exists():
            raise StoreError(f"store {store}: directory does not exist")
        hint = (f"; its shard completion records are there: rerun the build command (with --repair) to rebuild "
                f"it" if (store / PROGRESS_DIR).is_dir() else "; not an irepa store (or its build never started)")
        raise StoreError(f"store {store}: no {MANIFEST_NAME}{hint}")
    try:
        return validate_manifest(read_json(p, f"store {store}"), store)
    except StoreError as e:
        if (store / PROGRESS_DIR).is_dir() and "format_version" not in str(e):
            raise StoreError(f"{e}; `irepa-cache build ... --repair` (the same build command) rebuilds it from the "
                             "shard completion records") from None
        raise


def read_shard_records(store: Path, num_shards: int) -> dict[int, dict]:
    """Completion records present under _progress/, by shard id."""
    out: dict[int, dict] = {}
    d = store / PROGRESS_DIR
    if not d.is_dir():
        return out
    for name in sorted(os.listdir(d)):
        m = re.fullmatch(r"shard-(\d{6,})\.json", name)
        if not m or int(m.group(1)) >= num_shards:
            continue
        s = int(m.group(1))
        p = d / name
        rec = read_json(p, f"store {store}: shard {s} completion record")
        if not isinstance(rec, dict) or rec.get("id") != s or not isinstance(rec.get("files"), dict):
            raise StoreError(f"store {store}: completion record {p} is malformed")
        out[s] = rec
    return out
