"""The batched build loop behind `irepa-cache build`.

Decodes every source image once (DataLoader workers, ADM center crop), runs the VAE and every
requested encoder on the same batch, and hands whole shards to `stores.StoreWriter`, which writes
them atomically. Batches never straddle a shard, so a shard's bytes do not depend on which shards
were already done: a build that is killed and rerun ends byte-identical to one that was not.
Under `torchrun` each rank takes the shards `s % world_size == rank`; rank 0 creates the store
before the others open it and writes the final manifest after every rank has finished.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from irepa.stores import StoreError, StoreLayout, StoreLock, StoreWriter, open_store, repair_store

from . import dist as distributed
from .build_config import BuildConfig, build_config, parse_weights
from .config import to_json
from .defaults import BUNDLED, DEFAULT_VAE
from .encoders import Encoder, load_encoder
from .sources import SAMPLE_IMAGES, default_sample_source, open_source
from .transforms import DecodeDataset
from .vae import VaeEncoder, load_vae

SAMPLE_PHOTOS = [p for p in SAMPLE_IMAGES.rglob("*.jpg")]

#: BuildConfig fields that say where and how a build runs, not what it writes (left out of build_args)
RUNTIME_FIELDS = ("out", "num_workers", "device", "progress", "resume", "repair", "overwrite")

def shard_batches(writer: StoreWriter, shards: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row batches that never cross a shard boundary, in shard order."""
    batches: list[list[int]] = []
    for shard in shards:
        rows = list(writer.shard_rows(shard))
        batches.extend(rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    return batches


PRECISIONS = ("bf16", "fp16", "fp32")


def encoder_autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA (the default), fp16 autocast with precision="fp16" (the official iREPA
    ldm code's default mixed precision); plain fp32 on CPU or with precision="fp32".
    The VAE opts out of autocast itself (``VaeEncoder.encode`` runs fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def effective_precision(device: torch.device, precision: str) -> str:
    """What `encoder_autocast` really runs: the requested precision on CUDA, fp32 elsewhere."""
    return precision if device.type == "cuda" else "fp32"


class ShardAccumulator:
    """Collects per-row model outputs until a shard is complete, then hands it to the writer."""

    def __init__(self, writer: StoreWriter, array_shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, np.dtype] | None = None):
        self.writer = writer
        self.array_shapes = array_shapes
        self.dtypes = dtypes or {}  # float32 unless named here (pixels: uint8)
        self.current: int | None = None
        self.rows: range = range(0)
        self.arrays: dict[str, np.ndarray] = {}
        self.skipped: list[tuple[int, str]] = []
        self.filled = 0

    def _start(self, shard: int) -> None:
        self.current = shard
        self.rows = self.writer.shard_rows(shard)
        n = len(self.rows)
        self.arrays = {k: np.zeros((n, *s), dtype=self.dtypes.get(k, np.float32)) for k, s in self.array_shapes.items()}
        self.skipped = []
        self.filled = 0

    def add(
        self,
        shard: int,
        rows: Sequence[int],
        ok: np.ndarray,
        outputs: dict[str, np.ndarray],
        skipped: list[tuple[int, str]],
    ) -> bool:
        """Add one batch (outputs hold only the `ok` rows); return True when the shard was written."""
        if self.current != shard:
            if self.current is not None and self.filled:
                raise RuntimeError(f"shard {self.current} left incomplete before shard {shard} started")
            self._start(shard)
        ok_offsets = np.asarray(rows, dtype=np.int64)[ok] - self.rows.start
        for name, values in outputs.items():
            self.arrays[name][ok_offsets] = values
        self.skipped.extend(skipped)
        self.filled += len(rows)
        if self.filled == len(self.rows):
            self.writer.write_shard(shard, self.arrays, sorted(self.skipped))
            self.current = None
            self.arrays = {}
            return True
        return False


def _encode_batch(
    images: torch.Tensor,
    vae: VaeEncoder | None,
    encoders: dict[str, Encoder],
    device: torch.device,
    with_cls: bool,
    prefix: str = "",
    precision: str = "bf16",
    pixels: bool = False,
) -> dict[str, np.ndarray]:
    """Run the VAE and every encoder on one uint8 batch; float32 numpy arrays keyed by store name
    (plus the uint8 batch itself as "pixels" when `pixels`)."""
    out: dict[str, np.ndarray] = {}
    if pixels:  # the exact uint8 crop the models below see
        out["pixels"] = images.numpy()
    images = images.to(device, non_blocking=True)
    with torch.inference_mode(), encoder_autocast(device, precision):
        if vae is not None:
            mean, std = vae.encode(images)
            out[prefix + "latents"] = torch.cat([mean, std], dim=1).float().cpu().numpy()
        for name, enc in encoders.items():
            tokens, cls = enc(images)
            out[f"{prefix}features/{name}"] = tokens.float().cpu().numpy()
            if with_cls:
                if cls is None:
                    raise ValueError(f"encoder {name!r} has no CLS token; drop --cls")
                out[f"{prefix}cls/{name}"] = cls.float().cpu().numpy()
    return out


def _already_complete(out: str, fingerprint: str, build_args: dict) -> bool:
    """True when `out` is a finished store of this dataset built with these very options (every
    resolved build argument but where the data lives), so a rerun can stop before loading any
    model. Anything else goes through the writer's checks (which refuse another build's store)."""
    from irepa.stores import read_manifest

    if not (Path(out) / "manifest.json").exists():
        return False
    m = read_manifest(out)
    stored = dict(m.get("build_args") or {})
    want = dict(build_args)
    stored.pop("data", None)
    want.pop("data", None)
    return m.get("state") == "complete" and m["dataset"].get("fingerprint") == fingerprint and stored == want


def _check_latents_from(path: str, fingerprint: str, resolution: int, flip: bool) -> dict:
    """Open the store whose latents we reuse and check it describes the same data and crop."""
    try:
        other = open_store(path)
    except StoreError as err:
        raise StoreError(f"--latents-from {path}: {err}") from err
    theirs = other.manifest["dataset"]["fingerprint"]
    if theirs != fingerprint:
        raise StoreError(
            f"--latents-from {path}: dataset fingerprint {theirs} differs from this build's "
            f"{fingerprint}; the latents must come from a build over the same ordered samples"
        )
    their_res = other.manifest["image"]["resolution"]
    if their_res != resolution:
        raise StoreError(
            f"--latents-from {path}: resolution {their_res} px differs from this build's {resolution} px"
        )
    if flip and not other.has_flip:
        raise StoreError(f"--latents-from {path}: this build asks for --flip but that store has no flipped latents")
    if other.latent_shape is None:
        raise StoreError(f"--latents-from {path}: that store holds no latents (it was built with --vae none)")
    if other.manifest.get("latents_from"):
        raise StoreError(f"--latents-from {path}: that store borrows its latents too; point at the store that holds them")
    return other.manifest


def build_store(cfg: BuildConfig | None = None, **kwargs) -> Path:
    """Build (or finish) a store as ``cfg`` (or the keyword arguments, checked as the CLI
    checks flags) says; returns its path. See :class:`irepa.pipeline.build_config.BuildConfig`."""
    cfg = build_config(cfg, **kwargs)
    return _build(cfg)


def _build(cfg: BuildConfig) -> Path:
    dist = distributed.from_env(cfg.device)
    dev = dist.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    data, out, resolution, flip, fmt = cfg.source, cfg.out_dir, cfg.resolution, cfg.flip, cfg.format
    feature_dtype, latent_dtype, precision, with_cls = cfg.feature_dtype, cfg.latent_dtype, cfg.precision, cfg.cls
    demo = cfg.demo
    encoder_names = _checked_encoders(cfg)  # canonical registry names; unknown ones fail here, at once
    typed_names = dict(zip(encoder_names, cfg.encoders))
    vae, encoder_config, shard_size = cfg.vae, cfg.encoder_config, cfg.shard_size or (4 if demo else 1024)
    if demo:  # the embedded default: tiny random models, small shards
        vae = vae or "tiny"
        encoder_config = encoder_config or "tiny"
        if dist.main:
            print(f"irepa-cache build: no --data and no $IREPA_DATA: building the bundled demo ({len(SAMPLE_PHOTOS)} "
                  f"sample photos) with a tiny random VAE ({vae}) and tiny random {', '.join(encoder_names)} "
                  f"(random weights: a try-out, not features to train on) into {out}", flush=True)
    source = default_sample_source() if demo else open_source(data)
    if len(source) == 0:
        raise StoreError(f"data {data}: no samples found")
    vae_name = vae or DEFAULT_VAE

    from irepa.stores import dataset_fingerprint

    fingerprint = dataset_fingerprint(source.keys)
    if dist.rank == 0:
        StoreLock.check(out)  # another build on this --out: fail now, naming it, before loading models
    if cfg.repair and dist.rank == 0:
        repair_store(out)
    latents_from = cfg.latents_from
    borrowed = _check_latents_from(latents_from, fingerprint, resolution, flip) if latents_from else None
    if borrowed:  # rows must line up shard for shard with the store that holds the latents
        for flag, given, used in (("--shard-size", cfg.shard_size, borrowed["shard_size"]),
                                  ("--vae", cfg.vae, (borrowed.get("vae") or {}).get("id"))):
            if given is not None and given != used and dist.main:
                print(f"irepa-cache build: {flag} {given} is not used: with --latents-from the store follows "
                      f"{latents_from} ({flag} {used})", flush=True)
        shard_size = int(borrowed["shard_size"])
    build_args = {  # the resolved options (what --config reloads); how the build ran is left out
        **{k: v for k, v in to_json(cfg).items() if k not in RUNTIME_FIELDS},
        "data": data if data is not None else BUNDLED,
        "encoder": encoder_names,
        "vae": vae_name if not borrowed else None,
        "encoder_config": encoder_config,
        "shard_size": shard_size,
        "precision": effective_precision(dev, precision),
    }
    if cfg.resume and not (cfg.repair or cfg.overwrite) and _already_complete(out, fingerprint, build_args):
        if dist.rank == 0:
            print(f"store {out} is already complete for this build; nothing to do "
                  f"(irepa-cache verify {out} checks its files)")
        return Path(out)

    weight_paths = parse_weights(cfg.weights, encoder_names)
    encoders = {
        name: load_encoder(
            name,
            resolution=resolution,
            pretrained=cfg.pretrained and name not in weight_paths and encoder_config is None,
            weights=weight_paths.get(name),
            config=encoder_config,
            preprocess=cfg.preprocess,
        )
        .eval()
        .to(dev)
        for name in encoder_names
    }
    no_vae = vae_name == "none"  # a pixel-only store (--pixels --vae none)
    vae_model = None if (borrowed or no_vae) else load_vae(vae_name).eval().to(dev)

    if borrowed:
        vae_info = dict(borrowed["vae"])
        lat_c2, lat_h, lat_w = borrowed["arrays"]["latents"]["shape"][1:]
    elif no_vae:
        vae_info, lat_c2, lat_h, lat_w = None, 0, 0, 0
    else:
        down = vae_model.downsample
        vae_info = {
            "id": vae_model.id,
            "latent_channels": vae_model.latent_channels,
            "scaling_factor": vae_model.scaling_factor,
            "shift_factor": vae_model.shift_factor,
            "weights_sha256": vae_model.weights_sha256(),
        }
        lat_c2, lat_h, lat_w = 2 * vae_model.latent_channels, resolution // down, resolution // down

    grids = {name: tuple(enc.token_grid) for name, enc in encoders.items()}
    layout = StoreLayout(
        num_rows=len(source),
        shard_size=shard_size,
        latent_channels2=lat_c2,
        latent_hw=(lat_h, lat_w),
        encoders={name: (grids[name][0] * grids[name][1], enc.dim) for name, enc in encoders.items()},
        feature_dtype=feature_dtype,
        latent_dtype=latent_dtype,
        with_cls=with_cls,
        flip=flip,
        write_latents=borrowed is None,
        pixel_hw=(resolution, resolution) if cfg.pixels else None,
        pixel_codec=cfg.pixel_codec,
    )
    info = {
        "dataset": {
            **source.describe(),
            "source": str(Path(data).resolve()) if data is not None else str(getattr(source, "root", "")),
            "class_names": list(source.class_names),
            "fingerprint": fingerprint,
        },
        "image": {"resolution": resolution, "crop": "adm"},
        "vae": vae_info,
        "latents_from": (
            {"path": str(Path(latents_from).resolve()), "fingerprint": fingerprint} if borrowed else None
        ),
        "encoders": {
            name: {
                "timm_id": enc.timm_id,
                "weights_sha256": enc.weights_sha256(),
                "token_grid": list(grids[name]),
                "dim": enc.dim,
                "input_size": enc.input_size,
                "config": encoder_config or "pretrained",
                "cls": with_cls,
                "preprocess": enc.profile.to_dict(),
                "precision": effective_precision(dev, precision),
                **_requested(name, typed_names),
            }
            for name, enc in encoders.items()
        },
        "build_args": build_args,
    }

    existed = Path(out).exists()
    writer = _open_writer_all_ranks(out, fmt, layout, source, info, cfg.resume, dist, cfg.overwrite)
    mine = [s for s in writer.pending_shards() if s % dist.world_size == dist.rank]
    batches = shard_batches(writer, mine, cfg.batch_size)

    array_shapes: dict[str, tuple[int, ...]] = {"pixels": (3, resolution, resolution)} if cfg.pixels else {}
    for prefix in ("", "flip/") if flip else ("",):
        if borrowed is None and vae_model is not None:
            array_shapes[prefix + "latents"] = (lat_c2, lat_h, lat_w)
        for name, (tokens, dim) in layout.encoders.items():
            array_shapes[f"{prefix}features/{name}"] = (tokens, dim)
            if with_cls:
                array_shapes[f"{prefix}cls/{name}"] = (dim,)
    acc = ShardAccumulator(writer, array_shapes, {"pixels": np.dtype(np.uint8)})

    loader = DataLoader(
        DecodeDataset(source, resolution),
        batch_sampler=batches,
        num_workers=min(cfg.num_workers, len(batches), os.cpu_count() or 1),
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    total_rows = sum(len(b) for b in batches)
    bar = tqdm(
        total=total_rows,
        unit="img",
        desc=f"build {Path(out).name}" + (f" [rank {dist.rank}]" if dist.world_size > 1 else ""),
        disable=not cfg.progress,
        position=dist.rank,
    )
    for batch, rows in zip(loader, batches):
        shard = rows[0] // writer.layout.shard_size
        ok = batch["ok"].numpy().astype(bool)
        skipped = [(int(r), str(reason)) for r, good, reason in zip(rows, ok, batch["reason"]) if not good]
        outputs: dict[str, np.ndarray] = {}
        if ok.any():
            good_images = batch["image"][torch.from_numpy(ok)]
            outputs = _encode_batch(good_images, vae_model, encoders, dev, with_cls, precision=precision,
                                    pixels=cfg.pixels)
            if flip:
                outputs.update(
                    _encode_batch(torch.flip(good_images, dims=[-1]), vae_model, encoders, dev, with_cls,
                                  prefix="flip/", precision=precision)
                )
        acc.add(shard, rows, ok, outputs, skipped)
        bar.update(len(rows))
    bar.close()

    distributed.barrier(dist)
    err: BaseException | None = None
    if dist.rank == 0:
        try:
            _refuse_empty(writer, data, existed)
            writer.finalize()
        except StoreError as e:
            err = e
    distributed.fail_together(dist, err)
    distributed.barrier(dist)
    return Path(out)


def _checked_encoders(cfg: BuildConfig) -> list[str]:
    """The canonical registry name of each --encoder (aliases and official names resolved; an
    unknown name fails with "did you mean"), checked against --cls before any model loads."""
    from .encoders import ENCODERS, canonical_encoder_name, feature_transform_name

    names = [canonical_encoder_name(n) for n in cfg.encoders]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--encoder names {dup} more than once (aliases of one encoder count as the same)")
    for typed, name in zip(cfg.encoders, names):
        if cfg.cls and name in ENCODERS and ENCODERS[name].num_prefix_tokens == 0:
            raise ValueError(f"--cls: encoder {name} has no CLS token (all its tokens are patches); drop --cls or "
                             "that encoder")
        if feature_transform_name(typed) != "none" and not cfg.cls:
            raise ValueError(f"--encoder {typed} is the {name} cache plus the {feature_transform_name(typed)} "
                             f"transform, which mixes in the CLS token: add --cls")
    return names


def _requested(name: str, typed: dict[str, str]) -> dict:
    """How the user named an encoder when that name means more than the stored array: an
    official name with a feature transform (``dinov2mixed-vit-b``) makes the trainer align to
    that transform of ``name``'s features by default."""
    from .encoders import feature_transform_name

    kind = feature_transform_name(typed.get(name, name))
    return {"requested_as": typed[name], "transform": kind} if kind != "none" else {}


def _refuse_empty(writer: StoreWriter, data: str | None, existed: bool) -> None:
    """A build in which no input decoded is an error naming the source, not a complete store of
    zero samples; a store folder this build created is removed again (nothing to clean by hand)."""
    from collections import Counter

    from irepa.stores.manifest import read_shard_records

    records = read_shard_records(writer.path, writer.num_shards)
    skipped = [s for r in records.values() for s in r["skipped"]]
    if len(records) == writer.num_shards and len(skipped) == writer.layout.num_rows:
        reasons = "; ".join(f"{r} (x{n})" for r, n in Counter(s["reason"] for s in skipped).most_common(3))
        if not existed:
            import shutil

            shutil.rmtree(writer.path, ignore_errors=True)
        raise StoreError(f"data {data or BUNDLED}: none of its {writer.layout.num_rows} inputs decodes ({reasons}); "
                         f"no store was written" + ("" if not existed else f" (the folder {writer.path} was kept)"))


def _open_writer_all_ranks(out, format, layout, source, info, resume, dist: distributed.Dist,
                           overwrite: bool = False) -> StoreWriter:
    """Rank 0 creates (or resumes, or with ``overwrite`` recreates) the store first; other ranks
    then open it to write their shards."""
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    writer = None
    if dist.rank == 0:
        writer = StoreWriter.open(out, format, layout, source.keys, source.labels, info, resume=resume,
                                  overwrite=overwrite)
    distributed.barrier(dist)
    if dist.rank != 0:
        writer = StoreWriter.open(out, format, layout, source.keys, source.labels, info, resume=True, lock=False)
    return writer
