"""`irepa-cache`: build, inspect, verify and measure feature/latent stores (a fire CLI)."""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import fire


def build(
    data: str | None = None,
    out: str = "stores/demo",
    encoder: str | Sequence[str] | None = None,
    vae: str | None = None,
    resolution: int = 256,
    encoder_config: str | None = None,
    weights: str | Sequence[str] | None = None,
    latents_from: str | None = None,
    flip: bool = False,
    feature_dtype: str = "float16",
    latent_dtype: str = "float32",
    cls: bool = False,
    format: str = "zarr",
    shard_size: int = 1024,
    batch_size: int = 64,
    num_workers: int = 4,
    resume: bool = True,
    repair: bool = False,
    device: str | None = None,
    precision: str = "bf16",
) -> None:
    """Run the VAE and vision encoder(s) over a dataset once and write a store.

    With no --data, builds the embedded demo: the bundled sample photos, a tiny random VAE and a
    tiny random DINOv2-B-shaped encoder, into stores/demo.

    Args:
        data: ImageFolder root, webdataset tar shards ("train-{000000..000146}.tar"), or a .txt file list.
        out: store directory (default stores/demo).
        encoder: registry name(s) or raw timm ids, comma separated (default dinov2-vit-b); all are run
            on the same decoded batch.
        vae: diffusers AutoencoderKL hub id or local folder (default stabilityai/sd-vae-ft-ema), or "tiny".
        resolution: ADM center-crop size, 256 or 512.
        encoder_config: "tiny" for a reduced random-initialised encoder (tests, demos).
        weights: local encoder checkpoint (safetensors or state dict): PATH, or name=PATH,name2=PATH2.
        latents_from: reuse this store's VAE latents (same dataset and resolution); run only the encoders.
        flip: also store the horizontally flipped view.
        feature_dtype: float16 (default) or int8 (per-token scale, half the bytes).
        latent_dtype: float32 (default) or float16 for the posterior mean and std.
        cls: also store each encoder's CLS token.
        format: zarr (default, random access) or wds (webdataset tar shards, streaming).
        shard_size: samples per shard file (with --latents-from: that store's).
        batch_size: images per forward pass.
        num_workers: image-decoding DataLoader workers.
        resume: finish an interrupted build in place (default); --noresume refuses an existing store.
        repair: verify every shard file first and rebuild the shards that fail (a flipped byte, a
            deleted file); the result equals an undamaged build.
        device: torch device (default cuda:LOCAL_RANK when available, else cpu).
        precision: encoder precision on CUDA: bf16 autocast (the default; REPA runs its encoders
            under autocast too) or fp32. The VAE always runs fp32, as REPA's preprocessing does.
            CPU builds run fp32 throughout.
    """
    from .build import build_store
    from irepa.stores import describe_store, format_description

    path = build_store(
        data=data,
        out=out,
        encoder=encoder,
        vae=vae,
        resolution=resolution,
        encoder_config=encoder_config,
        weights=weights,
        latents_from=latents_from,
        flip=flip,
        feature_dtype=feature_dtype,
        latent_dtype=latent_dtype,
        cls=cls,
        format=format,
        shard_size=shard_size,
        batch_size=batch_size,
        num_workers=num_workers,
        resume=resume,
        repair=repair,
        device=device,
        precision=precision,
    )
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"store written: {path.resolve()}")
        print(format_description(describe_store(path)))


def inspect(store: str, json_out: bool = False) -> None:
    """Print what a store holds: counts, arrays, bytes on disk and per sample, skipped inputs, provenance."""
    from irepa.stores import describe_store, format_description

    info = describe_store(store)
    print(json.dumps(info, indent=2) if json_out else format_description(info))


def verify(store: str) -> None:
    """Recompute every shard checksum; exit 1 naming each bad shard, or if the store is unfinished."""
    from irepa.stores import verify_store

    report = verify_store(store)
    print(report.format() if hasattr(report, "format") else report)
    if not report.ok:
        sys.exit(1)


def metrics(*stores: str, limit: int = 4096, out: str = "metrics", fid: str | None = None,
            masks: str | None = None, gamma: float = 1.0, seed: int = 0, device: str | None = None) -> None:
    """Spatial-structure metrics (LDS, CDS, RMSC, SRSS) of each store's encoder features.

    Args:
        stores: one or more store directories.
        limit: images sampled per store (fixed seed).
        out: folder for metrics.json and metrics.png.
        fid: optional table encoder -> FID (JSON or CSV/TSV) to correlate each metric with FID.
        masks: optional foreground masks for SRSS.
        gamma: spatial-normalisation gamma for the normalised variant.
    """
    from .metrics_report import run_metrics

    if not stores:
        raise fire.core.FireError("name at least one store: irepa-cache metrics stores/NAME [...]")
    run_metrics(list(stores), limit=limit, out=out, fid=fid, masks=masks, gamma=gamma, seed=seed, device=device)


COMMANDS = {"build": build, "inspect": inspect, "verify": verify, "metrics": metrics}


def run_fire(component, name: str, command: list[str] | None = None) -> None:
    """fire.Fire, with user errors (bad store, bad data, bad flag value) printed as one line and
    exit status 2 instead of a traceback; IREPA_DEBUG=1 shows the traceback."""
    from irepa.stores import StoreError

    user_errors: tuple[type[BaseException], ...] = (StoreError, ValueError, FileNotFoundError)
    try:
        from irepa.trainer.checkpoint import CheckpointError

        user_errors += (CheckpointError,)
    except ImportError:
        pass
    try:
        fire.Fire(component, command=command, name=name)
    except user_errors as err:
        if os.environ.get("IREPA_DEBUG"):
            raise
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("IREPA_DEBUG"):
            raise
        print(f"\n{name}: interrupted; finished shards and checkpoints are kept: rerun the same "
              "command to resume", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    run_fire(COMMANDS, "irepa-cache")


if __name__ == "__main__":
    main()
