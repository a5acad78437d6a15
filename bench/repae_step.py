"""Benchmark 7: one REPA-E training step with cached encoder features vs an online encoder.

The step is the trainer's own ``--objective repae``: ``RepaeObjective``'s three phases in the
loop's order, each with its AdamW (lr 1e-4, betas (0.9, 0.999)) and grad-norm clip 1, then the
SiT's EMA. Its parts are the release's at their real sizes, random-initialised (timing needs
shapes, not weights): SD-VAE (``AutoencoderKL`` with ``stabilityai/sd-vae-ft-ema``'s config,
trainable), LPIPS with its VGG16 trunk (``lpips`` package), the 3-layer 64-wide PatchGAN, the
SiT with REPA's MLP head (the release's ``--align repa``), DINOv2-B as the encoder.

* ``cached``  pixels and encoder features from a pixel store: one batch read through the trainer's
  loader (``trainer.data.StoreLoader`` with ``inputs=("pixels",)`` over a zarr store written by
  ``stores``), copied to the device every step as ``CacheSource`` does;
* ``online``  ADM-cropped uint8 images copied to the device, the encoder run every step
  (``trainer.online.OnlineSource.encode``: the trainer's ``--online`` for REPA-E).

Latents cannot be cached for REPA-E (the VAE trains), so only the encoder forward (and, as for
JiT, the JPEG decode and crop the DataLoader workers do online) separates the two paths. The rows
``cached: <phase>`` split the cached step into its phases (``vae``: VAE encode + decode, LPIPS,
the frozen discriminator, the frozen SiT up to the alignment block, all backward into the VAE;
``discriminator``; ``sit``: the SiT on the detached latents, what a flow step from cached latents
costs); ``online: decode + crop (1 core)`` times the batch's JPEG decode (500x375, q95). FLOPs are
counted on the meta device at the run's size, per phase and for the encoder forward, and at
256 px for the release's SiT-XL/2.

    python -m bench.repae_step                 # CPU-sized: SiT-B/2 at 128 px, DINOv2-B, batch 1
    python -m bench.repae_step --real          # SiT-B/2 + SiT-XL/2 x DINOv2-B, 256 px, batch 32 (GPU)
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.common import (SD_VAE_CONFIG, add_common_args, count_flops, fmt_bytes, fmt_s, peak_memory, print_ratios,
                          print_table, sample_images, setup, step_sizes, time_interleaved, write_json)
from bench.jit_step import pixel_step_inputs

SIZES = {
    "smoke": dict(models=[("SiT-B/2", dict(hidden_size=32, depth=2, num_heads=2, encoder_depth=1, projector_dim=64))],
                  resolution=32, batch=2, encoders=["dinov2-vit-b"], encoder_config="tiny", vae="tiny"),
    "cpu": dict(models=[("SiT-B/2", {})], resolution=128, batch=1, encoders=["dinov2-vit-b"], encoder_config=None,
                vae="sd"),
    "real": dict(models=[("SiT-B/2", {}), ("SiT-XL/2", {})], resolution=256, batch=32, encoders=["dinov2-vit-b"],
                 encoder_config=None, vae="sd"),
}
PHASES = ("vae", "discriminator", "sit")
_SIT = ("hidden_size", "depth", "num_heads", "patch_size")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.repae_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="real sizes (GPU): SiT-B/2, SiT-XL/2, 256 px, batch 32")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 1 CPU / 32 real)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: 128 CPU / 256 real)")
    p.add_argument("--models", default=None, help="comma list of SiT names (default: per size)")
    p.add_argument("--encoders", default=None, help="comma list of encoder names (default: per size)")
    p.add_argument("--align", default="repa", help="alignment preset (default: the release's, repa)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="CUDA autocast (default bf16)")
    add_common_args(p, repeats=5, warmup=1)
    return p.parse_args(argv)


def make_vae(kind: str):
    """A random-initialised diffusers ``AutoencoderKL``: SD-VAE's config (``sd``) or the tiny one."""
    from diffusers import AutoencoderKL

    from irepa.pipeline.vae import TINY_VAE_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(**(SD_VAE_CONFIG if kind == "sd" else TINY_VAE_CONFIG))


def make_objective(model_name: str, overrides: dict, R: int, enc_dim: int, align: str, dev: torch.device, vae,
                   lpips, amp=None, fused: bool = True):
    """The trainer's REPA-E objective for ``R`` px pixels and one encoder of ``enc_dim``, with the
    given VAE and LPIPS modules (the release's other defaults: VGG LPIPS, 3-layer 64-wide PatchGAN)."""
    from irepa.trainer.align import resolve_align
    from irepa.trainer.objectives import DataSpec
    from irepa.trainer.objectives.repae import RepaeObjective, RepaeOptions

    cfg = SimpleNamespace(model=model_name, class_dropout=0.1, attn="sdpa", fused_align=fused, grad_accum=1,
                          qk_norm=False, vae=None, **{k: overrides.get(k) for k in _SIT})
    a = resolve_align(align, encoder_depth=overrides.get("encoder_depth"), projector_dim=overrides.get("projector_dim"))
    grid = R // 8 // _patch(model_name, overrides)
    data = DataSpec(pixel_shape=(3, R, R), encoders=["enc"], feature_dims=[enc_dim], token_grids=[(grid, grid)],
                    num_classes=1000, store="bench")
    obj = RepaeObjective(cfg, RepaeOptions(lpips_weights="random"), data, a, dev, amp)
    obj._vae, obj._vae_id, obj._lpips = vae, "bench/random-init", lpips
    return obj


def _patch(model_name: str, overrides: dict) -> int:
    from irepa.trainer.models import SIT_CONFIGS

    return int(overrides.get("patch_size") or SIT_CONFIGS[model_name]["patch_size"])


def step_flops(model_name: str, overrides: dict, R: int, enc_dim: int, align: str, vae_kind: str) -> dict[str, int]:
    """FLOPs of one image's REPA-E step, per phase (forward + backward; meta device, batch 2
    halved). The fused alignment's recompute is not visible to the counter: the plain composition
    is counted and one projector forward added per aligned phase, as bench.jit_step does."""
    from torch.utils.flop_counter import FlopCounterMode

    from irepa.trainer.repae_parts import build_lpips

    from diffusers import AutoencoderKL

    from irepa.pipeline.vae import TINY_VAE_CONFIG

    meta = torch.device("meta")
    with meta:
        vae = AutoencoderKL(**(SD_VAE_CONFIG if vae_kind == "sd" else TINY_VAE_CONFIG))
        lp = build_lpips("random", "vgg").to(meta)  # its scaling buffers are made on the CPU
        obj = make_objective(model_name, overrides, R, enc_dim, align, meta, vae, lp, fused=False)
        model = obj.build_model(obj.model_config())
        extra = obj.extra_modules()
        phases = obj.phases(model, extra)
        B = 2
        C, h, w = obj.noise_shape()
        draws = {"post": torch.randn(B, C, h, w), "t": torch.rand(B), "eps": torch.randn(B, C, h, w),
                 "drop": torch.zeros(B, dtype=torch.bool)}
        tokens = (h // _patch(model_name, overrides)) * (w // _patch(model_name, overrides))
        batch = {"pixels": torch.zeros(B, 3, R, R, dtype=torch.uint8), "label": torch.zeros(B, dtype=torch.long),
                 "features": [torch.randn(B, tokens, enc_dim)]}
        hid = torch.randn(B, tokens, model.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.projectors[0](hid)
    proj = fc.get_total_flops()
    out, carry = {}, {}
    for ph in phases:
        with FlopCounterMode(display=False) as fc:
            ph.module(batch, draws, carry)["loss"].backward()
        out[ph.name] = (fc.get_total_flops() + (proj if ph.name != "discriminator" else 0)) // B
    out["step"] = sum(out[p] for p in PHASES)
    return out


def run_combo(model_name: str, overrides: dict, enc_name: str, size: dict, batch: int, R: int, dev: torch.device,
              args, work: Path) -> dict:
    from irepa.pipeline.encoders import load_encoder
    from irepa.pipeline.transforms import decode_and_crop
    from irepa.trainer.repae_parts import build_lpips
    from irepa.trainer.train import update_ema

    amp = torch.bfloat16 if (dev.type == "cuda" and args.precision == "bf16") else None
    enc = load_encoder(enc_name, resolution=R, pretrained=False, config=size["encoder_config"]).eval().to(dev)
    torch.manual_seed(0)
    vae = make_vae(size["vae"]).to(dev).train()
    lp = build_lpips("random", "vgg")
    obj = make_objective(model_name, overrides, R, enc.dim, args.align, dev, vae, lp, amp)
    with torch.device(dev):
        model = obj.build_model(obj.model_config())
    extra = {k: m.to(dev) for k, m in obj.extra_modules().items()}
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    phases = obj.phases(model, extra)
    opts = {p.name: torch.optim.AdamW(p.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0) for p in phases}

    host, images, online, jpegs = pixel_step_inputs(work, R, batch, enc, enc_name, dev)
    labels, nb = host["label"], dev.type == "cuda"

    def from_cache() -> dict:
        return {"pixels": host["pixels"].to(dev, non_blocking=nb), "features": [host["features"]["enc"].to(
            dev, non_blocking=nb)], "label": host["label"].to(dev, non_blocking=nb)}

    def from_images() -> dict:
        px = images.to(dev, non_blocking=nb)
        _, feats = online.encode(px)
        return {"pixels": px, "features": feats, "label": labels.to(dev, non_blocking=nb)}

    counter = [0]
    phase_times: dict[str, list[float]] = {p: [] for p in PHASES}

    def step(get_batch, record: bool = False) -> None:
        b = get_batch()
        g = torch.Generator(device=dev).manual_seed(counter[0])
        counter[0] += 1
        draws = obj.draw(batch, g, dev)
        carry: dict = {}
        for ph in phases:  # the loop's order and per-phase work: zero, forward, backward, clip, step
            if record:
                _sync(dev)
                t0 = time.perf_counter()
            opt = opts[ph.name]
            opt.zero_grad(set_to_none=True)
            ph.module(b, draws, carry)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(ph.params, 1.0)
            opt.step()
            if record:
                _sync(dev)
                phase_times[ph.name].append(time.perf_counter() - t0)
        update_ema(ema, model, 0.9999)

    def enc_only() -> None:
        online.encode(images.to(dev, non_blocking=nb))

    def decode() -> None:
        for b in jpegs:
            decode_and_crop(b, R)

    fns = {
        "cached": lambda: step(from_cache, record=True),
        "online": lambda: step(from_images),
        "online: encoder": enc_only,
        "online: decode + crop (1 core)": decode,
    }
    t = time_interleaved(fns, dev, args.warmup, args.repeats)
    times = {k: v.median for k, v in t.items()}
    spread = {k: v.spread for k, v in t.items()}
    n_warm = args.warmup  # the warm-up calls recorded phases too: leave them out
    for p in PHASES:
        kept = phase_times[p][n_warm:] or phase_times[p]
        times[f"cached: {p}"] = float(np.median(kept))
    peaks = {}
    if dev.type == "cuda":
        for k in ("cached", "online"):
            peaks[k] = peak_memory(fns[k], dev)[0]
    one = images[:1].to(dev)
    flops = {"encoder": count_flops(lambda: enc(one))}
    flops.update(step_flops(model_name, overrides, R, enc.dim, args.align, size["vae"]))
    n_params = {"sit": sum(p.numel() for p in model.parameters()), "vae": sum(p.numel() for p in vae.parameters()),
                "discriminator": sum(p.numel() for p in extra["discriminator"].parameters())}
    del model, ema, opts, phases, online, vae, extra, obj
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return dict(model=model_name, encoder=enc_name, enc_dim=enc.dim, batch=batch, resolution=R, params=n_params,
                times=times, spread=spread, peaks=peaks, flops_per_image=flops)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def release_flops(enc_dim: int = 768) -> dict[str, int]:
    """Per-image FLOPs of the release's setting: SiT-XL/2 + SD-VAE + VGG LPIPS + PatchGAN at 256 px."""
    return step_flops("SiT-XL/2", {}, 256, enc_dim, "repa", "sd")


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = setup(args)
    sizes = step_sizes(args, dev, SIZES)
    size_name, size, batch, models, encoders, prec = (sizes.name, sizes.table, sizes.batch, sizes.models,
                                                      sizes.encoders, sizes.precision)
    R = args.resolution or size["resolution"]
    vae_name = "SD-VAE config" if size["vae"] == "sd" else "tiny VAE"
    print(f"# sizes: {size_name}; {R} px, batch {batch}, align {args.align}, {vae_name}, LPIPS VGG, PatchGAN 3x64, "
          f"{prec}; median of {args.repeats} interleaved steps after {args.warmup} warm-up")
    work = Path(tempfile.mkdtemp(prefix="irepa-bench-repae-"))
    records, rows, ratios = [], [], []
    try:
        for model_name, overrides in models:
            for enc_name in encoders:
                t0 = time.perf_counter()
                r = run_combo(model_name, overrides, enc_name, size, batch, R, dev, args, work)
                records.append(r)
                tm, f = r["times"], r["flops_per_image"]
                for k in tm:
                    rows.append([model_name, enc_name, k, fmt_s(tm[k]), f"{batch / tm[k]:.2f}",
                                 f"{r['spread'][k]:.2f}" if k in r["spread"] else "-",
                                 fmt_bytes(r["peaks"][k]) if k in r["peaks"] else "n/a"])
                tag = f"{model_name} + {enc_name}"
                ratios += [
                    (f"{tag}: online/cached step time", tm["online"] / tm["cached"], "what the cached features save"),
                    (f"{tag}: FLOPs online/cached", (f["step"] + f["encoder"]) / f["step"],
                     "encoder forward added online"),
                    (f"{tag}: (online + decode)/cached", (tm["online"] + tm["online: decode + crop (1 core)"])
                     / tm["cached"], "with the batch's JPEG decode on one core"),
                    (f"{tag}: cached step / its sit phase (time)", tm["cached"] / tm["cached: sit"],
                     "REPA-E step vs the SiT step it contains"),
                    (f"{tag}: FLOPs step / sit phase", f["step"] / f["sit"], "what training the VAE end to end adds"),
                ]
                print(f"# {tag} done in {time.perf_counter() - t0:.0f} s")
        print_table(["model", "encoder", "input path", "time", "img/s", "spread", "peak mem"], rows,
                    title="REPA-E train step: cached features vs online encoder")
        for r in records:
            f = r["flops_per_image"]
            p = r["params"]
            print(f"FLOPs per image at {r['resolution']} px: {r['model']} ({p['sit'] / 1e6:.1f}M params), VAE "
                  f"({p['vae'] / 1e6:.1f}M), PatchGAN ({p['discriminator'] / 1e6:.2f}M): step {f['step'] / 1e9:.1f} G "
                  f"= vae {f['vae'] / 1e9:.1f} + discriminator {f['discriminator'] / 1e9:.1f} + sit "
                  f"{f['sit'] / 1e9:.1f}; {r['encoder']} forward {f['encoder'] / 1e9:.1f} G")
        if not args.smoke:
            rel = release_flops(records[0]["enc_dim"] if records else 768)
            enc256 = _encoder_flops_256(encoders[0], dev)
            print(f"FLOPs per image, the release's setting (SiT-XL/2, SD-VAE, 256 px): step {rel['step'] / 1e9:.0f} G "
                  f"= vae {rel['vae'] / 1e9:.0f} + discriminator {rel['discriminator'] / 1e9:.0f} + sit "
                  f"{rel['sit'] / 1e9:.0f}; {encoders[0]} forward {enc256 / 1e9:.1f} G -> online/cached "
                  f"{(rel['step'] + enc256) / rel['step']:.4f}")
            ratios.append(("SiT-XL/2 at 256 px: FLOPs online/cached", (rel["step"] + enc256) / rel["step"],
                           "the release's setting, counted"))
            ratios.append(("SiT-XL/2 at 256 px: FLOPs step / sit phase", rel["step"] / rel["sit"],
                           "REPA-E step vs a cached-latent SiT step"))
        print("spread: (max - min) / median of the repeats. cached: <phase>: medians of the same cached steps, "
              "phase by phase. peak mem: cuda allocator peak of one step (GPU only).")
        print_ratios(ratios)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload = dict(bench="repae_step", size=size_name, device=str(dev), records=records)
    write_json(args.json, payload)
    return payload


def _encoder_flops_256(enc_name: str, dev: torch.device) -> int:
    """FLOPs of one 256 px image's encoder forward (random weights, on the CPU)."""
    from irepa.pipeline.encoders import load_encoder

    enc = load_encoder(enc_name, resolution=256, pretrained=False).eval()
    x = sample_images(256, 1)
    with torch.no_grad():
        return count_flops(lambda: enc(x))


if __name__ == "__main__":
    main()
