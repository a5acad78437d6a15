"""``irepa-train`` and ``irepa-sample`` (built with fire; ``--help`` lists every flag).

``torchrun --nproc_per_node N -m irepa.trainer ...`` runs ``irepa-train`` under DDP.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["train", "sample", "main", "sample_main"]


def train(
    cache: str | None = None,
    model: str = "SiT-B/2",
    align: str = "irepa",
    proj_coeff: float | None = None,
    projector: str | None = None,
    projector_kernel: int | None = None,
    projector_dim: int | None = None,
    spatial_norm: str | None = None,
    gamma: float | None = None,
    encoder_depth: int | None = None,
    encoders: Any = None,
    batch_size: int = 256,
    lr: float = 1e-4,
    steps: int = 400_000,
    grad_accum: int = 1,
    ema: float = 0.9999,
    seed: int = 0,
    out: str | None = None,
    ckpt_every: int = 50_000,
    sample_every: int = 10_000,
    log_every: int = 100,
    compile: bool = False,
    online: bool = False,
    data: str | None = None,
    vae: str | None = None,
    encoder_weights: Any = None,
    resolution: int = 256,
    resume: bool | None = None,
    init_from: str | None = None,
    num_workers: int = 4,
    latent_norm: str = "sd",
    time_sampler: str = "uniform",
    path_type: str = "linear",
    device: str = "auto",
    precision: str = "bf16",
    class_dropout: float = 0.1,
    grad_clip: float = 1.0,
    qk_norm: bool = False,
    attn: str = "sdpa",
    fused_align: bool = True,
    hidden_size: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    patch_size: int | None = None,
    verify: bool = False,
    shuffle_buffer: int = 1000,
    sample_n: int = 16,
    sample_steps: int = 50,
    sample_method: str = "ode",
    sample_cfg: float = 1.0,
    tensorboard: bool = False,
    progress: bool = True,
) -> None:
    """Train a SiT with REPA / iREPA alignment from a feature cache (or --online from images).

    Args:
        cache: store folder written by `irepa-cache build` (zarr or webdataset).
        model: SiT-{S,B,L,XL}/{2,4,8}.
        align: irepa (conv k3, zscore gamma 1, coeff 1) | repa (mlp, coeff 0.5) |
            irepa-official-ldm (conv k1, gamma 0.6) | irepa-official-jit | none.
        proj_coeff: override the preset's alignment coefficient.
        projector: override the projector: mlp | conv | linear.
        projector_kernel: conv projector kernel size (odd).
        projector_dim: hidden width of the mlp projector (2048).
        spatial_norm: none | zscore.
        gamma: zscore mean weight (x - gamma * mean) / std.
        encoder_depth: 1-based block whose output is aligned (default 4 for S/B, 8 for L/XL).
        encoders: encoders to align to, comma separated (default: all in the store).
        batch_size: global batch (all ranks and accumulation steps together).
        lr: AdamW learning rate (constant, no weight decay, betas 0.9/0.999).
        steps: total optimizer steps.
        grad_accum: micro-batches per optimizer step.
        ema: EMA decay.
        seed: seeds the model init, the sample order and every per-step draw.
        out: run folder (default runs/<model>-<store>-<align>).
        ckpt_every: checkpoint every N steps (and at the end); 0 = only at the end.
        sample_every: PNG grid of EMA samples every N steps (needs the store's VAE offline); 0 = off.
        log_every: JSON metrics line every N steps (<out>/metrics.jsonl).
        compile: torch.compile the training step.
        online: compute latents and features from images every step (REPA's way; the baseline).
        data: images for --online (default: the source the store was built from).
        vae: VAE id / folder for --online and sample previews (default: the store's).
        encoder_weights: local encoder weights for --online (PATH or name=PATH,...).
        resolution: image size for --online without a store.
        resume: continue from the newest checkpoint in out (default: yes when there is one).
        init_from: start from weights of a REPA / iREPA / irepa checkpoint (EMA preferred).
        num_workers: DataLoader workers.
        latent_norm: sd ((z - shift) * scaling_factor, REPA's 0.18215) | stats (per-channel
            (z - mean_c) / std_c from the manifest, iREPA / REPA-E).
        time_sampler: uniform | lognormal.
        path_type: linear | cosine interpolant.
        device: auto | cpu | cuda | cuda:N.
        precision: bf16 (autocast on CUDA) | fp32.
        class_dropout: label-dropout probability for classifier-free guidance.
        grad_clip: gradient-norm clip (0 = off).
        qk_norm: LayerNorm on queries and keys.
        attn: sdpa | xformers | math.
        fused_align: fused alignment loss (recomputes in backward: less memory, ~1.3x the
            alignment head's time); --nofused_align uses the plain composition.
        hidden_size: tiny-model override (tests, demo).
        depth: tiny-model override.
        num_heads: tiny-model override.
        patch_size: model patch size override.
        verify: recompute the store's checksums before training.
        shuffle_buffer: samples in the shuffle buffer of webdataset stores.
        sample_n: images in each preview grid.
        sample_steps: sampler steps for previews.
        sample_method: ode | sde | heun for previews.
        sample_cfg: CFG scale for previews.
        tensorboard: also log to <out>/tensorboard.
        progress: show the tqdm bar.
    """
    from irepa.trainer.train import TrainConfig, run, split_list

    cfg = TrainConfig(
        cache=cache, model=model, align=align, proj_coeff=proj_coeff, projector=projector,
        projector_kernel=projector_kernel, projector_dim=projector_dim, spatial_norm=spatial_norm, gamma=gamma,
        encoder_depth=encoder_depth, encoders=split_list(encoders), batch_size=int(batch_size), lr=float(lr),
        steps=int(steps), grad_accum=int(grad_accum), ema=float(ema), seed=int(seed),
        out=None if out is None else str(out), ckpt_every=int(ckpt_every), sample_every=int(sample_every),
        log_every=int(log_every), compile=bool(compile), online=bool(online), data=None if data is None else str(data),
        vae=vae, encoder_weights=",".join(split_list(encoder_weights)) if encoder_weights else None,
        resolution=int(resolution), resume=resume, init_from=init_from, num_workers=int(num_workers),
        latent_norm=latent_norm, time_sampler=time_sampler, path_type=path_type, device=device,
        precision=precision, class_dropout=float(class_dropout), grad_clip=float(grad_clip), qk_norm=bool(qk_norm),
        attn=attn, fused_align=bool(fused_align), hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size,
        verify=bool(verify), shuffle_buffer=int(shuffle_buffer), sample_n=int(sample_n),
        sample_steps=int(sample_steps), sample_method=sample_method, sample_cfg=float(sample_cfg),
        tensorboard=bool(tensorboard), progress=bool(progress))
    run(cfg)


def sample(
    ckpt: str | None = None,
    init_from: str | None = None,
    out: str = "samples",
    num_samples: int = 64,
    batch_size: int = 32,
    method: str = "sde",
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 0.7,
    labels: Any = None,
    seed: int = 0,
    vae: str | None = None,
    use_ema: bool = True,
    model: str = "SiT-XL/2",
    resolution: int = 256,
    num_classes: int = 1000,
    latent_norm: str = "sd",
    scaling_factor: float = 0.18215,
    path_type: str = "linear",
    qk_norm: bool = False,
    hidden_size: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    patch_size: int | None = None,
    grid: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> None:
    """Sample from a trained SiT; write a PNG grid and the ADM evaluation suite's .npz.

    Args:
        ckpt: an irepa-train checkpoint (.pt) or run folder (its newest checkpoint).
        init_from: a REPA / iREPA release or training checkpoint instead (give --model etc.).
        out: output folder: samples.npz (uint8 [N, H, W, 3] under arr_0) and grid.png.
        num_samples: number of images (50000 for FID).
        batch_size: images per forward batch per rank.
        method: ode (Euler) | sde (Euler-Maruyama) | heun.
        steps: sampler steps (REPA's headline: sde, 250).
        cfg_scale: classifier-free guidance scale (REPA's FID setting: 1.8).
        guidance_low: CFG is applied for guidance_low <= t <= guidance_high.
        guidance_high: upper end of the guidance interval (REPA: 0.7).
        labels: class labels (comma separated, cycled); default: random per image from seed.
        seed: image i's noise and label depend on (seed, i) only, not on ranks or batch size.
        vae: VAE id / folder (default: the checkpoint's store VAE, else stabilityai/sd-vae-ft-ema).
        use_ema: sample with the EMA weights.
        model: SiT name for --init-from checkpoints.
        resolution: image size for --init-from checkpoints (latent = resolution / 8).
        num_classes: classes for --init-from checkpoints.
        latent_norm: sd | stats latent scaling for --init-from checkpoints.
        scaling_factor: SD-VAE scaling for --init-from checkpoints.
        path_type: linear | cosine (for --init-from checkpoints; ours record it).
        qk_norm: for --init-from checkpoints.
        hidden_size: tiny-model override for --init-from checkpoints.
        depth: tiny-model override.
        num_heads: tiny-model override.
        patch_size: patch-size override.
        grid: images in grid.png (0 = none).
        device: auto | cpu | cuda.
        progress: show a tqdm bar.
    """
    run_sampling(**{k: v for k, v in locals().items()})


# ----------------------------------------------------------------------------- irepa-sample


def _load_sampling_model(ckpt: str | None, init_from: str | None, use_ema: bool, kw: dict):
    """(model, latent norm, vae id, path type) from our checkpoint or a REPA/iREPA one."""
    from irepa.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from irepa.trainer.data import LatentNorm
    from irepa.trainer.models import build_sit, load_reference_state_dict

    if ckpt is not None:
        p = Path(ckpt)
        if p.is_dir():
            found = latest_checkpoint(p)
            if found is None:
                raise FileNotFoundError(f"--ckpt {p}: run folder without checkpoints")
            p = found
        c = load_checkpoint(p)
        mc = dict(c["model_config"])
        name = mc.pop("name")
        model = build_sit(name, **mc)
        weights = c["ema"] if (use_ema and c.get("ema") is not None) else c["model"]
        model.load_state_dict(weights)
        extra = c.get("extra") or {}
        norm = LatentNorm.from_dict(json.loads(extra["latent_norm"])) if "latent_norm" in extra else \
            LatentNorm("sd", 0.18215, 0.0)
        vae_id = (json.loads(extra.get("vae", "{}")) or {}).get("id")
        return model, norm, vae_id, c["args"].get("path_type", "linear")
    if init_from is None:
        raise ValueError("irepa-sample needs --ckpt (an irepa-train checkpoint or run folder) or --init-from")
    from irepa.trainer.train import load_foreign_checkpoint

    over = {k: int(kw[k]) for k in ("hidden_size", "depth", "num_heads", "patch_size") if kw.get(k) is not None}
    if kw["resolution"] % 8:
        raise ValueError(f"--resolution {kw['resolution']} is not a multiple of the VAE factor 8")
    model = build_sit(kw["model"], input_size=kw["resolution"] // 8, in_channels=4, num_classes=kw["num_classes"],
                      z_dims=(), qk_norm=kw["qk_norm"], **over)
    sd = load_foreign_checkpoint(init_from)
    load_reference_state_dict(model, sd, prefer="ema" if use_ema else "model", strict=False, source=str(init_from))
    if kw["latent_norm"] != "sd":
        raise ValueError("--init-from checkpoints sample with --latent-norm sd (REPA's scaling); "
                         "per-channel stats are only known for irepa-train checkpoints")
    return model, LatentNorm("sd", kw["scaling_factor"], 0.0), None, kw["path_type"]


def _parse_labels(labels: Any) -> list[int] | None:
    if labels is None:
        return None
    if isinstance(labels, (int, float)):
        return [int(labels)]
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    return [int(v) for v in items if str(v).strip() != ""]


def run_sampling(**kw: Any) -> Path:
    """Implementation of ``irepa-sample`` (see :func:`sample`). Returns the .npz path."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from irepa.trainer.data import mix_seed
    from irepa.trainer.sample import sample as integrate
    from irepa.trainer.train import save_image_grid, setup_distributed

    d = setup_distributed(kw["device"])
    try:
        model, norm, vae_id, path_type = _load_sampling_model(kw["ckpt"], kw["init_from"], kw["use_ema"], kw)
        model = model.to(d.device).eval()
        from irepa.pipeline.vae import load_vae

        vae = load_vae(kw["vae"] or vae_id or "stabilityai/sd-vae-ft-ema", device=d.device)
        out = Path(kw["out"])
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
        if d.enabled:
            dist.barrier()
        n = int(kw["num_samples"])
        per = int(math.ceil(n / d.world_size))
        mine = list(range(d.rank * per, min(n, (d.rank + 1) * per)))
        fixed = _parse_labels(kw["labels"])
        C = model.in_channels
        h, w = model.input_size
        images, order = [], []
        bs = max(1, int(kw["batch_size"]))
        bar = None
        if d.main and kw["progress"]:
            from tqdm import tqdm
            bar = tqdm(total=len(mine), unit="img", desc="irepa-sample")
        for s in range(0, len(mine), bs):
            idx = mine[s:s + bs]
            zs, ys = [], []
            for i in idx:  # image i depends on (seed, i) only
                g = torch.Generator().manual_seed(mix_seed("sample", kw["seed"], i))
                zs.append(torch.randn((C, h, w), generator=g))
                ys.append(fixed[i % len(fixed)] if fixed else int(torch.randint(model.num_classes, (1,), generator=g)))
            z = torch.stack(zs).to(d.device)
            y = torch.as_tensor(ys, dtype=torch.long, device=d.device)
            gen = [torch.Generator(device=d.device).manual_seed(mix_seed("sample-sde", kw["seed"], i)) for i in idx]
            x = integrate(model, z, y, method=kw["method"], steps=int(kw["steps"]), cfg_scale=float(kw["cfg_scale"]),
                          guidance_interval=(float(kw["guidance_low"]), float(kw["guidance_high"])),
                          generator=gen, path=path_type)
            img = vae.decode(norm.denormalize(x.float()))  # uint8 [b, 3, H, W]
            images.append(img.permute(0, 2, 3, 1).cpu().numpy())
            order.extend(idx)
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        H, W = h * vae.downsample, w * vae.downsample
        arr = np.concatenate(images) if images else np.zeros((0, H, W, 3), np.uint8)
        part = out / f".part-{d.rank:05d}.npz"
        _atomic_npz(part, arr_0=arr.astype(np.uint8), index=np.asarray(order, dtype=np.int64))
        if d.enabled:
            dist.barrier()
        final = out / "samples.npz"
        if d.main:
            parts = [np.load(out / f".part-{r:05d}.npz", allow_pickle=False) for r in range(d.world_size)]
            allx = np.concatenate([p["arr_0"] for p in parts])
            alli = np.concatenate([p["index"] for p in parts])
            allx = allx[np.argsort(alli, kind="stable")]
            _atomic_npz(final, arr_0=allx)
            for r in range(d.world_size):
                (out / f".part-{r:05d}.npz").unlink()
            if kw["grid"] and len(allx):
                save_image_grid(allx[: int(kw["grid"])], out / "grid.png")
            print(f"[irepa-sample] wrote {final} ({allx.shape[0]} images, {allx.shape[1]}x{allx.shape[2]})", flush=True)
        if d.enabled:
            dist.barrier()
        return final
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _atomic_npz(path: Path, **arrays: Any) -> None:
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    """Console entry point of ``irepa-train``."""
    from irepa.pipeline.cli import run_fire

    run_fire(train, "irepa-train")


def sample_main() -> None:
    """Console entry point of ``irepa-sample``."""
    from irepa.pipeline.cli import run_fire

    run_fire(sample, "irepa-sample")


if __name__ == "__main__":
    main()
