"""Benchmark 2: the alignment module, fused (recomputing) vs plain autograd composition.

For each preset (REPA's MLP projector, iREPA's conv projector) and SiT width, times the loss
forward and forward+backward of ``trainer.align.AlignmentLoss(fused=True)`` against
``fused=False`` (``alignment_loss_reference``) on the same inputs, and measures memory: the
bytes autograd keeps for backward (both devices, counted with saved-tensor hooks, excluding
``h``, the targets and the parameters, which are alive anyway) and, on a GPU, the allocator
peak of forward+backward. On CUDA it runs under bf16 autocast, as the trainer does.

    python -m bench.align                 # CPU-sized (SiT-S width, 8 x 64 tokens)
    python -m bench.align --real          # SiT-B/2 and SiT-XL/2 widths, 256 tokens, DINOv2-B dims
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from bench.common import (add_common_args, fmt_bytes, fmt_s, peak_memory, print_ratios, print_table,
                          saved_tensor_bytes, setup, sync, time_interleaved, write_json)

SIZES = {
    # name: (batch, grid side, [(model label, hidden)], z_dim, projector_dim)
    "smoke": (2, 4, [("tiny", 32)], 16, 32),
    "cpu": (8, 8, [("SiT-S width", 384)], 384, 512),
    "real": (64, 16, [("SiT-B/2", 768), ("SiT-XL/2", 1152)], 768, 2048),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.align", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="real sizes (SiT-B/2, SiT-XL/2 widths, 16x16 tokens, z=768)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 8 CPU / 64 real)")
    p.add_argument("--presets", default="repa,irepa", help="comma list of alignment presets (default repa,irepa)")
    p.add_argument("--chunk", type=int, default=None, help="fused chunk size in images (default: batch / 4)")
    add_common_args(p, repeats=5, warmup=2)
    return p.parse_args(argv)


def bench_one(preset: str, hidden: int, batch: int, side: int, z_dim: int, proj_dim: int, chunk: int | None,
              dev: torch.device, args) -> dict:
    from irepa.trainer.align import AlignmentLoss, build_projector, resolve_align

    cfg = resolve_align(preset, projector_dim=proj_dim)
    g = torch.Generator().manual_seed(0)
    proj = build_projector(cfg.projector, hidden, z_dim, kernel=cfg.kernel, projector_dim=cfg.projector_dim,
                           grid=(side, side)).to(dev)
    T = side * side
    h = torch.randn(batch, T, hidden, generator=g).to(dev).requires_grad_(True)
    z = torch.randn(batch, T, z_dim, generator=g).to(dev)
    if dev.type == "cuda":
        z = z.half()  # features arrive from the store as fp16
    params = list(proj.parameters())
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    mods = {name: AlignmentLoss([proj], cfg, fused=fused, chunk_size=chunk)
            for name, fused in (("plain", False), ("fused", True))}

    def fwd(mod):
        with amp:
            return mod(h, [z])["loss"]

    def fwd_bwd(mod):
        with amp:
            loss = mod(h, [z])["loss"]
        return loss, torch.autograd.grad(loss, [h] + params)

    fns = {}
    for name, mod in mods.items():
        fns[f"{name}/fwd"] = lambda mod=mod: fwd(mod)
        fns[f"{name}/fwd_bwd"] = lambda mod=mod: fwd_bwd(mod)
    timings = time_interleaved(fns, dev, args.warmup, args.repeats)
    out, results = {}, {}
    for name, mod in mods.items():
        with saved_tensor_bytes(exclude=[h, z] + params) as box:
            loss_kept = fwd(mod)
        saved = box["bytes"]
        del loss_kept
        peak, how = peak_memory(lambda: fwd_bwd(mod), dev, exclude=[h, z] + params)
        loss, grads = fwd_bwd(mod)
        results[name] = (loss.detach().float(), [gr.detach().float() for gr in grads])
        tf, tfb = timings[f"{name}/fwd"], timings[f"{name}/fwd_bwd"]
        out[name] = dict(fwd=tf.median, fwd_bwd=tfb.median, saved=saved,
                         peak=peak if dev.type == "cuda" else None, peak_how=how, spread=tfb.spread)
    (lp, gp), (lf, gf) = results["plain"], results["fused"]
    out["loss_diff"] = float((lp - lf).abs())
    out["grad_rel_diff"] = max(float((a - b).norm() / (a.norm() + 1e-30)) for a, b in zip(gp, gf))
    sync(dev)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = setup(args)
    size = "smoke" if args.smoke else ("real" if args.real else "cpu")
    batch, side, models, z_dim, proj_dim = SIZES[size]
    batch = args.batch or batch
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    print(f"# sizes: {size}; batch {batch}, tokens {side}x{side}, target dim {z_dim}, mlp width {proj_dim}, "
          f"{'bf16 autocast' if dev.type == 'cuda' else 'fp32'}; median of {args.repeats} after {args.warmup} warm-up")
    rows, ratios, records = [], [], []
    for label, hidden in models:
        for preset in presets:
            r = bench_one(preset, hidden, batch, side, z_dim, proj_dim, args.chunk, dev, args)
            records.append(dict(model=label, hidden=hidden, preset=preset, **r))
            for impl in ("plain", "fused"):
                m = r[impl]
                rows.append([label, preset, impl, fmt_s(m["fwd"]), fmt_s(m["fwd_bwd"]), fmt_bytes(m["saved"]),
                             fmt_bytes(m["peak"]) if m["peak"] is not None else "n/a"])
            p, f = r["plain"], r["fused"]
            tag = f"{label} {preset}"
            ratios += [
                (f"{tag}: fused/plain fwd+bwd time", f["fwd_bwd"] / p["fwd_bwd"], "<1 = fused faster"),
                (f"{tag}: fused/plain saved bytes", f["saved"] / p["saved"] if p["saved"] else None,
                 "memory held between forward and backward"),
            ]
            if p["peak"]:
                ratios.append((f"{tag}: fused/plain peak memory", f["peak"] / p["peak"], "cuda allocator peak of fwd+bwd"))
            ratios.append((f"{tag}: max |loss diff|", r["loss_diff"], "fused vs plain, should be ~0"))
    print_table(["model", "preset", "impl", "fwd", "fwd+bwd", "saved for bwd", "peak fwd+bwd"], rows,
                title="Alignment module: fused vs plain")
    print("saved for bwd: bytes autograd keeps after forward (saved-tensor hooks, excluding h, targets, params); "
          "peak: torch.cuda.max_memory_allocated over fwd+bwd (GPU only)")
    print_ratios(ratios)
    payload = dict(bench="align", size=size, device=str(dev), batch=batch, records=records)
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
