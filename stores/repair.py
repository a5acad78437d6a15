"""Repairs: rebuild a lost manifest from the completion records, remove stray files, reopen
damaged shards (what `irepa-cache build --repair` does before it rewrites them).

A store's manifest can be rebuilt because it holds nothing the build command and the shard
completion records do not: the build command gives the building manifest (`StoreWriter.open`
computes it), and each record gives a shard's files, checksums, skipped rows and latent sums
plus the id of the build that wrote it (`writer.build_id`), so records of another build are
never trusted.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import StoreError
from .lock import StoreLock
from .manifest import (
    MANIFEST_NAME, PROGRESS_DIR, READ_VERSIONS, atomic_write_bytes, read_json, sha256_file, shard_range, shard_record_name,
    validate_manifest,
)


def _say(msg: str) -> None:
    print(msg, flush=True)


def sync_meta(path: Path, backend: Any, layout: Any, format_version: int) -> list[str]:
    """Create the backend's metadata files as this layout needs them; existing files that differ
    (from an interrupted build of another layout, or damaged) are rewritten. Returns their paths."""
    with tempfile.TemporaryDirectory(prefix="irepa-meta-") as tmp:
        fresh = backend.create(Path(tmp), layout, format_version)
        for rel in fresh:
            want = (Path(tmp) / rel).read_bytes()
            p = path / rel
            if p.is_file() and p.read_bytes() == want:
                continue
            if p.exists():
                _say(f"store {path}: metadata file {rel} differs from what this build writes; rewriting it")
            atomic_write_bytes(p, want)
    backend.create(path, layout, format_version)  # directories, and nothing else when all is in place
    return fresh


def _records(path: Path) -> dict[int, dict | None]:
    """Every completion record under _progress/ by shard (None: unreadable or malformed)."""
    out: dict[int, dict | None] = {}
    for p in sorted((path / PROGRESS_DIR).glob("shard-*.json")):
        m = re.fullmatch(r"shard-(\d{6,})\.json", p.name)
        if not m:
            continue
        s = int(m.group(1))
        try:
            rec = read_json(p, f"store {path}: completion record")
        except StoreError:
            rec = None
        ok = (isinstance(rec, dict) and rec.get("id") == s and isinstance(rec.get("files"), dict)
              and isinstance(rec.get("rows"), list) and isinstance(rec.get("skipped"), list))
        out[s] = rec if ok else None
    return out


def recover_manifest(path: Path, backend: Any, layout: Any, expected: dict, build: str) -> list[int]:
    """Make the completion records of a store without a manifest usable for `expected` (the
    building manifest of the build now running): refuse records of another build, drop (and
    say so) unreadable records and records whose files fail their sha256, so that the build
    rewrites those shards. Returns the shards whose records are kept."""
    ns = layout.num_shards
    records = _records(path)
    foreign = sorted(s for s, r in records.items() if r is not None and (s >= ns or r.get("build") != build))
    if foreign:
        from .writer import format_ranges

        raise StoreError(
            f"store {path}: has no usable {MANIFEST_NAME}, and the completion records of shard(s) "
            f"{format_ranges(foreign)} were written by a different build (or by a format 1 build, whose records "
            "cannot be matched); rerun the build command that started this store (with --repair), or delete the "
            "folder to start over"
        )
    kept = []
    for s, rec in sorted(records.items()):
        rec_path = path / shard_record_name(s)
        problem = None
        if rec is None:
            problem = f"its completion record {rec_path} is unreadable"
        else:
            rows = shard_range(s, layout.num_rows, layout.shard_size)
            if rec["rows"] != [rows.start, rows.stop]:
                problem = f"its completion record covers rows {rec['rows']}, not {[rows.start, rows.stop]}"
            for rel, want in sorted(rec["files"].items()):
                if problem:
                    break
                f = path / rel
                if not f.is_file():
                    problem = f"its file {rel} is missing"
                elif sha256_file(f) != want:
                    problem = f"its file {rel} fails its sha256"
        if problem:
            _say(f"store {path}: shard {s}: {problem}; it will be rewritten")
            rec_path.unlink(missing_ok=True)
        else:
            kept.append(s)
    _say(f"store {path}: rebuilding {MANIFEST_NAME} from the completion records of {len(kept)} of {ns} shard(s)")
    return kept


def _remove(path: Path, rels: list[str]) -> None:
    """Remove files (relative to `path`) and the directories they leave empty."""
    for rel in rels:
        f = path / rel
        f.unlink(missing_ok=True)
        d = f.parent
        while d != path and path in d.parents:
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent


def repair_store(path: str | os.PathLike) -> list[str]:
    """Make a store rebuildable by a rerun of its build (what `build --repair` runs first).

    - a truncated or invalid manifest.json is removed (with a message), as are files at the
      store's top level that no store holds; the build then rebuilds the manifest from the
      shard completion records (`StoreWriter.open`);
    - files the manifest does not list (stray shard files, junk) are removed after saying so;
    - shards whose files fail verification are reopened, so that the build rewrites them.
    Holds the store's build lock while it works. Returns what it said.
    """
    from .report import verify_store
    from .writer import _allowed_entry, reopen_shards

    path = Path(path)
    said: list[str] = []

    def say(msg: str) -> None:
        _say(f"repair: {msg}")
        said.append(msg)

    mp = path / MANIFEST_NAME
    if not mp.exists() and not (path / PROGRESS_DIR).is_dir():
        return said  # nothing was built here yet
    lock = StoreLock.acquire(path)
    try:
        damage: StoreError | None = None
        try:
            m = read_json(mp, f"store {path}")
        except StoreError as e:
            damage = e
        else:
            fv = m.get("format_version") if isinstance(m, dict) else None
            if isinstance(fv, int) and fv > max(READ_VERSIONS):  # a newer irepa's store: not ours to rewrite
                raise StoreError(f"store {path}: manifest.json has format_version {fv}, newer than this irepa "
                                 f"reads ({' and '.join(map(str, READ_VERSIONS))}); not repairing it")
            try:
                validate_manifest(m, path)
            except StoreError as e:
                damage = e
        if damage is not None:
            if mp.exists():
                say(f"{mp} is damaged ({str(damage).splitlines()[0]}); removing it: this build rebuilds it from the "
                    "shard completion records")
                mp.unlink()
            foreign = sorted(n for n in os.listdir(path) if not _allowed_entry(n) and (path / n).is_file())
            if foreign:
                say(f"removing {len(foreign)} file(s) of {path} that no store holds: {', '.join(foreign)}")
                _remove(path, foreign)
            return said
        report = verify_store(path)
        if report.stray:
            say(f"removing {len(report.stray)} file(s) of {path} the manifest does not list: "
                f"{', '.join(report.stray)}")
            _remove(path, report.stray)
        if report.bad_meta:
            files = ", ".join(f for f, _ in report.bad_meta)
            raise StoreError(f"store {path}: metadata file(s) {files} are damaged; --repair rewrites shards only: "
                             "delete the folder and build again")
        if report.bad_shards:
            print(f"repair: shard(s) {sorted(report.bad_shards)} of {path} fail verification; rewriting them",
                  flush=True)
            said.append(f"shard(s) {sorted(report.bad_shards)} fail verification")
            reopen_shards(path, report.bad_shards)
        return said
    finally:
        lock.release()


def relink_latents(path: str | os.PathLike, latents_from: str | os.PathLike) -> str:
    """Point a ``--latents-from`` store at its latents store's new place (after a move).

    The new store must hold the data the manifest recorded: the same dataset fingerprint, row
    count, shard size and resolution. Only ``latents_from.path`` changes (relative to the store,
    as the build writes it); the manifest is rewritten atomically. Returns the new relative path.
    """
    from .manifest import atomic_write_json, read_manifest

    root = Path(path)
    m = read_manifest(root)
    lf = m.get("latents_from")
    if not lf:
        raise StoreError(f"store {root} holds its own latents (it was not built with --latents-from); nothing to relink")
    src = Path(latents_from)
    try:
        sm = read_manifest(src)
    except StoreError as e:
        raise StoreError(f"--latents-from {src}: {e}") from None
    got = sm["dataset"]["fingerprint"]
    if got != lf["fingerprint"]:
        raise StoreError(f"--latents-from {src}: its dataset fingerprint {got[:16]}... is not the recorded "
                         f"{lf['fingerprint'][:16]}...; store {root} needs the latents of the data it was built from")
    for key in ("num_rows", "shard_size"):
        if sm[key] != m[key]:
            raise StoreError(f"--latents-from {src}: {key} {sm[key]} != {m[key]} of store {root}")
    r1, r2 = (sm.get("image") or {}).get("resolution"), (m.get("image") or {}).get("resolution")
    if r1 is not None and r2 is not None and r1 != r2:
        raise StoreError(f"--latents-from {src}: resolution {r1} != {r2} of store {root}")
    if sm.get("latents_from"):
        raise StoreError(f"--latents-from {src}: that store borrows its latents too; point at the store that holds them")
    rel = Path(os.path.relpath(src.resolve(), root.resolve())).as_posix()
    atomic_write_json(root / MANIFEST_NAME, {**m, "latents_from": {**lf, "path": rel}})
    return rel
