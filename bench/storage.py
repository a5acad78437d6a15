"""Benchmark 5: storage cost and int8 fidelity of cached encoder features.

Bytes: for ViT-B (768-d) and ViT-L (1024-d) patch features at 256 px (16x16 tokens, SD-VAE
latents 4x32x32) and 512 px (32x32 tokens, latents 4x64x64), fp16 and int8, with and without
flips, it writes real stores with ``stores.StoreWriter`` (small N) and measures the bytes on
disk (apparent file sizes). Three stores per case separate the costs exactly: ``S`` samples in
one shard, ``2S`` in one shard, ``2S`` in two shards, giving bytes per sample, per shard and
fixed; the ImageNet-1k figure is ``fixed + shards * per_shard + 1,281,167 * per_sample`` at the
builder's default 1024 samples per shard. Per-sample bytes are checked against the arithmetic
(sum of array item sizes: latents mean+std float32, features, int8 scales float32 per token).

Fidelity: features are written to an int8 store and to an fp16 store, read back through
``stores.open_store`` and compared with the float32 originals per token (cosine; mean and worst)
and through the alignment loss (``trainer.align.alignment_loss_reference`` with REPA's and
iREPA's target normalisation, against a prediction whose cosine with the target is about 0.6).
No pretrained encoder is reachable offline, so the default feature distributions are synthetic:
Gaussian, heavy-tailed (Student t, 3 dof) and Gaussian with a few "massive activation" channels
(x30), the case that per-token scales handle worst. ``--features-from STORE`` measures the same on
the features of a real store (its stored values are taken as the reference).

Pixels (`irepa-cache build --pixels`, for JiT and REPA-E): does a lossless codec on the pixel
array pay for its decode cost in the loader? Real photos (the bundled colour photos, ADM-cropped
at ``--pixel-resolution``, cycled to ``--pixel-samples`` samples; each row is coded on its own, so
cycling does not flatter the codecs) are written with ``StoreWriter`` next to one ViT-B feature
array (fp16, as a JiT store holds them) in four stores: zarr raw, zarr + zstd (zarr's codec per
row), webdataset raw, webdataset + PNG per sample. For each: pixel bytes and store bytes per
sample, and the trainer's loader (``trainer.data.StoreLoader`` with ``inputs=("pixels",)``, as
``--objective jit`` reads) in samples/s with 0 and W DataLoader workers, page cache warm and cold,
timed from creating the loader to holding one epoch. The demand line is one H200 training
JiT-B/16 at 256 px (FLOPs of the step at 40% of bf16 peak, ``bench.jit_step.jit_demand``).

    python -m bench.storage                      # real dims, S=4 samples per shard
    python -m bench.storage --features-from stores/dinov2-vit-b
    python -m bench.storage --only-pixels --pixel-samples 512
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from irepa.pipeline.defaults import SD_VAE_SCALE

from bench.common import add_common_args, fmt_bytes, print_ratios, print_table, setup, write_json

IMAGENET = 1_281_167
DEFAULT_SHARD = 1024
ENCODERS = {"ViT-B": 768, "ViT-L": 1024}
# resolution -> (token grid side, latent side): /16 (or DINOv2 /14 at 224) tokens; SD-VAE /8
RESOLUTIONS = {256: (16, 32), 512: (32, 64)}
LATENT_C = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples-per-shard", type=int, default=4, help="S: stores of S and 2S samples are written (default 4)")
    p.add_argument("--formats", default="zarr,wds", help="store backends to measure (default zarr,wds)")
    p.add_argument("--fidelity-images", type=int, default=16, help="images per distribution for fidelity (default 16)")
    p.add_argument("--features-from", default=None, metavar="STORE",
                   help="also measure int8 fidelity on the features of this (fp16/fp32) store")
    p.add_argument("--workdir", default=None, help="where to write the temporary stores (default: system temp)")
    p.add_argument("--pixel-samples", type=int, default=256, help="samples per pixel store (default 256)")
    p.add_argument("--pixel-resolution", type=int, default=256, help="ADM crop size of the pixel stores (default 256)")
    p.add_argument("--pixel-workers", default=None, help="DataLoader workers for the pixel loader (default 0,<cpus>)")
    p.add_argument("--only-pixels", action="store_true", help="run only the pixel-codec measurement")
    p.add_argument("--no-pixels", action="store_true", help="skip the pixel-codec measurement")
    add_common_args(p, repeats=1, warmup=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- writing


def write_store(path: Path, fmt: str, *, rows: int, shard: int, tokens: int, dims: dict[str, int],
                latent_side: int, dtype: str, flip: bool, feats=None, seed: int = 0) -> Path:
    """Write a complete store with StoreWriter; ``feats`` maps encoder -> float32 [rows, T, D]
    (random normal values when None; values never matter for the byte count since payloads are
    stored uncompressed, but all-zero rows would be omitted by zarr)."""
    from irepa.stores import StoreLayout, StoreWriter

    side = int(round(tokens ** 0.5))
    layout = StoreLayout(num_rows=rows, shard_size=shard, latent_channels2=2 * LATENT_C,
                         latent_hw=(latent_side, latent_side),
                         encoders={e: (tokens, d) for e, d in dims.items()},
                         feature_dtype=dtype, flip=flip)
    labels = np.arange(rows) % 1000
    # ImageNet-like keys ("n01440764/n01440764_10026.JPEG") so the keys array is realistic
    keys = [f"n{1440764 + int(l):08d}/n{1440764 + int(l):08d}_{r:05d}.JPEG" for r, l in enumerate(labels)]
    info = {
        "dataset": {"source": "bench", "num_classes": 1000, "class_names": [f"c{i}" for i in range(1000)]},
        "image": {"resolution": latent_side * 8, "crop": "adm"},
        "vae": {"id": "bench", "latent_channels": LATENT_C, "scaling_factor": SD_VAE_SCALE, "shift_factor": 0.0},
        "encoders": {e: {"timm_id": "bench", "weights_sha256": None, "token_grid": [side, side],
                         "input_size": side * 16} for e in dims},
        "build_args": {"bench": True},
    }
    w = StoreWriter.open(path, fmt, layout, keys, labels, info, resume=False, overwrite=True)
    rng = np.random.default_rng(seed)
    for s in w.pending_shards():
        r = w.shard_rows(s)
        n = len(r)
        arrays = {}
        for v in [""] + (["flip/"] if flip else []):
            mean = rng.normal(0, 1, (n, LATENT_C, latent_side, latent_side)).astype(np.float32)
            std = rng.uniform(0.05, 0.5, (n, LATENT_C, latent_side, latent_side)).astype(np.float32)
            arrays[f"{v}latents"] = np.concatenate([mean, std], axis=1)
            for e, d in dims.items():
                if feats is not None and not v:
                    arrays[f"features/{e}"] = feats[e][r.start:r.stop]
                else:
                    arrays[f"{v}features/{e}"] = rng.normal(0, 1, (n, tokens, d)).astype(np.float32)
        w.write_shard(s, arrays, [])
    w.finalize()
    return path


def dir_bytes(path: Path, prefixes: tuple[str, ...] | None = None) -> int:
    """Apparent bytes of the files under ``path`` (optionally only those whose relative path
    starts with one of ``prefixes``)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root, f)
            rel = p.relative_to(path).as_posix()
            if prefixes is None or rel.startswith(prefixes):
                total += p.stat().st_size
    return total


FEATURE_PREFIXES = ("features/", "feature_scales/", "flip/features/", "flip/feature_scales/")


def feature_bytes(path: Path) -> int:
    """Bytes on disk of a store's feature arrays (and int8 scales), as its backend counts them."""
    from irepa.stores import array_bytes

    return sum(v for k, v in array_bytes(path).items() if k.startswith(FEATURE_PREFIXES))


def arithmetic_per_sample(tokens: int, dim: int, latent_side: int, dtype: str, flip: bool) -> dict[str, int]:
    """Expected payload bytes of one sample from the array shapes alone."""
    feat = tokens * dim * (1 if dtype == "int8" else 2) + (tokens * 4 if dtype == "int8" else 0)
    lat = 2 * LATENT_C * latent_side * latent_side * 4
    views = 2 if flip else 1
    return {"features": views * feat, "latents": views * lat, "total": views * (feat + lat)}


def measure_case(work: Path, fmt: str, S: int, tokens: int, dim: int, latent_side: int, dtype: str,
                 flip: bool) -> dict:
    """Bytes per sample / per shard / fixed from three stores (S|1 shard, 2S|1 shard, 2S|2 shards)."""
    kw = dict(tokens=tokens, dims={"enc": dim}, latent_side=latent_side, dtype=dtype, flip=flip)
    sizes, feat_sizes = {}, {}
    for name, rows, shard in (("a", S, S), ("b", 2 * S, 2 * S), ("c", 2 * S, S)):
        p = work / f"{fmt}-{name}"
        write_store(p, fmt, rows=rows, shard=shard, **kw)
        sizes[name] = dir_bytes(p)
        feat_sizes[name] = feature_bytes(p)
        shutil.rmtree(p)
    per_sample = (sizes["b"] - sizes["a"]) / S
    per_shard = sizes["c"] - sizes["b"]
    fixed = sizes["a"] - per_shard - S * per_sample
    shards = -(-IMAGENET // DEFAULT_SHARD)
    out = dict(per_sample=per_sample, per_shard=per_shard, fixed=fixed,
               imagenet=fixed + shards * per_shard + IMAGENET * per_sample,
               feat_per_sample=(feat_sizes["b"] - feat_sizes["a"]) / S)
    return out


# ----------------------------------------------------------------------------- fidelity


def synthetic_features(kind: str, n: int, tokens: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.normal(0, 1, (n, tokens, dim))
    elif kind == "student-t3":
        x = rng.standard_t(3, (n, tokens, dim)) / np.sqrt(3.0)
    elif kind == "outlier-channels":
        x = rng.normal(0, 1, (n, tokens, dim))
        ch = rng.choice(dim, size=4, replace=False)
        x[..., ch] *= 30.0
    else:
        raise ValueError(kind)
    # a per-image spatial mean, as real patch features have (what iREPA's zscore removes)
    x = x + rng.normal(0, 0.5, (n, 1, dim))
    return x.astype(np.float32)


def roundtrip(work: Path, feats: np.ndarray, dtype: str) -> np.ndarray:
    """Write ``feats`` [N, T, D] to a zarr store of ``dtype``, read it back via open_store."""
    from irepa.stores import open_store

    n, t, d = feats.shape
    p = work / f"fid-{dtype}"
    write_store(p, "zarr", rows=n, shard=n, tokens=t, dims={"enc": d}, latent_side=2, dtype=dtype,
                flip=False, feats={"enc": feats})
    back = open_store(p).get_batch(np.arange(n))["features"]["enc"]
    shutil.rmtree(p)
    return np.asarray(back, dtype=np.float32)


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-30)


def loss_change(ref: np.ndarray, other: np.ndarray, preset: str, seed: int = 0) -> tuple[float, float]:
    """(loss with the float32 targets, loss with ``other`` minus that) for a fixed prediction."""
    import torch
    import torch.nn as nn

    from irepa.trainer.align import alignment_loss_reference, resolve_align, spatial_normalize

    cfg = resolve_align(preset)
    z = torch.from_numpy(ref)
    g = torch.Generator().manual_seed(seed)
    target = torch.nn.functional.normalize(spatial_normalize(z, cfg.spatial_norm, cfg.gamma), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(z.shape, generator=g), dim=-1)
    pred = 0.6 * target + 0.8 * noise  # cosine with the target about 0.6
    proj = [nn.Identity()]
    l_ref = float(alignment_loss_reference(proj, pred, [z], cfg)["loss"])
    l_oth = float(alignment_loss_reference(proj, pred, [torch.from_numpy(other)], cfg)["loss"])
    return l_ref, l_oth - l_ref


def fidelity_row(work: Path, name: str, feats: np.ndarray) -> dict:
    q8 = roundtrip(work, feats, "int8")
    f16 = roundtrip(work, feats, "float16")
    c8, c16 = token_cosines(feats, q8), token_cosines(feats, f16)
    out = dict(name=name, dim=feats.shape[-1], tokens=feats.shape[0] * feats.shape[1],
               int8_mean=float(c8.mean()), int8_worst=float(c8.min()),
               fp16_mean=float(c16.mean()), fp16_worst=float(c16.min()))
    for preset in ("repa", "irepa"):
        l, d8 = loss_change(feats, q8, preset)
        _, d16 = loss_change(feats, f16, preset)
        out[f"{preset}_loss"], out[f"{preset}_d_int8"], out[f"{preset}_d_fp16"] = l, d8, d16
    return out


def features_from_store(path: str, n: int) -> tuple[str, np.ndarray]:
    from irepa.stores import open_store

    r = open_store(path)
    enc = r.encoders[0]
    n = min(n, len(r))
    return f"{enc} ({Path(path).name})", np.asarray(r.get_batch(np.arange(n))["features"][enc], dtype=np.float32)


# ----------------------------------------------------------------------------- pixels

PIXEL_CASES = [("zarr", "none"), ("zarr", "zstd"), ("wds", "none"), ("wds", "png")]


def colour_crops(resolution: int) -> list[np.ndarray]:
    """The bundled photos that are in colour, ADM-cropped to ``resolution``, as uint8 [3, R, R]
    (ImageNet is ~98% colour; a grey photo stored as RGB compresses three times better)."""
    from irepa.pipeline.sources import default_sample_source
    from irepa.pipeline.transforms import decode_and_crop

    src = default_sample_source()
    out = []
    for i in range(len(src)):
        a = decode_and_crop(src.read_bytes(i), resolution)
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])):
            out.append(np.ascontiguousarray(a.transpose(2, 0, 1)))
    return out


def write_pixel_store(path: Path, fmt: str, codec: str, crops: list[np.ndarray], n: int, shard: int, dim: int) -> Path:
    """A pixel-only store of ``n`` samples (crops cycled) with one fp16 feature array [n, T, dim]."""
    from irepa.stores import StoreLayout, StoreWriter

    R = crops[0].shape[-1]
    side = max(1, R // 16)
    layout = StoreLayout(num_rows=n, shard_size=shard, latent_channels2=0, latent_hw=(0, 0), pixel_hw=(R, R),
                         pixel_codec=codec, encoders={"enc": (side * side, dim)})
    info = {"dataset": {"source": "bench", "num_classes": 1000}, "image": {"resolution": R, "crop": "adm"},
            "vae": None, "encoders": {"enc": {"timm_id": "bench", "token_grid": [side, side]}}}
    keys = [f"n{1440764 + r % 1000:08d}/img_{r:06d}.JPEG" for r in range(n)]
    w = StoreWriter.open(path, fmt, layout, keys, np.arange(n) % 1000, info, resume=False, overwrite=True)
    rng = np.random.default_rng(0)
    for s in w.pending_shards():
        rows = w.shard_rows(s)
        w.write_shard(s, {"pixels": np.stack([crops[r % len(crops)] for r in rows]),
                          "features/enc": rng.normal(0, 1, (len(rows), side * side, dim)).astype(np.float32)})
    w.finalize()
    return path


def pixel_bench(args, work: Path) -> tuple[dict, list]:
    """Bytes and loader speed of the pixel codecs (see the module docstring); the records and ratios."""
    import statistics

    from bench.jit_step import jit_demand
    from bench.loader import drop_cache, loader_read, plain_read, store_files
    from irepa.stores import array_bytes

    R, N, dim, batch, shard = args.pixel_resolution, args.pixel_samples, 768, 32, 64
    workers = [int(w) for w in args.pixel_workers.split(",")] if args.pixel_workers else [0, min(8, os.cpu_count() or 1)]
    if args.smoke:
        R, N, dim, batch, shard, workers = 32, 16, 24, 4, 8, [0, 1]
    crops = colour_crops(R)
    print(f"\n# pixel stores: {N} samples of {len(crops)} colour photos ADM-cropped to {R} px, + features "
          f"{(R // 16) ** 2}x{dim} fp16, {shard} per shard; loader batch {batch}, workers {workers}")
    records = []
    for fmt, codec in PIXEL_CASES:
        p = write_pixel_store(work / f"px-{fmt}-{codec}", fmt, codec, crops, N, shard, dim)
        files = store_files(p)
        store_b = sum(f.stat().st_size for f in files)
        px_b = array_bytes(p)["pixels"]
        for cache in ("warm", "cold"):
            for w in workers:
                times = []
                for _ in range(max(1, args.repeats)):
                    drop_cache(files) if cache == "cold" else plain_read(files)
                    dt, got = loader_read(p, w, batch, N, "enc", inputs=("pixels",))
                    times.append(dt)
                dt = statistics.median(times)
                records.append(dict(format=fmt, codec=codec, cache=cache, workers=w, samples=got, seconds=dt,
                                    samples_per_s=got / dt, pixel_bytes_per_sample=px_b / N,
                                    store_bytes_per_sample=store_b / N))
        shutil.rmtree(p)
    raw_px = 3 * R * R
    demand, how = jit_demand()
    rows = []
    for r in records:
        base = next(b for b in records if b["format"] == r["format"] and b["codec"] == "none"
                    and b["cache"] == r["cache"] and b["workers"] == r["workers"])
        rows.append([r["format"], r["codec"], r["cache"], r["workers"], fmt_bytes(r["pixel_bytes_per_sample"]),
                     f"{r['pixel_bytes_per_sample'] / raw_px:.3f}", fmt_bytes(r["store_bytes_per_sample"]),
                     f"{r['samples_per_s']:.0f}", f"{r['samples_per_s'] / base['samples_per_s']:.2f}"])
    print_table(["format", "pixel codec", "page cache", "workers", "pixel bytes/sample", "of raw uint8",
                 "store bytes/sample", "loader samples/s", "vs codec none"], rows,
                title=f"Pixel codecs: bytes and loader speed ({R} px, pixels + one ViT-B fp16 feature array)")
    print(f"demand: one H200 training JiT-B/16 at 256 px consumes {demand:.0f} img/s ({how})")
    ratios = []
    for fmt, codec in PIXEL_CASES:
        if codec == "none":
            continue
        for cache in ("warm", "cold"):
            best = lambda c: max((r for r in records if r["format"] == fmt and r["codec"] == c  # noqa: E731
                                  and r["cache"] == cache), key=lambda r: r["samples_per_s"])
            b, c = best("none"), best(codec)
            ratios.append((f"{fmt} {cache}: {codec}/none loader samples/s (best workers)",
                           c["samples_per_s"] / b["samples_per_s"], "> 1: the codec pays for its decode"))
        r0 = next(r for r in records if r["format"] == fmt and r["codec"] == codec)
        b0 = next(r for r in records if r["format"] == fmt and r["codec"] == "none")
        ratios.append((f"{fmt}: {codec}/none pixel bytes", r0["pixel_bytes_per_sample"] / b0["pixel_bytes_per_sample"],
                       "bytes saved on the pixel array"))
        ratios.append((f"{fmt}: {codec}/none store bytes", r0["store_bytes_per_sample"] / b0["store_bytes_per_sample"],
                       "of the whole store (features included)"))
    for fmt, codec in PIXEL_CASES:
        for cache in ("warm", "cold"):
            best = max((r for r in records if r["format"] == fmt and r["codec"] == codec and r["cache"] == cache),
                       key=lambda r: r["samples_per_s"])
            ratios.append((f"{fmt} {codec} {cache}: loader samples/s / one-GPU JiT-B/16 demand",
                           best["samples_per_s"] / demand, f"{best['workers']} workers"))
    per_sample = {f"{r['format']}-{r['codec']}": r["store_bytes_per_sample"] for r in records}
    print("ImageNet-1k pixel-store size (pixels + one ViT-B fp16 array, this resolution): "
          + ", ".join(f"{k} {fmt_bytes(v * IMAGENET)}" for k, v in per_sample.items()))
    return dict(resolution=R, samples=N, workers=workers, demand=demand, records=records), ratios


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    if args.only_pixels:
        work = Path(tempfile.mkdtemp(prefix="irepa-bench-storage-", dir=args.workdir))
        try:
            pixels, ratios = pixel_bench(args, work)
            print_ratios(ratios)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        payload = dict(bench="storage", pixels=pixels)
        write_json(args.json, payload)
        return payload
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    S = args.samples_per_shard
    encoders, resolutions = dict(ENCODERS), dict(RESOLUTIONS)
    fid_n, fid_tokens = args.fidelity_images, 256
    if args.smoke:  # tiny dims: exercises every path in a few seconds
        S, encoders, resolutions = 2, {"ViT-B(tiny)": 24}, {256: (4, 4)}
        fid_n, fid_tokens = 2, 16
        formats = formats[:2]
    work = Path(tempfile.mkdtemp(prefix="irepa-bench-storage-", dir=args.workdir))
    print(f"# stores of {S} and {2 * S} samples per case in {work}; ImageNet-1k = {IMAGENET:,} samples, "
          f"{DEFAULT_SHARD} per shard; bytes are apparent file sizes")
    try:
        rows, records = [], []
        for fmt in formats:
            for enc, dim in encoders.items():
                for res, (side, lat) in resolutions.items():
                    for flip in (False, True):
                        for dtype in ("float16", "int8"):
                            T = side * side
                            m = measure_case(work, fmt, S, T, dim, lat, dtype, flip)
                            a = arithmetic_per_sample(T, dim, lat, dtype, flip)
                            rec = dict(format=fmt, encoder=enc, dim=dim, resolution=res, tokens=T, flip=flip,
                                       dtype=dtype, arithmetic=a, **m)
                            records.append(rec)
                            rows.append([fmt, f"{enc} {dim}-d", f"{res} px ({side}x{side})", "yes" if flip else "no",
                                         "fp16" if dtype == "float16" else "int8",
                                         fmt_bytes(m["feat_per_sample"]),
                                         fmt_bytes(m["per_sample"]), f"{m['per_sample'] / a['total']:.4f}",
                                         fmt_bytes(m["imagenet"])])
        print_table(["format", "encoder", "resolution", "flip", "features", "feature bytes/sample",
                     "store bytes/sample", "measured/arith", "ImageNet-1k store"], rows,
                    title="Storage: bytes per sample and for ImageNet-1k (latents mean+std float32 included)")
        print("measured/arith: store bytes per sample over the arithmetic payload (latents + features + scales); "
              "the excess is labels, keys and container overhead")

        fid = []
        for kind in ("gaussian", "student-t3", "outlier-channels"):
            for dim in sorted(set(encoders.values())):
                fid.append(fidelity_row(work, f"{kind}", synthetic_features(kind, fid_n, fid_tokens, dim)))
        if args.features_from:
            name, feats = features_from_store(args.features_from, fid_n)
            fid.append(fidelity_row(work, name, feats))
        print_table(["features", "D", "tokens", "int8 mean cos", "int8 worst cos", "fp16 mean cos",
                     "REPA loss", "d loss int8", "iREPA loss", "d loss int8", "d loss fp16 (iREPA)"],
                    [[f["name"], f["dim"], f["tokens"], f"{f['int8_mean']:.6f}", f"{f['int8_worst']:.6f}",
                      f"{f['fp16_mean']:.7f}", f"{f['repa_loss']:.5f}", f"{f['repa_d_int8']:+.2e}",
                      f"{f['irepa_loss']:.5f}", f"{f['irepa_d_int8']:+.2e}", f"{f['irepa_d_fp16']:+.2e}"]
                     for f in fid],
                    title="int8 fidelity (per-token symmetric int8 vs float32, read back through open_store)")
        print("loss: alignment loss (no coeff) against a prediction at cosine ~0.6 with the float32 target; "
              "d loss: change when the target comes from the int8 (or fp16) store")

        ratios = []
        for fmt in formats:
            for enc, dim in encoders.items():
                for res in resolutions:
                    for flip in (False, True):
                        sel = {r["dtype"]: r for r in records if r["format"] == fmt and r["encoder"] == enc
                               and r["resolution"] == res and r["flip"] == flip}
                        tag = f"{fmt} {enc} {res}px{' flip' if flip else ''}"
                        ratios.append((f"{tag}: int8/fp16 feature bytes",
                                       sel["int8"]["feat_per_sample"] / sel["float16"]["feat_per_sample"],
                                       "goal <= 0.52"))
                        ratios.append((f"{tag}: int8/fp16 store bytes",
                                       sel["int8"]["per_sample"] / sel["float16"]["per_sample"], "incl. latents"))
        ratios.append(("worst-case mean cosine int8 vs fp32 (synthetic)",
                       min(f["int8_mean"] for f in fid if "(" not in f["name"]), "goal >= 0.999"))
        if args.features_from:
            ratios.append(("mean cosine int8 vs stored (real store)", fid[-1]["int8_mean"], "goal >= 0.999"))
        ratios.append(("max |d alignment loss| int8", max(max(abs(f["repa_d_int8"]), abs(f["irepa_d_int8"])) for f in fid),
                       "absolute change of the loss value"))
        pixels = None
        if not args.no_pixels:
            pixels, more = pixel_bench(args, work)
            ratios += more
        print_ratios(ratios)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload = dict(bench="storage", samples_per_shard=S, records=records, fidelity=fid, pixels=pixels)
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
