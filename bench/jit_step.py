"""Benchmark 6: one JiT training step from a pixel store vs online encoding vs no alignment.

The step is the trainer's own ``--objective jit``: ``JiTObjective.draw`` and its ``JiTStep`` phase
module (x-prediction, v-space loss, ``AlignmentLoss`` with the release's ``irepa-official-jit``
head), AdamW with JiT's betas, and both EMAs (0.9999, 0.9996). No VAE is involved, so the input
paths differ only in where the encoder features come from:

* ``no-align``  plain JiT on stored pixels (what training without alignment costs);
* ``cached``    pixels and encoder features from a pixel store: one batch read through the
  trainer's loader (``trainer.data.StoreLoader`` with ``inputs=("pixels",)`` over a zarr store
  written by ``stores``), copied to the device every step as ``CacheSource`` does;
* ``online``    ADM-cropped uint8 images copied to the device, the encoder run every step
  (``trainer.online.OnlineSource.encode`` without a VAE: the trainer's ``--online`` for JiT).

What ``online`` also pays per image and this step leaves out: the JPEG decode and ADM crop
(DataLoader workers do it). The row ``online: decode + crop`` times it on one CPU core for the
batch, on JPEGs of ImageNet's typical size (500x375, quality 95, made from the bundled photos),
so its share can be read against the step. Models are random-initialised at real sizes (timm
encoders with ``pretrained=False``). FLOPs are counted on the meta device at the run's size.

    python -m bench.jit_step                  # CPU-sized: JiT-B/16 at 128 px, DINOv2-B, batch 2
    python -m bench.jit_step --real           # JiT-B/16 + JiT-L/16 x DINOv2-B, 256 px, batch 64 (GPU)
"""

from __future__ import annotations

import argparse
import copy
import io
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from bench.common import (add_common_args, count_flops, fmt_bytes, fmt_s, peak_memory, print_ratios, print_table,
                          sample_images, setup, step_sizes, time_interleaved, write_json)

SIZES = {
    "smoke": dict(models=[("JiT-B/16", dict(hidden_size=32, depth=2, num_heads=2, bottleneck_dim=8,
                                            in_context_len=2, in_context_start=1))],
                  resolution=64, batch=2, encoders=["dinov2-vit-b"], encoder_config="tiny"),
    "cpu": dict(models=[("JiT-B/16", {})], resolution=128, batch=2, encoders=["dinov2-vit-b"], encoder_config=None),
    "real": dict(models=[("JiT-B/16", {}), ("JiT-L/16", {})], resolution=256, batch=64, encoders=["dinov2-vit-b"],
                 encoder_config=None),
}
H200_BF16_DENSE = 989e12
ASSUMED_MFU = 0.40
_OPTS = ("bottleneck_dim", "in_context_len", "in_context_start")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.jit_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="real sizes (GPU): JiT-B/16, JiT-L/16, 256 px, batch 64")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 2 CPU / 64 real)")
    p.add_argument("--models", default=None, help="comma list of JiT names (default: per size)")
    p.add_argument("--encoders", default=None, help="comma list of encoder names (default: per size)")
    p.add_argument("--align", default="irepa-official-jit", help="alignment preset (default: JiT's, irepa-official-jit)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="CUDA autocast (default bf16)")
    add_common_args(p, repeats=5, warmup=2)
    return p.parse_args(argv)


def make_objective(model_name: str, overrides: dict, R: int, enc_dim: int, align: str | None, dev, amp=None):
    """The trainer's JiT objective for ``R`` px pixels and one encoder of ``enc_dim`` (no alignment
    when ``align`` is None)."""
    from irepa.trainer.align import resolve_align
    from irepa.trainer.objectives import DataSpec
    from irepa.trainer.objectives.jit import JiTObjective, JiTOptions

    grid = R // _patch(model_name, overrides)
    cfg = SimpleNamespace(model=model_name, class_dropout=0.1, attn="sdpa", fused_align=True,
                          **{k: overrides.get(k) for k in ("hidden_size", "depth", "num_heads", "patch_size")})
    opts = JiTOptions(**{k: overrides[k] for k in _OPTS if k in overrides})
    data = DataSpec(pixel_shape=(3, R, R), encoders=["enc"] if align else [], feature_dims=[enc_dim] if align else [],
                    token_grids=[(grid, grid)] if align else [], num_classes=1000, store="bench")
    return JiTObjective(cfg, opts, data, resolve_align(align) if align else None, dev, amp)


def _patch(model_name: str, overrides: dict) -> int:
    from irepa.trainer.jit_model import JIT_CONFIGS

    return int(overrides.get("patch_size") or JIT_CONFIGS[model_name]["patch_size"])


def step_flops(model_name: str, overrides: dict, R: int, enc_dim: int, align: str) -> dict[str, int]:
    """FLOPs of one image's JiT training forward + backward, with and without alignment (meta
    device). The fused alignment's recompute is not visible to the counter: the plain composition
    is counted and one projector forward added, as bench.train_step does."""
    from torch.utils.flop_counter import FlopCounterMode

    from irepa.trainer.align import AlignmentLoss

    out = {}
    meta = torch.device("meta")
    for name, a in (("no-align", None), ("cached", align)):
        obj = make_objective(model_name, overrides, R, enc_dim, a, meta)
        with meta:
            model = obj.build_model(obj.model_config())
            step = obj.phases(model, {})[0].module
            if a:
                step.align = AlignmentLoss(model.projectors, obj.align_config, fused=False)
            px = torch.zeros(2, 3, R, R, dtype=torch.uint8)
            draws = {"t": torch.rand(2), "e": torch.randn(2, 3, R, R), "drop": torch.zeros(2, dtype=torch.bool)}
            tokens = (R // _patch(model_name, overrides)) ** 2
            feats = [torch.randn(2, tokens, enc_dim)] if a else []
        with FlopCounterMode(display=False) as fc:
            step({"pixels": px, "label": torch.zeros(2, dtype=torch.long, device=meta), "features": feats},
                 draws, {})["loss"].backward()
        out[name] = fc.get_total_flops() // 2
        if a:
            with meta:
                h = torch.randn(2, tokens, model.hidden_size)
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                model.projectors[0](h)
            out[name] += fc.get_total_flops() // 2
    return out


def jit_demand(model_name: str = "JiT-B/16", resolution: int = 256, enc_dim: int = 768) -> tuple[float, str]:
    """img/s one H200 trains ``model_name`` at ``ASSUMED_MFU`` (FLOPs of the aligned step counted on
    the meta device): what a pixel store's loader must feed one GPU."""
    per_img = step_flops(model_name, {}, resolution, enc_dim, "irepa-official-jit")["cached"]
    rate = ASSUMED_MFU * H200_BF16_DENSE / per_img
    return rate, (f"{model_name} step at {resolution} px {per_img / 1e9:.0f} GFLOP/img at {ASSUMED_MFU:.0%} of H200 "
                  f"bf16 {H200_BF16_DENSE / 1e12:.0f} TFLOPS")


def imagenet_like_jpegs(n: int) -> list[bytes]:
    """``n`` JPEGs of 500x375 px at quality 95 (ImageNet's typical size), from the bundled photos."""
    from PIL import Image

    from irepa.pipeline.sources import default_sample_source
    from irepa.pipeline.transforms import load_rgb

    src = default_sample_source()
    out = []
    for i in range(n):
        im = load_rgb(src.read_bytes(i % len(src))).resize((500, 375), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def cached_batch(work: Path, R: int, batch: int, enc_dim: int) -> dict:
    """One batch as the trainer's loader delivers it to a pixel objective, from a real zarr store."""
    from irepa.stores.testing import make_synthetic_store
    from irepa.trainer.data import LoaderSpec, StoreLoader

    path = make_synthetic_store(work / "store", num_samples=batch, encoders={"enc": enc_dim}, grid=(R // 16, R // 16),
                                latent_channels=0, pixel_hw=(R, R), shard_size=batch, num_classes=1000)
    loader = StoreLoader(path, kind="index", num_samples=batch, spec=LoaderSpec(global_batch=batch), encoders=["enc"],
                         steps=1, num_workers=0, inputs=("pixels",))
    return next(iter(loader))


def pixel_step_inputs(work: Path, R: int, batch: int, enc: torch.nn.Module, enc_name: str,
                      dev: torch.device) -> tuple[dict, torch.Tensor, Any, list[bytes]]:
    """What a pixel objective's cached and online steps start from: the cached batch (pinned on
    CUDA), the same-size images for the online encoder, the online source, and ``batch``
    ImageNet-like JPEGs (the decode the online path also pays)."""
    from irepa.trainer.online import OnlineSource

    host = cached_batch(work, R, batch, enc.dim)
    images = sample_images(R, batch)
    if dev.type == "cuda":
        host = {"pixels": host["pixels"].pin_memory(), "label": host["label"].pin_memory(),
                "features": {k: v.pin_memory() for k, v in host["features"].items()}}
        images = images.pin_memory()
    online = OnlineSource(None, np.arange(batch), R, None, {enc_name: enc}, 1000, dev, None, False, ("pixels",))
    return host, images, online, imagenet_like_jpegs(batch)


def run_combo(model_name: str, overrides: dict, enc_name: str, size: dict, batch: int, dev: torch.device, args,
              work: Path) -> dict:
    from irepa.pipeline.encoders import load_encoder
    from irepa.pipeline.transforms import decode_and_crop
    from irepa.trainer.train import update_ema

    R = size["resolution"]
    amp = torch.bfloat16 if (dev.type == "cuda" and args.precision == "bf16") else None
    enc = load_encoder(enc_name, resolution=R, pretrained=False, config=size["encoder_config"]).eval().to(dev)
    aligned = make_objective(model_name, overrides, R, enc.dim, args.align, dev, amp)
    plain = make_objective(model_name, overrides, R, enc.dim, None, dev, amp)
    with torch.device(dev):
        torch.manual_seed(0)
        model = aligned.build_model(aligned.model_config())
    model.train()
    emas = [copy.deepcopy(model).requires_grad_(False) for _ in (0.9999, 0.9996)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    # one model for both: the plain step leaves the projector out (its parameters get no gradient)
    steps = {"aligned": aligned.phases(model, {})[0].module, "plain": plain.phases(model, {})[0].module}

    host, images, online, jpegs = pixel_step_inputs(work, R, batch, enc, enc_name, dev)
    labels, nb = host["label"], dev.type == "cuda"

    def from_cache(with_features: bool) -> dict:
        return {"pixels": host["pixels"].to(dev, non_blocking=nb),
                "features": [host["features"]["enc"].to(dev, non_blocking=nb)] if with_features else [],
                "label": host["label"].to(dev, non_blocking=nb)}

    def from_images() -> dict:
        px = images.to(dev, non_blocking=nb)
        _, feats = online.encode(px)
        return {"pixels": px, "features": feats, "label": labels.to(dev, non_blocking=nb)}

    counter = [0]

    def step(which: str, get_batch) -> None:
        b = get_batch()
        g = torch.Generator(device=dev).manual_seed(counter[0])
        counter[0] += 1
        draws = aligned.draw(batch, g, dev)
        opt.zero_grad(set_to_none=True)
        steps[which](b, draws, {})["loss"].backward()
        opt.step()  # JiT's preset: no gradient clipping
        for ema, decay in zip(emas, (0.9999, 0.9996)):
            update_ema(ema, model, decay)

    def enc_only() -> None:
        online.encode(images.to(dev, non_blocking=nb))

    def decode() -> None:
        for b in jpegs:
            decode_and_crop(b, R)

    fns = {
        "no-align": lambda: step("plain", lambda: from_cache(False)),
        "cached": lambda: step("aligned", lambda: from_cache(True)),
        "online": lambda: step("aligned", from_images),
        "online: encoder": enc_only,
        "online: decode + crop (1 core)": decode,
    }
    t = time_interleaved(fns, dev, args.warmup, args.repeats)
    peaks = {}
    if dev.type == "cuda":
        for k in ("no-align", "cached", "online"):
            peaks[k] = peak_memory(fns[k], dev)[0]
    one = images[:1].to(dev)
    flops = {"encoder": count_flops(lambda: enc(one))}
    flops.update({f"step {k}": v for k, v in step_flops(model_name, overrides, R, enc.dim, args.align).items()})
    n_params = sum(p.numel() for p in model.parameters())
    del model, emas, opt, steps, online
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return dict(model=model_name, encoder=enc_name, enc_dim=enc.dim, batch=batch, params=n_params,
                times={k: v.median for k, v in t.items()}, spread={k: v.spread for k, v in t.items()}, peaks=peaks,
                flops_per_image=flops)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = setup(args)
    sizes = step_sizes(args, dev, SIZES)
    size_name, size, batch, models, encoders, prec = (sizes.name, sizes.table, sizes.batch, sizes.models,
                                                      sizes.encoders, sizes.precision)
    print(f"# sizes: {size_name}; {size['resolution']} px, batch {batch}, align {args.align}, {prec}; "
          f"median of {args.repeats} interleaved steps after {args.warmup} warm-up")
    work = Path(tempfile.mkdtemp(prefix="irepa-bench-jit-"))
    records, rows, ratios = [], [], []
    try:
        for model_name, overrides in models:
            for enc_name in encoders:
                t0 = time.perf_counter()
                r = run_combo(model_name, overrides, enc_name, size, batch, dev, args, work)
                records.append(r)
                tm, f = r["times"], r["flops_per_image"]
                for k in tm:
                    rows.append([model_name, enc_name, k, fmt_s(tm[k]), f"{batch / tm[k]:.1f}", f"{r['spread'][k]:.2f}",
                                 fmt_bytes(r["peaks"][k]) if k in r["peaks"] else "n/a"])
                tag = f"{model_name} + {enc_name}"
                online_flops = f["step cached"] + f["encoder"]
                ratios += [
                    (f"{tag}: online/cached step time", tm["online"] / tm["cached"], "what the pixel store saves"),
                    (f"{tag}: FLOPs online/cached", online_flops / f["step cached"], "encoder forward added online"),
                    (f"{tag}: cached/no-align step time", tm["cached"] / tm["no-align"], "alignment overhead"),
                    (f"{tag}: FLOPs cached/no-align", f["step cached"] / f["step no-align"], "its floor in FLOPs"),
                    (f"{tag}: (online + decode)/cached", (tm["online"] + tm["online: decode + crop (1 core)"])
                     / tm["cached"], "with the batch's JPEG decode on one core"),
                ]
                print(f"# {tag} done in {time.perf_counter() - t0:.0f} s")
        print_table(["model", "encoder", "input path", "time", "img/s", "spread", "peak mem"], rows,
                    title="JiT train step: pixel store (cached) vs online encoder vs no alignment")
        for r in records:
            f = r["flops_per_image"]
            print(f"FLOPs per image at {size['resolution']} px: {r['model']} ({r['params'] / 1e6:.1f}M params) step "
                  f"{f['step no-align'] / 1e9:.1f} G (no align), {f['step cached'] / 1e9:.1f} G ({args.align}); "
                  f"{r['encoder']} forward {f['encoder'] / 1e9:.1f} G")
        print("spread: (max - min) / median of the repeats. peak mem: cuda allocator peak of one step (GPU only).")
        print_ratios(ratios)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload = dict(bench="jit_step", size=size_name, device=str(dev), records=records)
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
