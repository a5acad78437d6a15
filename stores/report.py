"""verify_store (checksums, stray files) and describe_store (what is inside) for `irepa-cache verify/inspect`."""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import get_backend
from .errors import StoreError
from .lock import LOCK_NAME
from .manifest import MANIFEST_NAME, PARTIAL_SUFFIX, PROGRESS_DIR, read_manifest, read_shard_records, sha256_file


@dataclass
class VerifyReport:
    """Outcome of verify_store; `ok` is False for any bad file or an unfinished build."""

    path: Path
    state: str | None = None
    num_shards: int = 0
    shards_checked: int = 0
    files_checked: int = 0
    bad_shards: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # shard -> [(file, problem)]
    bad_meta: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # files the manifest does not list (relative paths)

    @property
    def ok(self) -> bool:
        return not (self.bad_shards or self.bad_meta or self.problems or self.stray)

    def format(self) -> str:
        lines = []
        head = f"store {self.path}: "
        if self.ok:
            return (head + f"OK ({self.shards_checked} shards, {self.files_checked} files, checksums match)")
        lines.append(head + "FAILED verification")
        lines += [f"  {p}" for p in self.problems]
        for s in sorted(self.bad_shards):
            for f, why in self.bad_shards[s]:
                lines.append(f"  bad shard {s}: {f}: {why}")
        for f, why in self.bad_meta:
            lines.append(f"  bad metadata file {f}: {why}")
        for f in self.stray:
            lines.append(f"  stray file {f}: not listed in the manifest (irepa-cache build --repair removes it)")
        lines.append(f"  checked {self.shards_checked} of {self.num_shards} shards, {self.files_checked} files")
        return "\n".join(lines)


def _check_files(root: Path, files: dict[str, str], workers: int = 1, bar: Any = None) -> list[tuple[str, str]]:
    def check(item: tuple[str, str]) -> tuple[str, str] | None:
        rel, want = item
        p = root / rel
        if not p.is_file():
            return (rel, "missing")
        got = sha256_file(p)
        if bar is not None:
            bar.update(p.stat().st_size)
        return None if got == want else (rel, f"sha256 {got[:16]}... != manifest {want[:16]}...")

    items = sorted(files.items())
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(workers) as ex:  # hashlib releases the GIL on large buffers
            results = list(ex.map(check, items))
    else:
        results = [check(i) for i in items]
    return [r for r in results if r is not None]


def verify_store(path: str | os.PathLike, workers: int | None = None, progress: bool = False) -> VerifyReport:
    """Recompute every file's sha256 against the manifest (or the shard records while unfinished),
    list files the manifest does not know, and check that a `--latents-from` store's latents
    store is where the manifest says with the recorded fingerprint.

    Files are hashed by `workers` threads (default: up to 8, one per CPU); `progress` shows a
    bar in bytes."""
    workers = workers or min(8, os.cpu_count() or 1)
    root = Path(path)
    rep = VerifyReport(path=root)
    try:
        m = read_manifest(root)
    except StoreError as e:
        rep.problems.append(str(e))
        return rep
    rep.state = m["state"]
    rep.num_shards = m["num_shards"]
    if m["state"] == "complete":
        shards = {s["id"]: s["files"] for s in m["shards"]}
    else:
        records = read_shard_records(root, m["num_shards"])
        shards = {s: r["files"] for s, r in records.items()}
        rep.problems.append(
            f"the build is unfinished (state 'building'): {len(records)} of {m['num_shards']} shards done"
        )
    owner = {rel: s for s, files in shards.items() for rel in files}
    all_files = {rel: want for files in shards.values() for rel, want in files.items()}
    meta = m.get("meta_files") or {}
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum((root / rel).stat().st_size for rel in [*all_files, *meta] if (root / rel).is_file())
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {root.name}", leave=False)
    try:
        for rel, why in _check_files(root, all_files, workers, bar):
            rep.bad_shards.setdefault(owner[rel], []).append((rel, why))
        rep.bad_meta = _check_files(root, meta, workers, bar)
    finally:
        if bar is not None:
            bar.close()
    rep.bad_shards = dict(sorted(rep.bad_shards.items()))
    rep.files_checked += len(all_files)
    rep.shards_checked = len(shards)
    rep.files_checked += len(meta)
    rep.stray = find_strays(root, m)
    lf = m.get("latents_from")
    if lf:
        rep.problems += latents_source_problems(root, lf)
    return rep


def latents_source_problems(root: Path, lf: dict) -> list[str]:
    """What is wrong with the store a `--latents-from` store reads its latents from: missing,
    or holding other data than the fingerprint the manifest recorded."""
    src = root / lf["path"]
    hint = f"if it moved: irepa-cache relink {root} --latents-from NEW_PATH"
    if not (src / "manifest.json").is_file():
        return [f"its latents live in store {src.resolve()} (recorded as {lf['path']!r}), which does not exist or has "
                f"no manifest; {hint}"]
    try:
        got = read_manifest(src)["dataset"]["fingerprint"]
    except StoreError as e:
        return [f"its latents store {src.resolve()} cannot be read: {e}"]
    if got != lf["fingerprint"]:
        return [f"its latents store {src.resolve()} holds other data (fingerprint {got[:16]}..., recorded "
                f"{lf['fingerprint'][:16]}...); {hint}"]
    return []


def find_strays(root: Path, m: dict) -> list[str]:
    """Files under a store that its manifest does not list: not the manifest, the build lock, a
    completion record, a metadata file or a listed shard file (while a build is unfinished, also
    not a file a pending shard may have, nor a temporary)."""
    backend = get_backend(m["format"])
    ns = m["num_shards"]
    complete = m["state"] == "complete"
    if complete:
        listed = {rel for s in m["shards"] for rel in s["files"]}
    else:
        listed = {rel for r in read_shard_records(root, ns).values() for rel in r["files"]}
    listed |= set(m.get("meta_files") or {})
    out = []
    record = re.compile(re.escape(PROGRESS_DIR) + r"/shard-(\d{6,})\.json")
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = (Path(dirpath) / f).relative_to(root).as_posix()
            if rel in listed or rel in (MANIFEST_NAME, LOCK_NAME):
                continue
            r = record.fullmatch(rel)
            if r and int(r.group(1)) < ns:
                continue
            if not complete and (rel.endswith(PARTIAL_SUFFIX) or backend.shard_of_file(rel, m["arrays"], ns) is not None):
                continue
            out.append(rel)
    return sorted(out)


def array_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk of each array of a store, from its backend (zarr: the array's chunk files;
    webdataset: its tar members with their headers; "checksums" and "other" where they apply)."""
    root = Path(path)
    m = read_manifest(root)
    return get_backend(m["format"]).array_bytes(root, m)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def describe_store(path: str | os.PathLike) -> dict:
    """Counts, arrays, bytes on disk, skipped inputs and provenance of a store (finished or not)."""
    root = Path(path)
    m = read_manifest(root)
    if m["state"] == "complete":
        done = m["num_shards"]
        skipped = m["skipped"]
    else:
        records = read_shard_records(root, m["num_shards"])
        done = len(records)
        skipped = sorted((s for r in records.values() for s in r["skipped"]), key=lambda s: s["row"])
    total = 0
    by_part: Counter = Counter()
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            size = p.stat().st_size
            total += size
            rel = p.relative_to(root).as_posix()
            if "/c/" in rel:  # a zarr chunk file
                by_part[rel.split("/c/")[0]] += size
            elif rel.endswith(".tar"):
                by_part["shards (tar)"] += size
            else:
                by_part["metadata"] += size
    n = m["num_samples"] if m["num_samples"] is not None else None
    ds = dict(m["dataset"])
    names = ds.pop("class_names", None)
    ds["num_class_names"] = len(names) if names else 0
    return {
        "path": str(root),
        "format": m["format"],
        "format_version": m["format_version"],
        "state": m["state"],
        "package_version": m["package_version"],
        "num_rows": m["num_rows"],
        "num_samples": n,
        "num_skipped": len(skipped),
        "shard_size": m["shard_size"],
        "num_shards": m["num_shards"],
        "shards_done": done,
        "arrays": m["arrays"],
        "flip": m["flip"],
        "bytes_total": total,
        "bytes_per_sample": (total / n) if n else None,
        "bytes_by_array": dict(sorted(by_part.items())),
        "skipped": skipped,
        "skipped_reasons": dict(Counter(s["reason"] for s in skipped).most_common()),
        "dataset": ds,
        "image": m["image"],
        "vae": m["vae"],
        "latent_stats": m["latent_stats"],
        "latents_from": m["latents_from"],
        "pixels": m.get("pixels"),
        # stores written before preprocessing profiles existed hold features of the encoders' native profile
        "encoders": {n: e if e.get("preprocess") else {**e, "preprocess": {"profile": "native"}}
                     for n, e in m["encoders"].items()},
        "build_args": m["build_args"],
        "read_checks": get_backend(m["format"]).read_checks(int(m["format_version"])),
    }


def format_description(d: dict, max_skipped: int = 10) -> str:
    """Human-readable text of describe_store's dict (what `irepa-cache inspect` prints)."""
    out: list[str] = []
    add = out.append
    add(f"store {d['path']}  ({d['format']}, format v{d['format_version']}, irepa {d['package_version']})")
    if d["state"] != "complete":
        add(f"  UNFINISHED build: {d['shards_done']} of {d['num_shards']} shards done")
    ns = d["num_samples"] if d["num_samples"] is not None else "?"
    add(f"  samples {ns} of {d['num_rows']} rows, {d['num_skipped']} skipped, "
        f"{d['num_shards']} shards of {d['shard_size']} rows, flip={d['flip']}")
    add("  arrays:")
    width = max((len(k) for k in d["arrays"]), default=0)
    for k, a in d["arrays"].items():
        add(f"    {k:<{width}}  {str(tuple(a['shape'])):<24} {a['dtype']}")
    if d["latents_from"]:
        add(f"    {'latents':<{width}}  read from {d['latents_from']['path']} (not stored here)")
    elif "latents" not in d["arrays"]:
        add(f"    {'latents':<{width}}  none (a pixel-only store, built with --vae none)")
    px = d.get("pixels")
    if px:
        add(f"  pixels: {px.get('crop', 'adm')} crop as the encoders saw it, uint8 "
            f"{px.get('order', 'CHW')}, codec {px.get('codec', 'none')}; flipped view mirrored on read, not stored")
    add(f"  read-time checks (format v{d['format_version']}):")
    for c in d.get("read_checks") or []:
        add(f"    - {c}")
    per = f", {_human(d['bytes_per_sample'])} per sample" if d["bytes_per_sample"] else ""
    add(f"  on disk: {_human(d['bytes_total'])}{per}")
    for k, v in d["bytes_by_array"].items():
        add(f"    {k}: {_human(v)}")
    if d["num_skipped"]:
        add(f"  skipped inputs ({d['num_skipped']}): " + ", ".join(f"{r} x{c}" for r, c in d["skipped_reasons"].items()))
        for s in d["skipped"][:max_skipped]:
            add(f"    row {s['row']}: {s['key']}: {s['reason']}")
        if d["num_skipped"] > max_skipped:
            add(f"    ... {d['num_skipped'] - max_skipped} more")
    add("  provenance:")
    add(f"    dataset: {_kv(d['dataset'])}")
    add(f"    image: {_kv(d['image'])}")
    no_latents = not d["latents_from"] and "latents" not in d["arrays"]
    add(f"    vae: {'none (no latents)' if no_latents and not d['vae'] else _kv(d['vae'])}")
    if d["latents_from"]:
        add(f"    latents from: {d['latents_from']['path']} (fingerprint {d['latents_from']['fingerprint'][:16]}...)")
    ls = d["latent_stats"]
    if ls:
        add(f"    latent stats over {ls['count']} positions: mean {_fmt(ls['mean'])} std {_fmt(ls['std'])}")
    for name, e in d["encoders"].items():
        pre = e.get("preprocess") or {"profile": "native"}
        add(f"    encoder {name}: {_kv({k: v for k, v in e.items() if k != 'preprocess'})}")
        add(f"      preprocess {pre['profile']}: " + (_kv({k: pre.get(k) for k in _PRE_KEYS}) or "(store built before profiles)"))
    if d["build_args"]:
        add(f"    build args: {_kv(d['build_args'])}")
    return "\n".join(out)


_PRE_KEYS = ("mean", "std", "input_size", "order", "interpolation", "antialias", "final_norm", "activation")


def _fmt(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"


def _kv(d: Any) -> str:
    if not isinstance(d, dict):
        return str(d)
    return ", ".join(f"{k}={v}" for k, v in d.items() if v is not None)
