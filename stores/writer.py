"""StoreWriter: create or resume a store, write shards atomically, finalize the manifest.

Protocol (see docs/ARCHITECTURE.md): `StoreWriter.open(...)` creates the store (arrays metadata,
then manifest with state "building") or, on resume, checks that the existing manifest describes
the same build. Each `write_shard` writes one shard's files, fsyncs them, then atomically writes
`_progress/shard-XXXXXX.json` (checksums, skipped rows, latent channel sums). `finalize()`
aggregates the records into the manifest and sets state "complete".

Several processes (torchrun ranks) may write disjoint shards of one store. Let rank 0 call
`open` first and the others after a barrier (with lock=False: they share rank 0's lock); only
rank 0 calls `finalize`, after all are done.

`open` takes the store's build lock (`lock.StoreLock`, held until `finalize` or process exit),
so a second build on the same directory fails at once naming the first. When the directory
holds completion records but no manifest (deleted, or removed by `repair_store` because it was
truncated or invalid), `open` rebuilds the manifest from the records of this build (each record
carries the build's id) after checking their files (see `repair.recover_manifest`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .backends import get_backend
from .errors import StoreError
from .layout import StoreLayout, quantize_int8, token_grid_for, wds_member_names
from .lock import LOCK_NAME, StoreLock
from .manifest import (
    FORMAT_VERSION, FORMATS, MANIFEST_NAME, PARTIAL_SUFFIX, PROGRESS_DIR, atomic_write_json,
    dataset_fingerprint, escape_key, fsync_dir, package_version, read_json, read_manifest,
    read_shard_records, sha256_file, shard_range, shard_record_name, validate_manifest,
)

INFO_KEYS = ("dataset", "image", "vae", "encoders", "build_args", "latents_from")
# manifest fields the writer computes; any other info field is kept in the manifest as given
_COMPUTED = ("format_version", "format", "state", "package_version", "num_rows", "num_samples", "shard_size",
             "num_shards", "latent_shape", "latent_dtype", "latent_stats", "arrays", "flip", "shards", "skipped",
             "meta_files", "pixels")
# Fields a resumed build may differ in without changing what the shards hold; the stored values win.
_RESUME_IGNORED = {"state", "num_samples", "latent_stats", "shards", "skipped", "build_args",
                   "package_version", "meta_files"}
# where the data lives may change between a crash and the rerun (a remount, a copy to local disk);
# what it is, is pinned by the dataset fingerprint
_RESUME_IGNORED_PATHS = ("dataset.source", "dataset.root", "dataset.shards", "dataset.list_file")


def build_id(manifest: dict) -> str:
    """sha256 of what a build is: the manifest without the fields a resumed build may differ in
    (`_RESUME_IGNORED`, `_RESUME_IGNORED_PATHS`). Completion records carry it, so records of
    another build are never taken for this one's."""
    m = {k: v for k, v in manifest.items() if k not in _RESUME_IGNORED}
    ds = dict(m.get("dataset") or {})
    for p in _RESUME_IGNORED_PATHS:
        ds.pop(p.split(".", 1)[1], None)
    m["dataset"] = ds
    import hashlib
    import json

    return hashlib.sha256(json.dumps(m, sort_keys=True, ensure_ascii=True).encode("ascii")).hexdigest()


def labels_fingerprint(labels: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            p = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(p)
            else:
                out += _diff(a[k], b[k], p)
        return out
    return [] if a == b else [path or "<root>"]


def _short(v: Any, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _lookup(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<absent>"
        d = d[k]
    return d


def format_ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


def _jsonable(x: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python, so manifests compare equal after a JSON round trip."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def _allowed_entry(name: str) -> bool:
    return (
        name in (MANIFEST_NAME, PROGRESS_DIR, LOCK_NAME, "zarr.json", "labels", "keys", "latents", "features",
                 "feature_scales", "cls", "flip", "pixels")
        or name.endswith(PARTIAL_SUFFIX)
        or (name.startswith("shard-") and name.endswith(".tar"))
    )


class StoreWriter:
    """Writes one store; see the module docstring for the protocol."""

    def __init__(self, path: Path, manifest: dict, layout: StoreLayout, keys: list[str],
                 labels: np.ndarray, lock: StoreLock | None = None):
        self.path = path
        self.manifest = manifest
        self.layout = layout
        self.format = manifest["format"]
        self.backend = get_backend(self.format)
        self.format_version = int(manifest["format_version"])
        self.build = build_id(manifest)
        self.keys = keys
        self.labels = labels
        self.members = {n: e["member"] for n, e in manifest["encoders"].items()}
        self.lock = lock

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, path: str | os.PathLike, format: str, layout: StoreLayout, keys: Sequence[str],
             labels: Sequence[int] | np.ndarray, info: dict | None = None, resume: bool = True,
             overwrite: bool = False, lock: bool = True) -> "StoreWriter":
        """Create the store at `path`, or resume the build already there.

        resume=False refuses an existing store unless overwrite=True, which deletes it first.
        On resume the existing manifest must describe the same build (dataset fingerprint, layout,
        provenance); otherwise StoreError names every field that differs. A store written in an
        older format version is resumed in that version. Keys that are not valid UTF-8 text are
        kept as `manifest.escape_key` writes them.

        lock: take the store's build lock (see `lock.StoreLock`); torchrun ranks other than 0
        pass False and share rank 0's.
        """
        path = Path(path)
        if format not in FORMATS:
            raise StoreError(f"store {path}: format must be one of {FORMATS}, got {format!r}")
        keys = [escape_key(str(k)) for k in keys]
        labels_arr = np.asarray(labels)
        if len(keys) != layout.num_rows or len(labels_arr) != layout.num_rows:
            raise StoreError(
                f"store {path}: layout has {layout.num_rows} rows but got {len(keys)} keys and "
                f"{len(labels_arr)} labels"
            )
        if labels_arr.size and not np.issubdtype(labels_arr.dtype, np.integer):
            raise StoreError(f"store {path}: labels must be integers, got dtype {labels_arr.dtype}")
        labels_arr = labels_arr.astype(np.int64)
        bad = [k for k in keys if "\n" in k]
        if bad:
            raise StoreError(f"store {path}: source key {bad[0]!r} contains a newline")
        expected = cls._building_manifest(path, format, layout, keys, labels_arr, info or {})
        held = StoreLock.acquire(path) if lock else None
        try:
            return cls._open_locked(path, format, layout, keys, labels_arr, info or {}, expected, resume,
                                    overwrite, held)
        except BaseException:
            if held is not None:
                held.release()
            raise

    @classmethod
    def _open_locked(cls, path: Path, format: str, layout: StoreLayout, keys: list[str], labels_arr: np.ndarray,
                     info: dict, expected: dict, resume: bool, overwrite: bool,
                     held: StoreLock | None) -> "StoreWriter":
        backend = get_backend(format)
        if layout.pixel_hw is not None and layout.pixel_codec not in backend.pixel_codecs:
            raise StoreError(f"store {path}: pixel codec {layout.pixel_codec!r} is not available in the {format} "
                             f"backend (it has {', '.join(backend.pixel_codecs)})")
        mpath = path / MANIFEST_NAME
        if mpath.exists() and overwrite:
            _clear_dir(path)
        elif mpath.exists():
            if not resume:
                raise StoreError(
                    f"store {path} already exists and resume is off (--noresume never overwrites): rerun without "
                    "--noresume to finish it, or delete the folder to start over"
                )
            existing = read_manifest(path)
            version = int(existing["format_version"])
            if version != expected["format_version"]:  # an older store: resume it in its own format
                expected = cls._building_manifest(path, format, layout, keys, labels_arr, info, version)
            diffs = [d for d in _diff(existing, expected) if d.split(".")[0] not in _RESUME_IGNORED
                     and not d.startswith(_RESUME_IGNORED_PATHS)]
            if diffs:
                lines = [f"  {d}: store has {_short(_lookup(existing, d))}, this build has "
                         f"{_short(_lookup(expected, d))}" for d in diffs[:12]]
                more = f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
                raise StoreError(
                    f"store {path} was started by a different build and cannot be resumed; "
                    f"differing fields:\n" + "\n".join(lines) + more
                    + "\nUse another --out, or --overwrite to delete this store and build it again."
                )
            backend.create(path, layout, version)  # idempotent: only fills in what is somehow absent
            (path / PROGRESS_DIR).mkdir(exist_ok=True)
            return cls(path, existing, layout, keys, labels_arr, held)

        if path.exists():
            foreign = sorted(n for n in os.listdir(path) if not _allowed_entry(n))
            if foreign:
                raise StoreError(
                    f"store {path}: directory exists, has no {MANIFEST_NAME} and holds other files "
                    f"({', '.join(foreign[:5])}); refusing to write a store into it"
                )
        path.mkdir(parents=True, exist_ok=True)
        from .repair import recover_manifest, sync_meta

        meta = sync_meta(path, backend, layout, int(expected["format_version"]))
        expected["meta_files"] = {rel: sha256_file(path / rel) for rel in meta}
        (path / PROGRESS_DIR).mkdir(exist_ok=True)
        if any((path / PROGRESS_DIR).glob("shard-*.json")):  # a store whose manifest is gone
            recover_manifest(path, backend, layout, expected, build_id(expected))
        atomic_write_json(mpath, expected)
        return cls(path, read_manifest(path), layout, keys, labels_arr, held)

    @staticmethod
    def _building_manifest(path: Path, format: str, layout: StoreLayout, keys: list[str],
                           labels: np.ndarray, info: dict, format_version: int = FORMAT_VERSION) -> dict:
        clash = sorted(set(info) & set(_COMPUTED))
        if clash:
            raise StoreError(f"store {path}: info field(s) {clash} are computed by the writer; pass "
                             f"{list(INFO_KEYS)} and any new field of your own")
        info = _jsonable(info)
        fp = dataset_fingerprint(keys)
        dataset = dict(info.get("dataset") or {})
        if "fingerprint" in dataset and dataset["fingerprint"] != fp:
            raise StoreError(
                f"store {path}: info['dataset']['fingerprint'] {dataset['fingerprint']} does not match "
                f"the keys' fingerprint {fp}"
            )
        valid_labels = labels[labels >= 0]
        ds = {
            "source": dataset.pop("source", None),
            "fingerprint": fp,
            "labels_fingerprint": labels_fingerprint(labels),
            "num_classes": dataset.pop("num_classes", int(valid_labels.max()) + 1 if valid_labels.size else 0),
            "class_names": dataset.pop("class_names", None),
        }
        dataset.pop("fingerprint", None)
        ds.update(dataset)

        enc_info = dict(info.get("encoders") or {})
        extra = sorted(set(enc_info) - set(layout.encoders))
        if extra:
            raise StoreError(f"store {path}: info['encoders'] names {extra}, which the layout does not have")
        members = wds_member_names(list(layout.encoders))
        encoders = {}
        for name, (t, d) in layout.encoders.items():
            e = dict(enc_info.get(name) or {})
            if "dim" in e and int(e["dim"]) != d:
                raise StoreError(f"store {path}: encoder {name!r} info dim {e['dim']} != layout D {d}")
            if "feature_dtype" in e and e["feature_dtype"] != layout.feature_dtype:
                raise StoreError(f"store {path}: encoder {name!r} info feature_dtype {e['feature_dtype']!r} "
                                 f"!= layout {layout.feature_dtype!r}")
            grid = token_grid_for(name, t, e.get("token_grid"))
            entry = {
                "timm_id": e.pop("timm_id", None),
                "weights_sha256": e.pop("weights_sha256", None),
                "token_grid": grid,
                "num_tokens": t,
                "dim": d,
                "input_size": e.pop("input_size", None),
                "feature_dtype": layout.feature_dtype,
                "cls": bool(layout.with_cls),
                "member": members[name],
            }
            for k in ("token_grid", "dim", "feature_dtype", "cls", "member", "num_tokens"):
                e.pop(k, None)
            entry.update(e)
            encoders[name] = entry

        latents_from = info.get("latents_from")
        if not layout.has_latents and latents_from:
            raise StoreError(f"store {path}: info['latents_from'] is set but the layout has no latents "
                             "(latent_channels2=0)")
        if layout.write_latents and latents_from:
            raise StoreError(f"store {path}: info['latents_from'] is set but layout.write_latents is True")
        if layout.has_latents and not layout.write_latents:
            if not latents_from or not latents_from.get("path"):
                raise StoreError(
                    f"store {path}: layout.write_latents=False needs info['latents_from'] = "
                    "{'path': <store with the latents>}"
                )
            src = Path(latents_from["path"])
            src_abs = src if src.is_absolute() else Path(os.path.abspath(src))
            rel = os.path.relpath(src_abs, os.path.abspath(path))
            src_fp = latents_from.get("fingerprint")
            if (src_abs / MANIFEST_NAME).exists():
                sm = read_manifest(src_abs)
                got = sm["dataset"]["fingerprint"]
                if src_fp is not None and src_fp != got:
                    raise StoreError(f"store {path}: latents_from fingerprint {src_fp} != store {src_abs} "
                                     f"fingerprint {got}")
                src_fp = got
                if "latents" not in sm["arrays"] and sm.get("latents_from") is None:
                    raise StoreError(f"store {path}: latents_from store {src_abs} holds no latents")
            if src_fp is None:
                raise StoreError(f"store {path}: latents_from store {src_abs} has no manifest and no "
                                 "fingerprint was given")
            if src_fp != fp:
                raise StoreError(
                    f"store {path}: dataset fingerprint {fp} does not match latents_from store "
                    f"{src_abs} (fingerprint {src_fp}); the two builds enumerate different inputs"
                )
            latents_from = {"path": Path(rel).as_posix(), "fingerprint": src_fp}
        else:
            latents_from = None

        arrays = {n: {"shape": list(s), "dtype": dt} for n, (s, dt) in layout.array_specs().items()}
        extra = {k: v for k, v in info.items() if k not in INFO_KEYS}  # free-form fields of later versions
        if layout.pixel_hw is not None:  # absent (not null) otherwise: older stores' manifests stay as they were
            extra["pixels"] = {"shape": list(layout.pixel_shape), "dtype": "uint8", "order": "CHW",
                               "codec": layout.pixel_codec, "crop": (info.get("image") or {}).get("crop", "adm"),
                               "flip": "not stored: readers mirror the stored crop for the flipped view"}
        return {
            "format_version": format_version,
            "format": format,
            "state": "building",
            "package_version": package_version(),
            "num_rows": layout.num_rows,
            "num_samples": None,
            "shard_size": layout.shard_size,
            "num_shards": layout.num_shards,
            "dataset": ds,
            "image": info.get("image") or {},
            "vae": info.get("vae"),
            "latent_shape": list(layout.latent_shape) if layout.has_latents else None,
            "latent_dtype": layout.latent_dtype if layout.has_latents else None,
            "latent_stats": None,
            "latents_from": latents_from,
            "encoders": encoders,
            "arrays": arrays,
            "flip": bool(layout.flip),
            "shards": [],
            "skipped": [],
            "build_args": info.get("build_args") or {},
            "meta_files": {},
            **extra,
        }

    # ------------------------------------------------------------------ shards

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    def shard_rows(self, shard: int) -> range:
        """Rows [s*shard_size, min((s+1)*shard_size, num_rows)) of shard s."""
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"store {self.path}: shard {shard} out of range [0, {self.num_shards})")
        return shard_range(shard, self.layout.num_rows, self.layout.shard_size)

    def pending_shards(self) -> list[int]:
        """Shards without a completion record (re-read from disk, so other ranks' work counts)."""
        done = read_shard_records(self.path, self.num_shards)
        return [s for s in range(self.num_shards) if s not in done]

    def _input_names(self) -> list[str]:
        return [n for n in self.layout.array_specs() if n not in ("labels", "keys")]

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray],
                    skipped: Iterable[tuple[int, str]] = ()) -> dict:
        """Write shard `shard` (arrays hold the shard's rows first); returns its completion record.

        `skipped` lists (row, reason) with absolute rows inside the shard: those rows are stored
        zero-filled with label -1 (zarr) or left out (webdataset). int8 stores accept float
        features (quantised here) or int8 features plus `feature_scales/<enc>`.
        """
        rows = self.shard_rows(shard)
        n = len(rows)
        where = f"store {self.path} shard {shard} (rows {rows.start}-{rows.stop - 1})"
        specs = self.layout.array_specs()
        expected = self._input_names()
        optional = {x for x in expected if "feature_scales/" in x}
        got = set(arrays)
        missing = sorted(set(expected) - got - optional)
        unknown = sorted(got - set(expected))
        if missing or unknown:
            raise StoreError(f"{where}: arrays missing {missing}, unexpected {unknown}; expected {expected}")

        skip = {}
        for row, reason in skipped:
            row = int(row)
            if row not in rows:
                raise StoreError(f"{where}: skipped row {row} is not in this shard")
            skip[row] = str(reason)
        valid = np.array([r not in skip for r in rows], dtype=bool)

        data: dict[str, np.ndarray] = {}
        for name in expected:
            shape, dtype = specs[name]
            if name in optional and name not in arrays:
                continue
            a = np.asarray(arrays[name])
            if a.shape != (n, *shape[1:]):
                raise StoreError(f"{where}: array {name!r} has shape {a.shape}, expected {(n, *shape[1:])}")
            if not valid.all():  # skipped rows hold zeros whatever the caller passed
                a = a.copy()
                a[~valid] = 0
            if np.issubdtype(a.dtype, np.floating):
                self._check_finite(a, valid, name, where)
            if dtype == "uint8":  # pixels: the exact crop, never a converted float image
                if a.dtype != np.uint8:
                    raise StoreError(f"{where}: array {name!r} must be uint8 (the ADM crop as decoded), got {a.dtype}")
                data[name] = a
            elif name in optional:
                data[name] = a.astype(np.float32, copy=False)
                self._check_finite(data[name], valid, name, where)
            elif dtype == "int8" and a.dtype != np.int8:
                if not np.issubdtype(a.dtype, np.floating):
                    raise StoreError(f"{where}: array {name!r} must be float (quantised here) or int8")
                sname = name.replace("features/", "feature_scales/", 1)
                if sname in arrays:
                    raise StoreError(f"{where}: got float {name!r} and {sname!r}; pass float features "
                                     "(quantised here) or int8 features with their scales")
                q, sc = quantize_int8(a)
                data[name] = q
                data[sname] = sc
            else:
                if dtype == "int8" and name.replace("features/", "feature_scales/", 1) not in arrays:
                    raise StoreError(f"{where}: int8 array {name!r} needs its scales "
                                     f"{name.replace('features/', 'feature_scales/', 1)!r}")
                if dtype != "int8" and not np.issubdtype(a.dtype, np.floating):
                    raise StoreError(f"{where}: array {name!r} must be floating point, got {a.dtype}")
                data[name] = a.astype(dtype, copy=False)
                if dtype != "int8" and data[name].dtype != a.dtype:  # e.g. fp16 overflow
                    self._check_finite(data[name], valid, name, where)
        labels = self.labels[rows.start:rows.stop].copy()
        labels[~valid] = -1
        data["labels"] = labels
        data["keys"] = np.array(self.keys[rows.start:rows.stop], dtype=object)
        data = {k: data[k] for k in specs}  # fixed order

        sums = None
        if self.layout.stores_latents:
            lat = data["latents"][valid].astype(np.float64)
            c = self.layout.latent_channels2 // 2
            mean, std = lat[:, :c], lat[:, c:]
            sums = {
                "sum": mean.sum(axis=(0, 2, 3)).tolist(),
                "sum_sq": (mean * mean + std * std).sum(axis=(0, 2, 3)).tolist(),
                "count": int(valid.sum()) * self.layout.latent_hw[0] * self.layout.latent_hw[1],
            }

        rec_path = self.path / shard_record_name(shard)
        rec_path.unlink(missing_ok=True)  # a rewrite is incomplete until its new record lands
        files = self.backend.write_shard(self.path, self.layout, shard, rows, data, valid, self.members,
                                         self.format_version)
        record = {
            "id": shard,
            "rows": [rows.start, rows.stop],
            "files": files,
            "skipped": [{"row": r, "key": self.keys[r], "reason": skip[r]} for r in sorted(skip)],
            "latent_sums": sums,
        }
        if self.format_version >= 2:
            record["build"] = self.build
        atomic_write_json(rec_path, record)
        return record

    @staticmethod
    def _check_finite(a: np.ndarray, valid: np.ndarray, name: str, where: str) -> None:
        ok = np.isfinite(a.reshape(len(a), -1)).all(axis=1) | ~valid
        if not ok.all():
            bad = np.nonzero(~ok)[0][:5].tolist()
            raise StoreError(f"{where}: array {name!r} has NaN/inf in shard-relative row(s) {bad}")

    # ------------------------------------------------------------------ finalize

    def finalize(self) -> dict:
        """Aggregate every completion record into the manifest and mark the store complete."""
        ns = self.num_shards
        records = read_shard_records(self.path, ns)
        missing = [s for s in range(ns) if s not in records]
        if missing:
            raise StoreError(
                f"store {self.path}: cannot finalize, {len(missing)} of {ns} shard(s) have no completion "
                f"record: {format_ranges(missing)}"
            )
        for p in sorted(self.path.rglob(f"*{PARTIAL_SUFFIX}")):  # leftovers of interrupted writes
            p.unlink(missing_ok=True)
        m = validate_manifest(read_json(self.path / MANIFEST_NAME, f"store {self.path}"), self.path)
        shards, skipped = [], []
        c = self.layout.latent_channels2 // 2
        s1, s2, count = np.zeros(c), np.zeros(c), 0
        for s in range(ns):
            rec = records[s]
            rows = self.shard_rows(s)
            if rec.get("rows") != [rows.start, rows.stop]:
                raise StoreError(f"store {self.path}: record of shard {s} covers rows {rec.get('rows')}, "
                                 f"expected {[rows.start, rows.stop]}")
            shards.append({"id": s, "rows": rec["rows"], "files": rec["files"],
                           "num_skipped": len(rec["skipped"])})
            skipped += rec["skipped"]
            ls = rec.get("latent_sums")
            if ls:
                s1 += np.asarray(ls["sum"], dtype=np.float64)
                s2 += np.asarray(ls["sum_sq"], dtype=np.float64)
                count += int(ls["count"])
        stats = None
        if self.layout.stores_latents and count > 0:
            mean = s1 / count
            std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
            stats = {"mean": mean.tolist(), "std": std.tolist(), "count": count}
        elif m["latents_from"] is not None:
            src = (self.path / m["latents_from"]["path"])
            if (src / MANIFEST_NAME).exists():
                stats = read_manifest(src).get("latent_stats")
        m.update(
            state="complete",
            num_samples=self.layout.num_rows - len(skipped),
            latent_stats=stats,
            shards=shards,
            skipped=skipped,
        )
        validate_manifest(m, self.path)
        atomic_write_json(self.path / MANIFEST_NAME, m)
        self.manifest = m
        self.release()
        return m

    def release(self) -> None:
        """Give up the store's build lock (finalize does; a writer that stops early may)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _clear_dir(path: Path) -> None:
    """Delete everything in `path` but its lock file (overwrite=True keeps holding the lock)."""
    for entry in os.scandir(path):
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def reopen_shards(path: str | os.PathLike, shards: Iterable[int]) -> None:
    """Mark `shards` of a store as not done, so that a resumed build rewrites them (repair).

    The manifest goes back to state "building" first (readers refuse the store from then on),
    then the shards' completion records are removed; their data files are replaced when the
    build rewrites them.
    """
    path = Path(path)
    m = read_manifest(path)
    bad = sorted(set(int(s) for s in shards))
    out_of_range = [s for s in bad if not 0 <= s < m["num_shards"]]
    if out_of_range:
        raise StoreError(f"store {path}: no shard(s) {out_of_range}; it has {m['num_shards']}")
    if m["state"] != "building":
        atomic_write_json(path / MANIFEST_NAME, {**m, "state": "building"})
    for s in bad:
        (path / shard_record_name(s)).unlink(missing_ok=True)
    fsync_dir(path / PROGRESS_DIR)
