"""StoreReader: one reading interface over zarr and webdataset stores.

Sample index i in [0, len(store)) is the i-th valid row (skipped inputs excluded). Features come
back as float32 (int8 stores are dequantised), or as `features_dtype` where a method offers it
(float16 keeps an fp16 store's bytes as they are: loaders upcast on the device), latents as
float32 [2C, h, w]. A store built with `--latents-from` reads its latents from the store its
manifest points at, after checking that store's dataset fingerprint, row count and resolution.
A pixel-only store (`--vae none`) has no latents: `latent_shape` is None and no latents are read.

Pixel stores (`--pixels`) hold `pixels` uint8 [N, 3, H, W], the ADM crop the encoders saw, once:
where a flipped view is asked for (`get_batch(flip=...)`), the reader mirrors the stored crop
horizontally, which is the image the stored flipped features were computed from. `iter_shard`
samples carry the stored crop only (`"pixels"`); the trainer's loader mirrors it for the samples
whose flipped view it picks (`trainer.data.collate_samples`).

Every read is checked as far as the store's format allows (`read_checks` says how; format 2:
a crc32c for every byte handed out), and a file the manifest lists must exist. Damage raises
`DamagedData` (a StoreError) with one line naming the store, array or member, row and file; with
`on_damage="skip"` the damaged sample is left out instead and its message kept in `damaged`
(get_batch also returns the batch's messages under "damaged").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .backends import check_on_damage, get_backend
from .backends import wds as wds_backend
from .backends.zarr import ZarrArrays
from .errors import DamagedData, StoreError
from .layout import dequantize_int8
from .manifest import MANIFEST_NAME, read_manifest, read_shard_records, shard_range


def open_store(path: str | os.PathLike, verify_checksums: bool = False, allow_incomplete: bool = False,
               latents_from: str | os.PathLike | None = None, on_damage: str = "raise",
               read_checks: bool = True) -> "StoreReader":
    """Open a store for reading.

    verify_checksums recomputes every file's sha256 first (slow on big stores).
    allow_incomplete opens an unfinished build (for `inspect`): only finished shards are visible.
    latents_from overrides where the latents store of a `--latents-from` store lives.
    on_damage: "raise" (a damaged sample stops the read with a one-line DamagedData) or "skip"
    (it is left out and its message appended to `reader.damaged`).
    read_checks=False turns the read-time checksums off (only to measure what they cost).
    """
    path = Path(path)
    if verify_checksums:
        from .report import verify_store

        rep = verify_store(path)
        if not rep.ok:
            raise StoreError(rep.format())
    return StoreReader(path, allow_incomplete=allow_incomplete, latents_from=latents_from, on_damage=on_damage,
                       read_checks=read_checks)


class StoreReader:
    """Read access to a store; see docs/ARCHITECTURE.md for the contract."""

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False,
                 latents_from: str | os.PathLike | None = None, on_damage: str = "raise",
                 read_checks: bool = True):
        self.path = Path(path)
        m = read_manifest(self.path)
        self.manifest = m
        self.format: str = m["format"]
        self.backend = get_backend(self.format)
        self.format_version: int = int(m["format_version"])
        self.on_damage = check_on_damage(on_damage)
        #: one-line messages of the damaged samples left out so far (on_damage="skip")
        self.damaged: list[str] = []
        self.complete = m["state"] == "complete"
        ns = m["num_shards"]
        if self.complete:
            done = set(range(ns))
            skipped = [s["row"] for s in m["skipped"]]
            listed = {rel for s in m["shards"] for rel in s["files"]}
        else:
            records = read_shard_records(self.path, ns)
            if not allow_incomplete:
                raise StoreError(
                    f"store {self.path}: the build is unfinished (state 'building', {len(records)} of {ns} "
                    "shards done); rerun the same build command to resume it, then read the store"
                )
            done = set(records)
            skipped = [s["row"] for r in records.values() for s in r["skipped"]]
            listed = {rel for r in records.values() for rel in r["files"]}
        self._done_shards = done
        self._checks = bool(read_checks)
        self._member_checks = self._checks and self.format_version >= 2
        valid = np.zeros(m["num_rows"], dtype=bool)
        for s in sorted(done):
            r = shard_range(s, m["num_rows"], m["shard_size"])
            valid[r.start:r.stop] = True
        valid[np.asarray(skipped, dtype=np.int64)] = False
        self._valid = valid
        self._rows = np.flatnonzero(valid).astype(np.int64)

        enc = m["encoders"]
        self.encoders: list[str] = list(enc)
        self.feature_dims: dict[str, int] = {n: int(e["dim"]) for n, e in enc.items()}
        self.token_grids: dict[str, tuple[int, int]] = {n: tuple(e["token_grid"]) for n, e in enc.items()}
        self.token_grid: tuple[int, int] | None = self.token_grids[self.encoders[0]] if self.encoders else None
        self.feature_dtype: str | None = enc[self.encoders[0]]["feature_dtype"] if self.encoders else None
        self._cls_encoders = frozenset(n for n, e in enc.items() if e.get("cls"))  # those with CLS tokens
        self.with_cls: bool = bool(self._cls_encoders)
        self.num_shards: int = ns
        self._members = {n: e["member"] for n, e in enc.items()}
        state = self.backend.open_reader(self.path, m, listed, self._checks)
        self._za: ZarrArrays | None = state if self.backend.random_access else None
        self._labels: np.ndarray | None = None
        self._keys: np.ndarray | None = None
        self._bad_rows: dict[int, str] = {}  # rows whose labels/keys chunk is damaged (skip mode)
        self._tar_index: tuple[int, dict] | None = None

        # pixels (one copy; flipped views are mirrored on read)
        px = m["arrays"].get("pixels")
        #: (3, H, W) of the stored pixels, or None
        self.pixel_shape: tuple[int, int, int] | None = tuple(int(v) for v in px["shape"][1:]) if px else None
        #: how the pixel array is encoded ("none", "zstd", "png"); None without pixels
        self.pixel_codec: str | None = (m.get("pixels") or {}).get("codec", "none") if px else None
        self.has_flip: bool = bool(m["flip"])

        # where the latents live
        self._latent_source: StoreReader | None = None
        #: (2C, h, w) of the latents (posterior mean and std on channels), or None (a pixel-only store)
        self.latent_shape: tuple[int, int, int] | None = None
        if m["latents_from"] is not None:
            self._latent_source = self._open_latent_source(latents_from)
            self.latent_shape = self._latent_source.latent_shape
        elif "latents" in m["arrays"]:
            self.latent_shape = tuple(m["arrays"]["latents"]["shape"][1:])
        elif self.pixel_shape is None:
            raise StoreError(f"store {self.path}: manifest lists no 'latents' array, no latents_from and no pixels")

    # ------------------------------------------------------------------ latents_from

    def _open_latent_source(self, override: str | os.PathLike | None) -> "StoreReader":
        lf = self.manifest["latents_from"]
        src = Path(override) if override is not None else self.path / lf["path"]
        if not (src / MANIFEST_NAME).exists():
            raise StoreError(
                f"store {self.path}: its latents live in store {src} (latents_from {lf['path']!r}), "
                f"which does not exist or has no manifest; if it moved: irepa-cache relink {self.path} --latents-from NEW_PATH"
            )
        source = StoreReader(src, on_damage=self.on_damage, read_checks=self._checks)
        source.damaged = self.damaged  # one list of what was left out
        sm = source.manifest
        got = sm["dataset"]["fingerprint"]
        if got != lf["fingerprint"]:
            raise StoreError(
                f"store {self.path}: latents_from store {src} has dataset fingerprint {got}, but this "
                f"store expects {lf['fingerprint']}; they were built from different inputs"
            )
        mine = self.manifest["dataset"]["fingerprint"]
        if got != mine:
            raise StoreError(f"store {self.path}: dataset fingerprint {mine} != latents store {src} fingerprint {got}")
        if sm["num_rows"] != self.manifest["num_rows"] or sm["shard_size"] != self.manifest["shard_size"]:
            raise StoreError(
                f"store {self.path}: latents store {src} has {sm['num_rows']} rows / shard size "
                f"{sm['shard_size']}, this store {self.manifest['num_rows']} / {self.manifest['shard_size']}"
            )
        r1, r2 = sm["image"].get("resolution"), self.manifest["image"].get("resolution")
        if r1 is not None and r2 is not None and r1 != r2:
            raise StoreError(f"store {self.path}: resolution {r2} != latents store {src} resolution {r1}")
        lacking = self._valid & ~source._valid
        if lacking.any():
            rows = np.flatnonzero(lacking)[:5].tolist()
            raise StoreError(f"store {self.path}: rows {rows} are valid here but skipped in latents store {src}")
        if self.manifest["flip"] and not source.has_flip:
            raise StoreError(f"store {self.path}: has flipped features but latents store {src} has no flipped latents")
        return source

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return int(len(self._rows))

    def __repr__(self) -> str:
        px = f", pixels={self.pixel_shape}" if self.pixel_shape else ""
        return (f"StoreReader({str(self.path)!r}, format={self.format}, samples={len(self)}, "
                f"encoders={self.encoders}, flip={self.has_flip}{px})")

    @property
    def has_latents(self) -> bool:
        """Whether samples have latents (stored here or in the `--latents-from` store)."""
        return self.latent_shape is not None

    @property
    def has_pixels(self) -> bool:
        """Whether the store holds the ADM-cropped pixels (`irepa-cache build --pixels`)."""
        return self.pixel_shape is not None

    @property
    def rows(self) -> np.ndarray:
        """Store row of every sample index."""
        return self._rows

    @property
    def loader_kind(self) -> str:
        """The trainer's loader for this store: "index" (random access, `get_batch` per
        micro-batch) or "stream" (shards through a shuffle buffer)."""
        return self.backend.loader_kind

    @property
    def random_access(self) -> bool:
        """Whether `get_batch` (reads of arbitrary samples) works on this store."""
        return self.backend.random_access

    @property
    def read_checks(self) -> list[str]:
        """What every read of this store checks (depends on its backend and format version)."""
        return self.backend.read_checks(self.format_version) if self._checks else ["none (read_checks=False)"]

    def _skip(self) -> bool:
        return self.on_damage == "skip"

    @property
    def latent_stats(self) -> dict | None:
        return self.manifest.get("latent_stats")

    def row_to_index(self, row: int) -> int:
        """Sample index of a valid row."""
        i = int(np.searchsorted(self._rows, row))
        if i >= len(self._rows) or self._rows[i] != row:
            raise StoreError(f"store {self.path}: row {row} is skipped or not finished")
        return i

    def shard_sample_counts(self) -> list[int]:
        """Valid samples per shard (0 for unfinished shards of an incomplete store)."""
        m = self.manifest
        bounds = np.arange(0, m["num_shards"] + 1) * m["shard_size"]
        bounds[-1] = m["num_rows"]
        return np.diff(np.searchsorted(self._rows, bounds)).astype(int).tolist()

    def _need_zarr(self, what: str) -> ZarrArrays:
        if self._za is None:
            raise StoreError(
                f"store {self.path}: {what} needs random access, which the webdataset backend does not "
                "offer; iterate shards (iter_shard / iter_urls) or build a zarr store"
            )
        return self._za

    def _check_indices(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        bad = idx[(idx < -n) | (idx >= n)]
        if bad.size:
            raise IndexError(f"store {self.path}: sample index {int(bad[0])} out of range for {n} samples")
        return np.where(idx < 0, idx + n, idx)

    @property
    def labels(self) -> np.ndarray:
        """int64 label of every sample (random-access stores)."""
        return self._all_labels()[self._rows]

    def keys(self) -> list[str]:
        """Source key of every sample (random-access stores)."""
        return [str(k) for k in self._all_keys()[self._rows]]

    def _per_shard(self, name: str) -> np.ndarray:
        m = self.manifest
        bad: dict[int, str] | None = {} if self._skip() else None
        values = self._need_zarr(name).per_shard(name, m["num_rows"], m["shard_size"], bad)
        if bad:
            new = {r: msg for r, msg in bad.items() if r not in self._bad_rows}
            self._bad_rows.update(new)
            self.damaged.extend(dict.fromkeys(new.values()))
        return values

    def _all_keys(self) -> np.ndarray:
        if self._keys is None:
            self._keys = np.asarray(self._per_shard("keys"), dtype=object)
        return self._keys

    def _all_labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = self._per_shard("labels")
        return self._labels

    # ------------------------------------------------------------------ random access

    def _read_view(self, rows: np.ndarray, flip: bool, encoders: Sequence[str], with_latents: bool,
                   out: dict, sel: np.ndarray, bad: dict[int, str] | None) -> None:
        """Fill out[...][sel] with one read per array of these rows, in order. `bad` (skip mode)
        collects {batch position: message} of damaged rows instead of raising."""
        pre = "flip/" if flip else ""
        whole = len(sel) == len(out["index"])

        def read(za: ZarrArrays, name: str) -> np.ndarray:
            damaged: list[tuple[int, str]] | None = [] if bad is not None else None
            got = _read_rows(za, name, rows, damaged)
            for j, msg in damaged or ():
                bad.setdefault(int(sel[j]), msg)
            return got

        def put(d: dict, key: str, src: np.ndarray) -> None:
            if whole and src.dtype == d[key].dtype:
                d[key] = src  # the rows were read straight into a fresh array: no copy
            else:
                d[key][sel] = src

        if with_latents:
            src = self._latent_source._za if self._latent_source is not None else self._za
            if src is None:
                raise StoreError(f"store {self.path}: random access to latents needs a random-access latents store")
            put(out, "latents", read(src, f"{pre}latents"))
        for enc in encoders:
            f = read(self._za, f"{pre}features/{enc}")
            if f.dtype == np.int8:
                f = dequantize_int8(f, read(self._za, f"{pre}feature_scales/{enc}"))
            put(out["features"], enc, f)
            if enc in self._cls_encoders:
                put(out["cls"], enc, read(self._za, f"{pre}cls/{enc}"))

    def get_batch(self, indices: Sequence[int] | np.ndarray, flip: Sequence[bool] | np.ndarray | None = None,
                  encoders: Sequence[str] | None = None, with_latents: bool | None = None,
                  with_keys: bool = True, features_dtype: Any = np.float32,
                  with_pixels: bool | None = None) -> dict:
        """Samples `indices` as one batch (random-access stores).

        Returns {"index" int64[B], "label" int64[B], "key" list[str], "latents" float32[B, 2C, h, w],
        "features" {enc: float32[B, T, D]}} (+ "cls" {enc: float32[B, D]} when stored). `flip`
        (bool[B]) takes the stored flipped view where True. `encoders` limits the features read;
        `features_dtype=np.float16` skips the CPU upcast (about half the time of a batch) for
        loaders that convert on the GPU. With on_damage="skip", damaged samples are left out of
        every array and the batch has "damaged": [one-line message per sample left out].

        Pixel stores add "pixels" uint8 [B, 3, H, W]: the stored crop, mirrored horizontally
        where `flip` is True (the image the flipped features were computed from).
        `with_latents` / `with_pixels`: read them (True: the store must have them), skip them
        (False), or None (default): read them when the store has them.
        """
        self._need_zarr("get_batch")
        with_latents = self._want("latents", with_latents, self.has_latents, "was built with --vae none")
        with_pixels = self._want("pixels", with_pixels, self.has_pixels, "was built without --pixels")
        idx = self._check_indices(indices)
        rows = self._rows[idx]
        b = len(idx)
        fl = np.zeros(b, dtype=bool) if flip is None else np.asarray(flip, dtype=bool).reshape(-1)
        if fl.shape != (b,):
            raise StoreError(f"store {self.path}: flip has {fl.shape[0]} entries for {b} indices")
        if fl.any() and not self.has_flip:
            raise StoreError(f"store {self.path}: flipped views requested but the store was built without flip")
        encs = list(self.encoders if encoders is None else encoders)
        for e in encs:
            if e not in self.feature_dims:
                raise StoreError(f"store {self.path}: no encoder {e!r}; it has {self.encoders}")
        t = {e: int(np.prod(self.token_grids[e])) for e in encs}
        labels = self._all_labels()[rows].astype(np.int64)
        keys = [str(k) for k in self._all_keys()[rows]] if with_keys else []
        out: dict[str, Any] = {
            "index": idx,
            "row": rows,
            "label": labels,
            "key": keys,
            "features": {e: np.empty((b, t[e], self.feature_dims[e]), features_dtype) for e in encs},
        }
        if with_latents:
            out["latents"] = np.empty((b, *self.latent_shape), np.float32)
        cls_encs = [e for e in encs if e in self._cls_encoders]
        if cls_encs:
            out["cls"] = {e: np.empty((b, self.feature_dims[e]), np.float32) for e in cls_encs}
        bad: dict[int, str] | None = None
        if self._skip():
            bad = {j: self._bad_rows[int(r)] for j, r in enumerate(rows) if int(r) in self._bad_rows}
        for view in (False, True):
            sel = np.flatnonzero(fl == view)
            if len(sel):
                self._read_view(rows[sel], view, encs, with_latents, out, sel, bad)
        if with_pixels:
            out["pixels"] = self._read_pixels(rows, fl, bad)
        if bad is None:
            return out
        keep = np.ones(b, dtype=bool)
        keep[list(bad)] = False
        msgs = [bad[j] for j in sorted(bad)]
        self.damaged.extend(msgs)
        return _take(out, keep, msgs)

    def _want(self, what: str, asked: bool | None, present: bool, why: str) -> bool:
        if asked and not present:
            raise StoreError(f"store {self.path} holds no {what} (it {why})")
        return present if asked is None else bool(asked)

    def _read_pixels(self, rows: np.ndarray, flip: np.ndarray, bad: dict[int, str] | None) -> np.ndarray:
        """uint8 [B, 3, H, W] of these rows (one read, in order), mirrored where `flip`."""
        damaged: list[tuple[int, str]] | None = [] if bad is not None else None
        px = _read_rows(self._za, "pixels", rows, damaged)
        for j, msg in damaged or ():
            bad.setdefault(int(j), msg)
        if flip.any():
            px[flip] = px[flip][..., ::-1]
        return px

    def __getitem__(self, i: int) -> dict:
        """One sample (same keys as get_batch, without the batch dimension)."""
        if self.random_access:
            batch = self.get_batch([i])
            if self._skip() and len(batch["index"]) == 0:
                raise DamagedData(batch["damaged"][0])
            batch.pop("damaged", None)
            return _unbatch(batch)
        idx = int(self._check_indices([i])[0])
        return self._wds_sample(int(self._rows[idx]))

    # ------------------------------------------------------------------ sequential access

    def iter_shard(self, shard: int, features_dtype: Any = np.float32, lazy: bool = False,
                   with_latents: bool | None = None) -> Iterator[dict]:
        """Samples of one shard in row order (both backends).

        Each sample: index, row, label, key, latents, features{enc} (+ cls{enc}), and with flip
        latents_flip, features_flip{enc} (+ cls_flip{enc}); pixel stores add "pixels" (the stored
        crop only: a flipped view mirrors it). `with_latents=False` leaves latents out (a
        `--latents-from` store then never reads the other store). Features are `features_dtype`
        (np.float16: an fp16 store's arrays without conversion; int8 dequantises into it).
        webdataset shards are read with one read per sample (`wds_backend.iter_local`); their
        arrays may be views of that sample's buffer. The samples must be the shard's valid rows.
        Every sample is checked before it is yielded (see `read_checks`); on_damage="skip"
        leaves damaged samples out (and the rest of a shard whose tar structure is broken).

        lazy=True (webdataset stores; zarr returns arrays): the arrays are
        `wds_backend.LazyArray`s, only their headers read and checked; `.read()` gives the array
        the eager call gives (after checking its crc32c), `.read_into(out)` reads it straight
        into a batch.
        """
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"store {self.path}: shard {shard} out of range [0, {self.num_shards})")
        if shard not in self._done_shards:
            raise StoreError(f"store {self.path}: shard {shard} is not finished")
        with_latents = self._want("latents", with_latents, self.has_latents, "was built with --vae none")
        if self.random_access:
            yield from self._iter_zarr_shard(shard, features_dtype=features_dtype, with_latents=with_latents)
        else:
            p = self.shard_path(shard)
            it = self._decoded(wds_backend.iter_local(p, lazy=lazy), f"shard file {p}", features_dtype, lazy)
            it = self._check_rows(it, shard, p)
            yield from (self._with_source_latents(it, shard, lazy) if with_latents else _without_latents(it))

    def _decoded(self, raw: Iterator[tuple[str, dict]], where: str, features_dtype: Any,
                 lazy: bool = False) -> Iterator[dict]:
        """Decode (and check) raw samples; in skip mode damaged samples are recorded and left out,
        and a broken tar structure ends the shard."""
        while True:
            try:
                k, r = next(raw)
            except StopIteration:
                return
            except DamagedData as e:
                msg = str(e) if str(e).startswith("store ") else f"store {self.path}: {e}"
                if not self._skip():
                    raise DamagedData(msg) from None
                self.damaged.append(f"{msg}; the rest of this shard is skipped")
                return
            try:
                s = self.decode_sample(k, r, where=where, features_dtype=features_dtype, lazy=lazy)
            except DamagedData as e:
                if not self._skip():
                    raise
                self.damaged.append(str(e))
                continue
            yield s

    def _check_rows(self, it: Iterator[dict], shard: int, p: Path) -> Iterator[dict]:
        """Pass a shard's samples on, refusing any that are not its next valid row (a tar with a
        sample missing or extra would otherwise shift every index after it). In skip mode, rows
        may be missing (damaged samples left out), never out of order or extra."""
        m = self.manifest
        r = shard_range(shard, m["num_rows"], m["shard_size"])
        lo, hi = np.searchsorted(self._rows, [r.start, r.stop])
        want = self._rows[lo:hi]
        n = 0
        skip = self._skip()
        before = len(self.damaged)
        for s in it:
            if skip:
                while n < len(want) and want[n] < s["row"]:
                    n += 1
            if n >= len(want) or s["row"] != want[n]:
                exp = f"row {int(want[n])}" if n < len(want) else "no more samples"
                raise StoreError(f"store {self.path}: shard file {p} holds sample {s['key']!r} of row {s['row']} "
                                 f"where the manifest expects {exp}")
            n += 1
            yield s
        if n != len(want) and not (skip and len(self.damaged) > before):
            msg = (f"store {self.path}: shard file {p} holds {n} samples, the manifest expects "
                   f"{len(want)} (first missing row {int(want[n])})")
            if not skip:
                raise DamagedData(msg)
            self.damaged.append(msg)

    def _iter_zarr_shard(self, shard: int, block: int = 256, features_dtype: Any = np.float32,
                         with_latents: bool = True) -> Iterator[dict]:
        m = self.manifest
        r = shard_range(shard, m["num_rows"], m["shard_size"])
        lat_src = self._latent_source._za if self._latent_source is not None else self._za
        it = (s for start in range(r.start, r.stop, block)
              for s in self._zarr_block(start, min(start + block, r.stop), lat_src, features_dtype, with_latents))
        if with_latents and lat_src is None:  # latents from a webdataset store
            it = self._with_source_latents(it, shard)
        yield from it

    def _zarr_block(self, start: int, stop: int, lat_src: ZarrArrays | None,
                    features_dtype: Any = np.float32, with_latents: bool = True) -> list[dict]:
        """Samples of rows [start, stop): one read per array (a shard is read block by block)."""
        za = self._za
        views = [("", "")] + ([("flip/", "_flip")] if self.has_flip else [])
        data: dict[str, np.ndarray] = {}
        skip = self._skip()
        bad: dict[int, str] = {}

        def read(src: ZarrArrays, name: str) -> np.ndarray:
            damaged: list[tuple[int, str]] | None = [] if skip else None
            got = src.slice(name, start, stop, damaged)
            for j, msg in damaged or ():
                bad.setdefault(start + j, msg)
            return got

        if self.has_pixels:
            data["pixels"] = read(za, "pixels")
        for v, _ in views:
            if with_latents and lat_src is not None:
                data[f"{v}latents"] = read(lat_src, f"{v}latents")
            for e in self.encoders:
                f = read(za, f"{v}features/{e}")
                if f.dtype == np.int8:
                    f = dequantize_int8(f, read(za, f"{v}feature_scales/{e}"))
                data[f"{v}features/{e}"] = f
                if e in self._cls_encoders:
                    data[f"{v}cls/{e}"] = read(za, f"{v}cls/{e}")
        labels = self._all_labels()[start:stop]
        keys = self._all_keys()[start:stop]
        base = int(np.searchsorted(self._rows, start))
        samples = []
        for j, row in enumerate(range(start, stop)):
            if not self._valid[row]:
                continue
            index = base
            base += 1
            msg = bad.get(row) or self._bad_rows.get(row)
            if msg is not None:
                self.damaged.append(msg)
                continue
            s: dict[str, Any] = {"index": index, "row": row, "label": int(labels[j]), "key": str(keys[j])}
            if "pixels" in data:
                s["pixels"] = data["pixels"][j]
            for v, suf in views:
                if f"{v}latents" in data:
                    s[f"latents{suf}"] = data[f"{v}latents"][j].astype(np.float32)
                s[f"features{suf}"] = {e: data[f"{v}features/{e}"][j].astype(features_dtype) for e in self.encoders}
                cls = {e: data[f"{v}cls/{e}"][j].astype(np.float32) for e in self.encoders
                       if f"{v}cls/{e}" in data}
                if cls:
                    s[f"cls{suf}"] = cls
            samples.append(s)
        return samples

    def _with_source_latents(self, it: Iterator[dict], shard: int, lazy: bool = False) -> Iterator[dict]:
        if self._latent_source is None:
            yield from it
            return
        src = self._latent_source.iter_shard(shard, lazy=lazy)
        yield from _zip_latents(it, src, self.path, self._skip())

    # ------------------------------------------------------------------ webdataset specifics

    def shard_path(self, shard: int) -> Path:
        return self.path / wds_backend.shard_name(shard)

    def shard_urls(self, template: str | None = None) -> list[str]:
        """Shard locations for webdataset: local paths, or `template.format(name=..., shard=...)`,
        e.g. "pipe:aws s3 cp s3://bucket/store/{name} -" for a store that lives elsewhere."""
        if self.random_access:
            raise StoreError(f"store {self.path}: shard_urls is for streaming (webdataset) stores; this one is "
                             f"{self.format}")
        names = [wds_backend.shard_name(s) for s in range(self.num_shards)]
        if template is None:
            return [str(self.path / n) for n in names]
        return [template.format(name=n, shard=i) for i, n in enumerate(names)]

    def iter_urls(self, urls: Sequence[str], latents_urls: Sequence[str] | None = None,
                  features_dtype: Any = np.float32) -> Iterator[dict]:
        """Stream samples from shard URLs with webdataset (e.g. `pipe:` URLs from shard_urls);
        URLs naming local files (plain paths, `file:`) take the one-read-per-sample local path.

        For a `--latents-from` store pass the latents store's URLs for the same shards."""
        it = self._iter_url_samples(urls, features_dtype)
        if self._latent_source is None:
            yield from it
            return
        if latents_urls is None:
            raise StoreError(f"store {self.path}: its latents live in another store; pass latents_urls")
        yield from _zip_latents(it, self._latent_source._iter_url_samples(latents_urls, features_dtype), self.path,
                                self._skip())

    def _iter_url_samples(self, urls: Sequence[str], features_dtype: Any) -> Iterator[dict]:
        for u in urls:
            local = wds_backend.is_local_url(u)
            raw = wds_backend.iter_local(Path(local)) if local else wds_backend.iter_urls([u])
            where = f"shard file {local}" if local else f"webdataset stream {u}"
            yield from self._decoded(raw, where, features_dtype)

    def decode_sample(self, key: str, raw: dict[str, Any], where: str = "", features_dtype: Any = np.float32,
                      lazy: bool = False) -> dict:
        """Turn one webdataset sample ({suffix: bytes or uint8 array}) into the reader's sample dict.

        npy members are decoded as views of their bytes (no copy where the dtype is already the
        one returned: fp16 features with features_dtype=np.float16, float32 latents). Members
        given as `wds_backend.LazyArray`s stay lazy (with the same dtypes when read).

        Format 2 stores: every member's crc32c is checked against the sample's
        `<key>.crc32c.json` (lazy members when they are read); damage raises DamagedData.
        Pixels: `<key>.pixels.npy` like the other arrays, or `<key>.pixels.png` decoded after its
        checksum (lazy: a `wds_backend.PngPixels` decoded when the batch reads it)."""
        base = f"store {self.path}: {where}" if where else f"store {self.path}:"
        where = f"store {self.path} {where} sample {key}"
        try:
            row = int(key)
        except ValueError:
            raise DamagedData(f"{where}: key is not a row number") from None
        sums = wds_backend.sample_sums(key, raw, base) if self._member_checks else None

        def take(suffix: str) -> Any:
            if suffix not in raw:
                raise DamagedData(f"{where} (row {row}): member '{key}.{suffix}' is missing")
            return raw[suffix]

        def npy(suffix: str) -> Any:
            v = take(suffix)
            if isinstance(v, wds_backend.NpyRef):
                return v if sums is None else v.expect(sums[suffix])
            if isinstance(v, wds_backend.LazyArray):
                return v
            return wds_backend.load_npy(v, f"{where} member '{key}.{suffix}'")

        try:
            label = int(bytes(take("cls")).decode("ascii"))
            text = bytes(take("key.txt")).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as e:
            if sums is not None:  # a damaged byte: name the member whose checksum fails
                wds_backend.check_members(key, raw, sums, base)
            raise DamagedData(f"{where} (row {row}): member '{key}.cls' or '{key}.key.txt' is unreadable ({e})") from None
        s: dict[str, Any] = {
            "index": int(np.searchsorted(self._rows, row)),
            "row": row,
            "label": label,
            "key": text,
        }
        views = [("", "")] + ([("flip.", "_flip")] if self.has_flip else [])
        for pre, suf in views:
            if self._latent_source is None and self.latent_shape is not None:
                s[f"latents{suf}"] = npy(f"{pre}latents.npy").astype(np.float32, copy=False)
            feats, cls = {}, {}
            for e in self.encoders:
                mem = self._members[e]
                f = npy(f"{pre}feat.{mem}.npy")
                if f.dtype == np.int8:
                    sc = npy(f"{pre}scale.{mem}.npy")
                    f = (wds_backend.Dequantized(f, sc) if isinstance(f, wds_backend.LazyArray)
                         else dequantize_int8(f, sc))
                feats[e] = f.astype(features_dtype, copy=False)
                if e in self._cls_encoders:
                    cls[e] = npy(f"{pre}clstoken.{mem}.npy").astype(np.float32, copy=False)
            s[f"features{suf}"] = feats
            if cls:
                s[f"cls{suf}"] = cls
        if self.pixel_codec == "none":
            s["pixels"] = npy("pixels.npy")
        if sums is not None:
            wds_backend.check_members(key, raw, sums, base)
        if self.pixel_codec == "png":  # decoded only after its bytes passed their checksum
            png = take("pixels.png")
            at = f"{where} (row {row}) member '{key}.pixels.png'"
            s["pixels"] = (wds_backend.PngPixels(bytes(png), self.pixel_shape, at) if lazy
                           else wds_backend.decode_png(png, self.pixel_shape, at))
        return s

    def _wds_sample(self, row: int) -> dict:
        """Random access into a tar: its header index (cached for the last shard used), then one
        read of the sample's members."""
        shard = row // self.manifest["shard_size"]
        p = self.shard_path(shard)
        if self._tar_index is None or self._tar_index[0] != shard:
            try:
                self._tar_index = (shard, wds_backend.tar_index(p))
            except DamagedData as e:
                raise DamagedData(f"store {self.path}: {e}") from None
        key = wds_backend.sample_key(row)
        entry = self._tar_index[1].get(key)
        if entry is None:
            raise DamagedData(f"store {self.path}: shard file {p} has no sample {key!r} (row {row})")
        s = self.decode_sample(key, wds_backend.read_indexed(p, entry), where=f"shard file {p}")
        if self._latent_source is not None:
            src = self._latent_source[self._latent_source.row_to_index(row)]
            for k in ("latents", "latents_flip"):
                if k in src:
                    s[k] = src[k]
        return s


def _read_rows(za: ZarrArrays, name: str, rows: np.ndarray,
               damaged: list[tuple[int, str]] | None = None) -> np.ndarray:
    """Rows in the given order: direct reads, or one sorted zarr read then reordered."""
    if za.fast(name) is not None:
        return za.fast(name).read(rows, damaged)
    uniq, inv = np.unique(rows, return_inverse=True)
    if damaged is None:
        return za.rows(name, uniq)[inv]
    try:
        return za.rows(name, uniq)[inv]
    except DamagedData as e:  # no per-row checks through zarr: the whole read is damaged
        damaged.extend((j, str(e)) for j in range(len(rows)))
        return np.zeros((len(rows), *za.array(name).shape[1:]), dtype=za.array(name).dtype)


def _take(batch: dict, keep: np.ndarray, damaged: list[str]) -> dict:
    """The batch without the samples where keep is False, plus "damaged": their messages."""
    out: dict[str, Any] = {}
    pos = np.flatnonzero(keep)
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {e: a[keep] for e, a in v.items()}
        elif isinstance(v, list):
            out[k] = [v[j] for j in pos] if v else v
        else:
            out[k] = v[keep]
    out["damaged"] = damaged
    return out


def _zip_latents(it: Iterator[dict], src: Iterator[dict], path: Path, skip: bool = False) -> Iterator[dict]:
    """Attach latents from a second row-ordered stream (the latents store) to each sample (skip:
    samples whose latents the other store left out as damaged are left out too)."""
    cur = next(src, None)
    for s in it:
        while cur is not None and cur["row"] < s["row"]:
            cur = next(src, None)
        if cur is None or cur["row"] != s["row"]:
            if skip:
                continue
            raise StoreError(f"store {path}: latents store has no row {s['row']}")
        for k in ("latents", "latents_flip"):
            if k in cur:
                s[k] = cur[k]
        yield s


def _without_latents(it: Iterator[dict]) -> Iterator[dict]:
    for s in it:
        s.pop("latents", None)
        s.pop("latents_flip", None)
        yield s


def _unbatch(batch: dict) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {e: a[0] for e, a in v.items()}
        elif isinstance(v, list):
            out[k] = v[0] if v else None
        elif k in ("index", "row", "label"):
            out[k] = int(v[0])
        else:
            out[k] = v[0]
    return out
