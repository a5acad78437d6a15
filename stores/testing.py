"""make_synthetic_store: a small valid store of random data, for tests of other packages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .layout import StoreLayout
from .writer import StoreWriter


def synthetic_arrays(layout: StoreLayout, rows: range, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random arrays for `rows` (each row's values depend only on seed and row)."""
    c2, (h, w) = layout.latent_channels2, layout.latent_hw
    c = c2 // 2
    out: dict[str, list[np.ndarray]] = {}
    for row in rows:
        rng = np.random.default_rng([seed, row])
        views = [""] + (["flip/"] if layout.flip else [])
        for v in views:
            if layout.stores_latents:
                mean = rng.normal(0.0, 1.0, (c, h, w)) + np.arange(c)[:, None, None] * 0.5
                std = rng.uniform(0.05, 0.5, (c, h, w))
                out.setdefault(f"{v}latents", []).append(np.concatenate([mean, std]).astype(np.float32))
            for enc, (t, d) in layout.encoders.items():
                out.setdefault(f"{v}features/{enc}", []).append(rng.normal(0, 1, (t, d)).astype(np.float32))
                if layout.with_cls:
                    out.setdefault(f"{v}cls/{enc}", []).append(rng.normal(0, 1, (d,)).astype(np.float32))
        if layout.pixel_hw is not None:  # drawn last: the other arrays keep their values
            out.setdefault("pixels", []).append(rng.integers(0, 256, (3, *layout.pixel_hw), dtype=np.uint8))
    return {k: np.stack(v) for k, v in out.items()}


def _synthetic(
    path: str | os.PathLike,
    num_samples: int = 16,
    encoders: dict[str, int] | None = None,
    grid: tuple[int, int] = (4, 4),
    latent_channels: int = 4,
    format: str = "zarr",
    shard_size: int = 8,
    flip: bool = False,
    feature_dtype: str = "float16",
    seed: int = 0,
    num_classes: int = 4,
    *,
    latent_hw: tuple[int, int] | None = None,
    with_cls: bool = False,
    skipped_rows: Iterable[int] = (),
    latent_dtype: str = "float32",
    resume: bool = False,
    pixel_hw: tuple[int, int] | None = None,
    pixel_codec: str = "none",
) -> list[int]:
    """Write (resume=False: from scratch) or resume a synthetic store; the shards written."""
    encoders = {"tiny": 32} if encoders is None else dict(encoders)
    gh, gw = (int(v) for v in grid)
    lhw = (2 * gh, 2 * gw) if latent_hw is None else tuple(int(v) for v in latent_hw)
    layout = StoreLayout(
        num_rows=num_samples,
        shard_size=shard_size,
        latent_channels2=2 * latent_channels,
        pixel_hw=pixel_hw,
        pixel_codec=pixel_codec,
        latent_hw=lhw,
        encoders={e: (gh * gw, d) for e, d in encoders.items()},
        feature_dtype=feature_dtype,
        latent_dtype=latent_dtype,
        with_cls=with_cls,
        flip=flip,
    )
    labels = np.arange(num_samples) % num_classes
    keys = [f"class{labels[r]:03d}/img_{r:06d}.png" for r in range(num_samples)]
    info = {
        "dataset": {"source": "synthetic", "num_classes": num_classes,
                    "class_names": [f"class{i:03d}" for i in range(num_classes)]},
        "image": {"resolution": pixel_hw[0] if pixel_hw else 8 * lhw[0], "crop": "adm"},
        "vae": {"id": "synthetic", "latent_channels": latent_channels, "scaling_factor": 0.18215,
                "shift_factor": 0.0} if latent_channels else None,
        "encoders": {e: {"timm_id": "synthetic", "weights_sha256": None, "token_grid": [gh, gw],
                         "input_size": 16 * gh} for e in encoders},
        "build_args": {"synthetic": True, "seed": seed},
    }
    skipped = set(int(r) for r in skipped_rows)
    w = StoreWriter.open(path, format, layout, keys, labels, info, resume=resume, overwrite=not resume)
    written = w.pending_shards()
    for s in written:
        rows = w.shard_rows(s)
        arrays = synthetic_arrays(layout, rows, seed)
        w.write_shard(s, arrays, [(r, "synthetic skip") for r in rows if r in skipped])
    w.finalize()
    return written


def synthetic_build(path: str | os.PathLike, format: str = "zarr", **kw) -> list[int]:
    """Run (or resume) the build of `make_synthetic_store(path, format=format, **kw)` the way a
    rerun of a build command does; return the shards it had to write."""
    return _synthetic(path, format=format, resume=True, **kw)


def make_synthetic_store(path: str | os.PathLike, num_samples: int = 16, encoders: dict[str, int] | None = None,
                         grid: tuple[int, int] = (4, 4), latent_channels: int = 4, format: str = "zarr",
                         shard_size: int = 8, flip: bool = False, feature_dtype: str = "float16", seed: int = 0,
                         num_classes: int = 4, **kw) -> Path:
    """Write a complete store of random data and return its path.

    `encoders` maps name -> feature dim D; every encoder has the token grid `grid` (T = h*w).
    Latents are [2*latent_channels, *latent_hw] with latent_hw = 2*grid by default (SiT's patch
    size 2 turns them into the same token grid). `skipped_rows` are recorded as skipped inputs
    (so len(store) = num_samples - len(skipped_rows)). Labels are row % num_classes. Keyword-only
    extras: latent_hw, with_cls, skipped_rows, latent_dtype, pixel_hw (also store random uint8
    pixels [3, H, W]; with latent_channels=0 a pixel-only store), pixel_codec.
    """
    _synthetic(path, num_samples=num_samples, encoders=encoders, grid=grid, latent_channels=latent_channels,
               format=format, shard_size=shard_size, flip=flip, feature_dtype=feature_dtype, seed=seed,
               num_classes=num_classes, resume=False, **kw)
    return Path(path)
