"""Benchmark 1: one training step from the cache vs online encoding vs no alignment.

The step is the trainer's own (the flow objective's draws and ``FlowStep`` phase module with
``AlignmentLoss``, AdamW, grad-norm clip, EMA update), on one
model instance, one batch size and one loss, with three input paths:

* ``no-align``  plain SiT: latents from the store, ``FlowStep`` without alignment (projector
  parameters get no gradient), what training without REPA costs;
* ``cached``    latents and encoder features from a store: one batch read through the trainer's
  loader (``trainer.data.StoreLoader`` over a zarr store written by ``stores``), copied to the
  device every step as ``CacheSource`` does;
* ``online``    ADM-cropped uint8 images copied to the device, then the VAE and the encoder run
  every step (``trainer.online.OnlineSource.encode``, the trainer's ``--online``).

Image decoding is left out of ``online`` (DataLoader workers do it; see ``bench.build`` for its
rate) and reading is left out of ``cached`` (see ``bench.loader``). Rows ``online: VAE`` and
``online: encoder`` time the two halves of the online encode alone: the profile of where the
online step's extra time goes. Models are random-initialised at real sizes (SD-VAE from its
config, timm encoders with ``pretrained=False``): timing needs shapes, not weights. On CUDA the
step runs under bf16 autocast, as ``irepa-train`` does by default.

    python -m bench.train_step                 # CPU-sized: SiT-S/2, 128 px, SD-VAE, DINOv2-B, batch 2
    python -m bench.train_step --real          # SiT-B/2 + SiT-XL/2 x DINOv2-B + SigLIP-B, 256 px, batch 64

A second table times ``--objective meanflow`` against flow on the same model, batch and alignment
(``meanflow_vs_flow``): the whole training step of each (cached input path, AdamW, clip, EMA), and
MeanFlow's three passes alone (guidance forward, JVP on the math attention, gradient pass).

    python -m bench.train_step --meanflow-only                 # that table alone (no VAE, no online path)
    python -m bench.train_step --meanflow-only --mf-preset unguided   # without the guidance forward
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from irepa.pipeline.defaults import SD_VAE_SCALE

from bench.common import (add_common_args, count_flops, fmt_bytes, fmt_s, make_vae, peak_memory, print_ratios,
                          print_table, sample_images, setup, step_sizes, time_interleaved, write_json)

SIZES = {
    # models [(name, overrides)], resolution, batch, vae kind, encoders, encoder config
    "smoke": dict(models=[("SiT-S/2", dict(hidden_size=32, depth=2, num_heads=2))], resolution=64, batch=2,
                  vae="tiny", encoders=["dinov2-vit-b"], encoder_config="tiny"),
    "cpu": dict(models=[("SiT-S/2", {})], resolution=128, batch=2, vae="sd-random",
                encoders=["dinov2-vit-b"], encoder_config=None),
    "real": dict(models=[("SiT-B/2", {}), ("SiT-XL/2", {})], resolution=256, batch=64, vae="sd-random",
                 encoders=["dinov2-vit-b", "siglip-vit-b"], encoder_config=None),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="real sizes (GPU): SiT-B/2, SiT-XL/2, 256 px, batch 64")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 2 CPU / 64 real)")
    p.add_argument("--models", default=None, help="comma list of SiT names to run (default: per size)")
    p.add_argument("--encoders", default=None, help="comma list of encoder names (default: per size)")
    p.add_argument("--align", default="irepa", help="alignment preset for cached/online (default irepa)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="CUDA autocast (default bf16)")
    p.add_argument("--meanflow-only", action="store_true",
                   help="only the second table (--objective meanflow vs flow); no VAE, no online path")
    p.add_argument("--mf-preset", default="b2", help="MeanFlow guidance preset of the meanflow table (default b2: "
                                                     "one guidance forward of 2B; unguided: none)")
    add_common_args(p, repeats=5, warmup=2)
    return p.parse_args(argv)


def cached_batch(work: Path, size: dict, batch: int, enc_dim: int, enc: str) -> dict:
    """One batch as the trainer's loader delivers it, from a real zarr store of ``batch`` samples."""
    from irepa.stores.testing import make_synthetic_store
    from irepa.trainer.data import LoaderSpec, StoreLoader

    R = size["resolution"]
    grid = (R // 16, R // 16)
    path = make_synthetic_store(work / f"store-{enc}", num_samples=batch, encoders={enc: enc_dim}, grid=grid,
                                latent_channels=4, shard_size=batch, num_classes=1000)
    from irepa.stores import open_store

    reader = open_store(path)
    loader = StoreLoader(path, kind="index", num_samples=len(reader), spec=LoaderSpec(global_batch=batch),
                         encoders=[enc], steps=1, num_workers=0)
    b = next(iter(loader))
    return b


def run_combo(model_name: str, overrides: dict, enc_name: str, size: dict, batch: int, dev: torch.device,
              args, work: Path, vae) -> dict:
    from irepa.pipeline.encoders import load_encoder
    from irepa.trainer.align import AlignmentLoss, resolve_align
    from irepa.trainer.data import LatentNorm
    from irepa.trainer.loss import FlowMatching
    from irepa.trainer.models import build_sit
    from irepa.trainer.objectives.flow import FlowStep
    from irepa.trainer.online import OnlineSource
    from irepa.trainer.train import update_ema

    R = size["resolution"]
    enc = load_encoder(enc_name, resolution=R, pretrained=False, config=size["encoder_config"]).eval().to(dev)
    align_cfg = resolve_align(args.align)
    with torch.device(dev):
        torch.manual_seed(0)
        model = build_sit(model_name, input_size=R // 8, in_channels=4, num_classes=1000,
                          encoder_depth=align_cfg.encoder_depth, z_dims=[enc.dim], projector=align_cfg.projector,
                          projector_kernel=align_cfg.kernel, projector_dim=align_cfg.projector_dim, **overrides)
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    fm = FlowMatching("linear", "uniform")
    amp = torch.bfloat16 if (dev.type == "cuda" and args.precision == "bf16") else None
    latent_norm = LatentNorm("sd", SD_VAE_SCALE, 0.0)
    objectives = {
        "aligned": FlowStep(model, fm, AlignmentLoss(model.projectors, align_cfg), align_cfg.coeff, latent_norm,
                            lambda: _amp(dev, amp), [enc_name]),
        "plain": FlowStep(model, fm, None, 0.0, latent_norm, lambda: _amp(dev, amp), []),
    }

    def draw(i: int) -> dict:
        return flow_draws(fm, batch, (4, R // 8, R // 8), dev, i)

    host = cached_batch(work, size, batch, enc.dim, enc_name)
    images = sample_images(R, batch)
    labels = host["label"]
    if dev.type == "cuda":
        host = {"latents": host["latents"].pin_memory(), "label": labels.pin_memory(),
                "features": {k: v.pin_memory() for k, v in host["features"].items()}}
        images = images.pin_memory()
    online = OnlineSource(None, np.arange(batch), R, vae, {enc_name: enc}, 1000, dev, None, False)
    nb = dev.type == "cuda"

    def from_cache(with_features: bool) -> dict:
        return {"latents": host["latents"].to(dev, non_blocking=nb),
                "features": [host["features"][enc_name].to(dev, non_blocking=nb)] if with_features else [],
                "label": host["label"].to(dev, non_blocking=nb)}

    def from_images() -> dict:
        lat, feats = online.encode(images)
        return {"latents": lat, "features": feats, "label": labels.to(dev, non_blocking=nb)}

    counter = [0]

    def step(objective, get_batch) -> None:
        b = get_batch()
        g = draw(counter[0])
        counter[0] += 1
        opt.zero_grad(set_to_none=True)
        res = objective(b, g, {})
        res["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_ema(ema, model, 0.9999)

    def amp_ctx():
        return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def vae_only():
        with torch.no_grad(), amp_ctx():
            vae.encode(images.to(dev, non_blocking=nb))

    def enc_only():
        with torch.no_grad(), amp_ctx():
            enc(images.to(dev, non_blocking=nb))

    fns = {
        "no-align": lambda: step(objectives["plain"], lambda: from_cache(False)),
        "cached": lambda: step(objectives["aligned"], lambda: from_cache(True)),
        "online": lambda: step(objectives["aligned"], from_images),
        "online: VAE": vae_only,
        "online: encoder": enc_only,
    }
    t = time_interleaved(fns, dev, args.warmup, args.repeats)
    peaks = {}
    if dev.type == "cuda":
        for k in ("no-align", "cached", "online"):
            peaks[k] = peak_memory(fns[k], dev)[0]
    one = images[:1].to(dev)
    flops = {"vae": count_flops(lambda: vae_only_one(vae, one, dev)),
             "encoder": count_flops(lambda: enc(one))}
    flops.update({f"step {k}": v for k, v in step_flops(model_name, overrides, R, enc.dim, align_cfg).items()})
    del model, ema, opt, objectives, online
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return dict(model=model_name, encoder=enc_name, enc_dim=enc.dim, batch=batch, times={k: v.median for k, v in t.items()},
                spread={k: v.spread for k, v in t.items()}, peaks=peaks, flops_per_image=flops)


def meanflow_vs_flow(model_name: str, overrides: dict, enc_dim: int, size: dict, batch: int, dev: torch.device,
                     args) -> dict:
    """Step time of ``--objective meanflow`` vs flow on the same model size, batch, alignment and
    precision (AdamW, clip and EMA included, inputs already on the device), plus MeanFlow's
    passes alone. Guidance: ``--mf-preset`` (default the release's B recipe, w 1.0, k 0.5: one 2B
    guidance forward; ``unguided``: none, and its guidance row times the no-op)."""
    from types import SimpleNamespace

    from irepa.trainer.align import AlignmentLoss, resolve_align
    from irepa.trainer.data import LatentNorm, sample_posterior
    from irepa.trainer.loss import FlowMatching
    from irepa.trainer.models import build_sit
    from irepa.trainer.objectives import DataSpec, get_objective
    from irepa.trainer.objectives.flow import FlowStep
    from irepa.trainer.train import update_ema

    R = size["resolution"]
    hw, grid = R // 8, R // 16
    align_cfg = resolve_align(args.align)
    amp = torch.bfloat16 if (dev.type == "cuda" and args.precision == "bf16") else None
    latent_norm = LatentNorm("sd", SD_VAE_SCALE, 0.0)
    mf_cls = get_objective("meanflow")
    cfg = SimpleNamespace(model=model_name, qk_norm=False, class_dropout=0.1, attn="sdpa", fused_align=True,
                          sample_method=None,
                          **{k: overrides.get(k) for k in ("hidden_size", "depth", "num_heads", "patch_size")})
    data = DataSpec(latent_shape=(8, hw, hw), encoders=["enc"], feature_dims=[enc_dim], token_grids=[(grid, grid)],
                    num_classes=1000, latent_norm=latent_norm)
    mf = mf_cls(cfg, mf_cls.Options(mf_preset=args.mf_preset), data, align_cfg, dev, amp)
    g = torch.Generator(device="cpu").manual_seed(0)
    posterior = [torch.randn(batch, 4, hw, hw, generator=g), torch.rand(batch, 4, hw, hw, generator=g)]
    batch_in = {"latents": torch.cat(posterior, 1).to(dev),
                "label": torch.randint(0, 1000, (batch,), generator=g).to(dev),
                "features": [torch.randn(batch, grid * grid, enc_dim, generator=g).to(dev, torch.float16)]}
    runs = {}
    with torch.device(dev):
        torch.manual_seed(0)
        flow_model = build_sit(model_name, input_size=hw, in_channels=4, num_classes=1000,
                               encoder_depth=align_cfg.encoder_depth, z_dims=[enc_dim], projector=align_cfg.projector,
                               projector_kernel=align_cfg.kernel, projector_dim=align_cfg.projector_dim, **overrides)
        torch.manual_seed(0)
        mf_model = mf.build_model(mf.model_config())
    fm = FlowMatching("linear", "uniform")
    flow_obj = FlowStep(flow_model, fm, AlignmentLoss(flow_model.projectors, align_cfg), align_cfg.coeff, latent_norm,
                        lambda: _amp(dev, amp), ["enc"])
    phase = mf.phases(mf_model, {})[0]
    for name, model in (("flow", flow_model), ("meanflow", mf_model)):
        runs[name] = dict(model=model, ema=copy.deepcopy(model).requires_grad_(False),
                          opt=torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0))
    counter = [0]

    def gen() -> torch.Generator:
        counter[0] += 1
        return torch.Generator(device=dev).manual_seed(counter[0])

    def finish(name: str, loss: torch.Tensor) -> None:
        r = runs[name]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 1.0)
        r["opt"].step()
        update_ema(r["ema"], r["model"], 0.9999)

    def flow_step() -> None:
        runs["flow"]["opt"].zero_grad(set_to_none=True)
        d = flow_draws(fm, batch, (4, hw, hw), dev, counter[0])
        counter[0] += 1
        finish("flow", flow_obj(batch_in, d, {})["loss"])

    def mf_step() -> None:
        runs["meanflow"]["opt"].zero_grad(set_to_none=True)
        finish("meanflow", phase.module(batch_in, mf.draw(batch, gen(), dev), {})["loss"])

    # MeanFlow's passes alone, on one fixed draw
    m = phase.module
    d0 = mf.draw(batch, gen(), dev)
    x0 = latent_norm.normalize(sample_posterior(batch_in["latents"], d0["post"]))
    tb = d0["t"].view(-1, 1, 1, 1)
    z0, v0 = (1 - tb) * x0 + tb * d0["eps"], d0["eps"] - x0
    y_in = torch.where(d0["drop"], torch.full_like(batch_in["label"], 1000), batch_in["label"])

    def grad_pass() -> None:
        mf_model.zero_grad(set_to_none=True)
        with m._autocast(dev):
            u, h = mf_model(z0, d0["t"], y_in, force_drop_ids=torch.zeros_like(y_in), r=d0["r"])
            loss = u.float().square().mean() + m.align(h, batch_in["features"])["loss"].float()
        loss.backward()

    def jvp_torch_linear_rule() -> None:
        """The JVP with PyTorch's own forward-mode rule for linear layers (a third, zero matmul)."""
        import irepa.trainer.objectives.meanflow as mfmod

        saved, mfmod._TangentLinears = mfmod._TangentLinears, contextlib.nullcontext
        try:
            m.du_dt(z0, d0["t"], d0["r"], v0, y_in)
        finally:
            mfmod._TangentLinears = saved

    fns = {"flow step": flow_step, "meanflow step": mf_step,
           "meanflow: guidance pass": lambda: m.guided_velocity(z0, d0["t"], v0, batch_in["label"], d0["drop"]),
           "meanflow: JVP (math attention)": lambda: m.du_dt(z0, d0["t"], d0["r"], v0, y_in),
           "meanflow: gradient pass": grad_pass,
           "meanflow: JVP, torch's linear rule": jvp_torch_linear_rule}
    t = time_interleaved(fns, dev, args.warmup, args.repeats)
    peaks = {}
    if dev.type == "cuda":
        for k in ("flow step", "meanflow step", "meanflow: JVP (math attention)"):
            peaks[k] = peak_memory(fns[k], dev)[0]
    del runs, flow_obj, phase, m
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return dict(model=model_name, batch=batch, times={k: v.median for k, v in t.items()},
                spread={k: v.spread for k, v in t.items()}, peaks=peaks)


def meanflow_flops(model_name: str, overrides: dict, R: int, z_dim: int, align_cfg, preset: str) -> dict[str, int]:
    """FLOPs per image of a flow step and of a MeanFlow step (and of its guidance and JVP passes;
    the gradient pass is the rest), forward + backward, counted on the meta device with the plain
    alignment composition (see :func:`step_flops`): the machine-independent floor of the ratio."""
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode

    from irepa.trainer.align import AlignmentLoss
    from irepa.trainer.data import LatentNorm
    from irepa.trainer.loss import FlowMatching
    from irepa.trainer.models import build_sit
    from irepa.trainer.objectives import DataSpec, get_objective
    from irepa.trainer.objectives.flow import FlowStep

    hw, grid, b = R // 8, R // 16, 2
    meta = torch.device("meta")
    norm = LatentNorm("sd", SD_VAE_SCALE, 0.0)
    cfg = SimpleNamespace(model=model_name, qk_norm=False, class_dropout=0.1, attn="sdpa", fused_align=False,
                          sample_method=None,
                          **{k: overrides.get(k) for k in ("hidden_size", "depth", "num_heads", "patch_size")})
    data = DataSpec(latent_shape=(8, hw, hw), encoders=["enc"], feature_dims=[z_dim], token_grids=[(grid, grid)],
                    num_classes=1000, latent_norm=norm)
    cls = get_objective("meanflow")
    mf = cls(cfg, cls.Options(mf_preset=preset), data, align_cfg, meta)
    with meta:
        flow_model = build_sit(model_name, input_size=hw, in_channels=4, num_classes=1000,
                               encoder_depth=align_cfg.encoder_depth, z_dims=[z_dim], projector=align_cfg.projector,
                               projector_kernel=align_cfg.kernel, projector_dim=align_cfg.projector_dim, **overrides)
        mf_model = mf.build_model(mf.model_config())
        lat = torch.randn(b, 4, hw, hw)
        batch = {"latents": torch.randn(b, 8, hw, hw), "label": torch.zeros(b, dtype=torch.long),
                 "features": [torch.randn(b, grid * grid, z_dim)]}
        draws = {"post": lat, "eps": torch.randn_like(lat), "t": torch.rand(b), "r": torch.rand(b),
                 "drop": torch.zeros(b, dtype=torch.bool)}
    flow = FlowStep(flow_model, FlowMatching(), AlignmentLoss(flow_model.projectors, align_cfg, fused=False),
                    align_cfg.coeff, norm, contextlib.nullcontext, ["enc"])
    m = mf.phases(mf_model, {})[0].module
    y = batch["label"]
    runs = {"flow step": lambda: flow(batch, draws, {})["loss"].backward(),
            "meanflow step": lambda: m(batch, draws, {})["loss"].backward(),
            "meanflow: guidance pass": lambda: m.guided_velocity(lat, draws["t"], lat, y, draws["drop"]),
            "meanflow: JVP (math attention)": lambda: m.du_dt(lat, draws["t"], draws["r"], lat, y)}
    out = {}
    for name, fn in runs.items():
        with FlopCounterMode(display=False) as fc:
            fn()
        out[name] = fc.get_total_flops() // b
    import irepa.trainer.objectives.meanflow as mfmod

    saved, mfmod._TangentLinears = mfmod._TangentLinears, contextlib.nullcontext
    try:
        with FlopCounterMode(display=False) as fc:
            m.du_dt(lat, draws["t"], draws["r"], lat, y)
        out["meanflow: JVP, torch's linear rule"] = fc.get_total_flops() // b
    finally:
        mfmod._TangentLinears = saved
    out["meanflow: gradient pass"] = (out["meanflow step"] - out["meanflow: guidance pass"]
                                      - out["meanflow: JVP (math attention)"])
    return out


def step_flops(model_name: str, overrides: dict, R: int, z_dim: int, align_cfg) -> dict[str, int]:
    """FLOPs of one image's training forward+backward with and without alignment, counted on
    the meta device (no memory, no time): the floor of the alignment overhead ratio."""
    from torch.utils.flop_counter import FlopCounterMode

    from irepa.trainer.align import AlignmentLoss
    from irepa.trainer.data import LatentNorm
    from irepa.trainer.loss import FlowMatching
    from irepa.trainer.models import build_sit
    from irepa.trainer.objectives.flow import FlowStep

    out = {}
    with torch.device("meta"):
        model = build_sit(model_name, input_size=R // 8, in_channels=4, num_classes=1000,
                          encoder_depth=align_cfg.encoder_depth, z_dims=[z_dim], projector=align_cfg.projector,
                          projector_kernel=align_cfg.kernel, projector_dim=align_cfg.projector_dim, **overrides)
        lat = torch.randn(2, 8, R // 8, R // 8)
        draws = {"post": torch.randn(2, 4, R // 8, R // 8), "eps": torch.randn(2, 4, R // 8, R // 8),
                 "t": torch.rand(2), "drop": torch.zeros(2, dtype=torch.bool)}
        y = torch.zeros(2, dtype=torch.long)
        z = torch.randn(2, (R // 16) ** 2, z_dim)
    fm = FlowMatching()
    # FlopCounterMode cannot follow the fused Function's recompute inside backward, so the
    # plain composition is counted and the fused one adds one more projector forward.
    for name, align in (("no-align", None), ("cached plain", AlignmentLoss(model.projectors, align_cfg, fused=False))):
        obj = FlowStep(model, fm, align, align_cfg.coeff if align else 0.0, LatentNorm("sd", SD_VAE_SCALE, 0.0),
                       contextlib.nullcontext, ["enc"] if align else [])
        with FlopCounterMode(display=False) as fc:
            obj({"latents": lat, "label": y, "features": [z] if align else []}, draws, {})["loss"].backward()
        out[name] = fc.get_total_flops() // 2
    with torch.device("meta"):
        h = torch.randn(2, (R // 16) ** 2, model.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.projectors[0](h)
    out["cached"] = out["cached plain"] + fc.get_total_flops() // 2
    return out


def flow_draws(fm, batch: int, latent: tuple[int, int, int], dev: torch.device, seed: int) -> dict:
    """The flow objective's own draws of one step (posterior noise, t, eps, label drop)."""
    from irepa.trainer.config import TrainConfig
    from irepa.trainer.objectives import DataSpec
    from irepa.trainer.objectives.flow import Flow, FlowOptions

    flow = Flow(TrainConfig(), FlowOptions(fm.path, fm.time_sampler), DataSpec(latent_shape=(2 * latent[0], *latent[1:])),
                None, dev)
    return flow.draw(batch, torch.Generator(device=dev).manual_seed(seed), dev)


def encoder_dim(name: str, size: dict) -> int:
    """Feature dim D of a registry encoder (built random on the CPU, then dropped)."""
    from irepa.pipeline.encoders import load_encoder

    return int(load_encoder(name, resolution=size["resolution"], pretrained=False, config=size["encoder_config"]).dim)


def _amp(dev: torch.device, dtype):
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def vae_only_one(vae, img, dev):
    with torch.no_grad():
        vae.encode(img)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = setup(args)
    sizes = step_sizes(args, dev, SIZES)
    size_name, size, batch, models, encoders, prec = (sizes.name, sizes.table, sizes.batch, sizes.models,
                                                      sizes.encoders, sizes.precision)
    print(f"# sizes: {size_name}; {size['resolution']} px, batch {batch}, VAE {size['vae']}, align {args.align}, "
          f"{prec}; median of {args.repeats} interleaved steps after {args.warmup} warm-up")
    vae = None if args.meanflow_only else make_vae(size["vae"]).eval().to(dev)
    work = Path(tempfile.mkdtemp(prefix="irepa-bench-step-"))
    records, rows, ratios = [], [], []
    mf_records, mf_rows = [], []
    try:
        for model_name, overrides in models if not args.meanflow_only else []:
            for enc_name in encoders:
                r = run_combo(model_name, overrides, enc_name, size, batch, dev, args, work, vae)
                records.append(r)
                tm = r["times"]
                for k in ("no-align", "cached", "online", "online: VAE", "online: encoder"):
                    rows.append([model_name, enc_name, k, fmt_s(tm[k]), f"{batch / tm[k]:.1f}",
                                 f"{r['spread'][k]:.2f}", fmt_bytes(r["peaks"][k]) if k in r["peaks"] else "n/a"])
                tag = f"{model_name} + {enc_name}"
                ratios += [
                    (f"{tag}: online/cached step time", tm["online"] / tm["cached"], "goal >= 1.5 on GPU for SiT-B/2 + DINOv2-B"),
                    (f"{tag}: cached/no-align step time", tm["cached"] / tm["no-align"], "alignment overhead; goal <= 1.05"),
                    (f"{tag}: FLOPs cached/no-align", r["flops_per_image"]["step cached"] / r["flops_per_image"]["step no-align"],
                     "floor of the alignment overhead (fused: + one projector forward)"),
                    (f"{tag}: (VAE + encoder)/online", (tm["online: VAE"] + tm["online: encoder"]) / tm["online"],
                     "share of the online step spent encoding"),
                ]
        if records:  # printed before the meanflow table, so that a time limit hit there keeps it
            print_table(["model", "encoder", "input path", "step", "img/s", "spread", "peak mem"], rows,
                        title="Train step: cached vs online vs no alignment")
            for r in records:
                f = r["flops_per_image"]
                print(f"FLOPs per image: {r['model']} step {f['step no-align'] / 1e9:.1f} G (no align), "
                      f"{f['step cached'] / 1e9:.1f} G ({args.align}); VAE encode {f['vae'] / 1e9:.1f} G; "
                      f"{r['encoder']} {f['encoder'] / 1e9:.1f} G")
            print(f"at {size['resolution']} px. spread: (max - min) / median of the repeats. "
                  "peak mem: cuda allocator peak of one step above the resident model and optimizer (GPU only).",
                  flush=True)
        for model_name, overrides in models:
            enc_dim = next((r["enc_dim"] for r in records if r["model"] == model_name), None)
            if enc_dim is None:
                enc_dim = encoder_dim(encoders[0], size)
            mr = meanflow_vs_flow(model_name, overrides, enc_dim, size, batch, dev, args)
            from irepa.trainer.align import resolve_align

            mr["flops_per_image"] = fl = meanflow_flops(model_name, overrides, size["resolution"], enc_dim,
                                                        resolve_align(args.align), args.mf_preset)
            mf_records.append(mr)
            tm = mr["times"]
            for k in tm:
                mf_rows.append([model_name, k, fmt_s(tm[k]), f"{batch / tm[k]:.1f}", f"{mr['spread'][k]:.2f}",
                                fmt_bytes(mr["peaks"][k]) if k in mr["peaks"] else "n/a", f"{fl[k] / 1e9:.4g} G"])
            ratios.append((f"{model_name}: FLOPs meanflow/flow step", fl["meanflow step"] / fl["flow step"],
                           "machine-independent floor of the step time ratio"))
            ratios.append((f"{model_name}: meanflow/flow step time", tm["meanflow step"] / tm["flow step"],
                           f"same model, batch, align {args.align}; expected 1.5-2.5"))
            ratios.append((f"{model_name}: meanflow JVP/gradient pass", tm["meanflow: JVP (math attention)"]
                           / tm["meanflow: gradient pass"], "cost of the target's JVP vs forward+backward"))
            ratios.append((f"{model_name}: meanflow JVP, linear rule here/torch's", tm["meanflow: JVP (math attention)"]
                           / tm["meanflow: JVP, torch's linear rule"], "2 matmuls per linear instead of 3"))
            ratios.append((f"{model_name}: meanflow guidance/gradient pass", tm["meanflow: guidance pass"]
                           / tm["meanflow: gradient pass"], f"guidance forward ({args.mf_preset}) vs forward+backward"))
        print_table(["model", "step / pass", "time", "img/s", "spread", "peak mem", "FLOPs / image"], mf_rows,
                    title=f"Train step: --objective meanflow vs flow (cached, align {args.align}, "
                          f"--mf-preset {args.mf_preset}, {size['resolution']} px, batch {batch})")
        print_ratios(ratios)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload = dict(bench="train_step", size=size_name, device=str(dev), records=records, meanflow=mf_records)
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
