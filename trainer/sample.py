"""Samplers for SiT velocity models, integrating from t = 1 (noise) to t = 0 (data).

Follows REPA's ``samplers.py``:

``ode``   Euler on t = linspace(1, 0, steps + 1); one model call per step.
``heun``  Heun (2nd order) on the same grid; the last step (to t = 0) is a plain Euler step,
          as in REPA, so ``steps`` steps cost ``2 * steps - 1`` model calls.
``sde``   Euler-Maruyama on t = linspace(1, 0.04, steps) then a final deterministic step to
          0 (the mean, no noise): ``steps`` model calls. Diffusion coefficient w(t) = 2 t;
          drift = v - w/2 * score, with the score recovered from the velocity:
          score = (alpha_t / alpha'_t * v - x) / (sigma_t^2 - alpha_t / alpha'_t * sigma'_t sigma_t).

Classifier-free guidance: v = v_uncond + s (v_cond - v_uncond) with the null class
``model.num_classes``, applied only while guidance_low <= t <= guidance_high (REPA's guidance
interval; the Heun corrector uses the interval test of the step's start time, as REPA does).
REPA applies guidance only for s > 1; here any s != 1 is applied (identical for s > 1).
The state is integrated in float64; the model sees ``z.dtype``. The model runs in eval mode
(no label dropout) and its mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from irepa.stores.manifest import atomic_savez
from irepa.trainer.loss import interpolant

__all__ = ["METHODS", "sample", "velocity_to_score", "guidance_active", "save_image_grid", "PreviewSampler",
           "run_sampling"]

METHODS = ("ode", "sde", "heun")


def guidance_active(t: float, cfg_scale: float, guidance_interval: tuple[float, float]) -> bool:
    """Whether CFG is applied at time ``t``."""
    low, high = guidance_interval
    return cfg_scale != 1.0 and low <= t <= high


def velocity_to_score(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path: str = "linear") -> torch.Tensor:
    """Score of p_t at ``x`` from the velocity ``v`` (t: [B] or scalar tensor)."""
    t = t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t
    alpha, sigma, d_alpha, d_sigma = interpolant(path, t)
    ratio = alpha / d_alpha
    var = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x) / var


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def _sde_noise(shape: torch.Size, generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise [B, ...] in float64, from one generator or one per image."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=torch.float32)
                             for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(torch.float64)


def sample(
    model: nn.Module,
    z: torch.Tensor,
    y: torch.Tensor,
    method: str = "sde",
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 0.7),
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    path: str = "linear",
    null_class: int | None = None,
    sde_last_t: float = 0.04,
) -> torch.Tensor:
    """Integrate noise ``z`` [B, C, H, W] to latents for labels ``y`` [B].

    Defaults are REPA's headline setting (SDE, 250 steps, guidance on t <= 0.7); pass
    ``cfg_scale=1.8`` for its FID-50K numbers. ``generator`` drives the SDE noise: one
    generator for the batch, or one per image so that an image's noise does not depend on the
    batch it lands in (how ``irepa-sample`` makes samples independent of batch size and ranks).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
    if steps < 1 or (method == "sde" and steps < 2):
        raise ValueError(f"steps must be >= 1 (>= 2 for sde); got {steps}")
    if null_class is None:
        null_class = getattr(_unwrap(model), "num_classes", None)
        if null_class is None and cfg_scale != 1.0:
            raise ValueError("CFG needs the null class: pass null_class= or use a model with .num_classes")
    dtype = z.dtype
    device = z.device
    y_null = torch.full_like(y, null_class) if null_class is not None else None

    def velocity(x: torch.Tensor, t: float, guided: bool) -> torch.Tensor:
        if guided:
            xin, yin = torch.cat([x, x]), torch.cat([y, y_null])
        else:
            xin, yin = x, y
        tin = torch.full((xin.shape[0],), t, device=device, dtype=torch.float64)
        out = model(xin.to(dtype), tin.to(dtype), yin)
        v = (out[0] if isinstance(out, (tuple, list)) else out).to(torch.float64)
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        return v

    was_training = model.training
    model.eval()
    try:
        x = z.to(torch.float64)
        if method in ("ode", "heun"):
            ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
            for i in range(steps):
                t_cur, t_next = ts[i], ts[i + 1]
                guided = guidance_active(t_cur, cfg_scale, guidance_interval)
                d_cur = velocity(x, t_cur, guided)
                x_next = x + (t_next - t_cur) * d_cur
                if method == "heun" and i < steps - 1:
                    d_prime = velocity(x_next, t_next, guided)
                    x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
                x = x_next
            return x.to(dtype)

        ts = torch.linspace(1.0, sde_last_t, steps, dtype=torch.float64).tolist() + [0.0]

        def drift(x: torch.Tensor, t: float) -> torch.Tensor:
            v = velocity(x, t, guidance_active(t, cfg_scale, guidance_interval))
            tt = torch.tensor(t, dtype=torch.float64, device=device)
            return v - 0.5 * (2 * t) * velocity_to_score(v, x, tt, path)

        for i in range(steps - 1):
            t_cur, t_next = ts[i], ts[i + 1]
            dt = t_next - t_cur
            noise = _sde_noise(x.shape, generator, device)
            x = x + drift(x, t_cur) * dt + (2 * t_cur) ** 0.5 * abs(dt) ** 0.5 * noise
        t_cur, t_next = ts[-2], ts[-1]
        x = x + (t_next - t_cur) * drift(x, t_cur)
        return x.to(dtype)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- image grids


def save_image_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
    """uint8 images [N, 3, H, W] (or [N, H, W, 3]) -> one PNG grid (torchvision's make_grid, no
    padding, ceil(sqrt(N)) per row), written atomically."""
    import math

    from PIL import Image
    from torchvision.utils import make_grid

    from irepa.stores.manifest import atomic_open

    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images.detach().cpu()
    if t.ndim != 4:
        raise ValueError(f"expected images [N, 3, H, W]; got shape {tuple(t.shape)}")
    if t.shape[1] != 3 and t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    t = t.to(torch.uint8)
    grid = make_grid(t, nrow=nrow or max(1, math.ceil(math.sqrt(len(t)))), padding=0)
    path = Path(path)
    with atomic_open(path) as f:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG")
    return path


# ----------------------------------------------------------------------------- previews in training


class CountCalls(nn.Module):
    """``module`` that ticks a progress bar at every call (samplers of any objective show progress)."""

    def __init__(self, module: nn.Module, bar: Any):
        super().__init__()
        self.module, self.bar = module, bar

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.bar.update(1)
        return self.module(*args, **kwargs)


class PreviewSampler:
    """EMA samples of fixed noise and labels, decoded by the objective's decoder, as a PNG grid.

    The decoder (a VAE for latent objectives) is loaded on first use, offline only; when that
    fails one log line says so and previews are skipped for the rest of the run.
    """

    def __init__(self, objective: Any, ema: nn.Module, cfg: Any, out: Path, log: Any, main: bool,
                 extra: dict | None = None):
        self.objective, self.ema, self.cfg, self.out, self.log, self.main = objective, ema, cfg, out, log, main
        self.extra = extra
        self.decode = None
        self.disabled = False

    def maybe_sample(self, step: int) -> Path | None:
        from irepa.trainer.data import mix_seed

        if not self.main or self.disabled:
            return None
        if self.decode is None:
            try:
                self.decode = self.objective.decoder(self.cfg.vae, self.extra, offline=True)
            except Exception as e:  # noqa: BLE001 - any failure: skip previews with one log line
                self.disabled = True
                self.log(f"sample previews off: cannot load the VAE offline ({type(e).__name__}: {e})")
                return None
        device = self.objective.device
        n = max(1, self.cfg.sample_n)
        g = torch.Generator(device="cpu").manual_seed(mix_seed("preview", self.cfg.seed))
        z = torch.randn((n, *self.objective.noise_shape()), generator=g).to(device)
        y = (torch.arange(n) % self.objective.data.num_classes).to(device)
        gen = torch.Generator(device=device).manual_seed(mix_seed("preview-sde", self.cfg.seed))
        from tqdm import tqdm

        with tqdm(desc=f"preview {step}", unit="call", leave=False, disable=not self.cfg.progress) as bar:
            x = self.objective.sample(CountCalls(self.ema, bar), z, y,
                                      method=self.cfg.sample_method or self.objective.preview_sampling["method"],
                                      steps=self.cfg.sample_steps or self.objective.preview_sampling["steps"],
                                      cfg_scale=self.cfg.sample_cfg, generator=gen)
        p = save_image_grid(self.decode(x), self.out / "samples" / f"{step:07d}.png")
        self.log(f"samples {p}")
        return p


# ----------------------------------------------------------------------------- irepa-sample


def load_for_sampling(cfg: Any, device: torch.device) -> tuple[Any, nn.Module, dict[str, nn.Module]]:
    """(objective, model in eval mode on ``device``, the run's extra modules) from an irepa-train
    checkpoint or, with ``--init-from``, a REPA / iREPA release checkpoint (a flow SiT described
    by the flags). Extra modules (REPA-E's tuned VAE) come back with their trained weights."""
    import json

    from irepa.pipeline.defaults import SD_VAE_SCALE
    from irepa.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from irepa.trainer.config import TrainConfig, resolve_train
    from irepa.trainer.data import LatentNorm
    from irepa.trainer.objectives import DataSpec, get_objective

    if cfg.ckpt is not None:
        p = Path(cfg.ckpt)
        if p.is_dir():
            found = latest_checkpoint(p)
            if found is None:
                raise FileNotFoundError(f"--ckpt {p}: run folder without checkpoints")
            p = found
        c = load_checkpoint(p)
        known = set(TrainConfig.__dataclass_fields__)
        args = dict(c["args"])
        objective_cls = get_objective(str(args.get("objective", "flow")))
        if objective_cls.Options is not None:
            known |= set(objective_cls.Options.__dataclass_fields__)
        train_cfg, opts, _ = resolve_train(config={k: v for k, v in args.items() if k in known})
        extra = c.get("extra") or {}
        mc = dict(c["model_config"])
        if "data" in extra:
            data = DataSpec.from_json(json.loads(extra["data"]))
        else:  # checkpoints written before the objective seam: a flow SiT
            hw = mc["input_size"] if isinstance(mc["input_size"], list) else [mc["input_size"]] * 2
            norm = (LatentNorm.from_dict(json.loads(extra["latent_norm"])) if "latent_norm" in extra
                    else LatentNorm("sd", SD_VAE_SCALE, 0.0))
            data = DataSpec(latent_shape=(2 * int(mc["in_channels"]), int(hw[0]), int(hw[1])),
                            num_classes=int(mc["num_classes"]), latent_norm=norm,
                            vae=json.loads(extra.get("vae", "{}")) or None, store=str(extra.get("store", "")))
        objective = objective_cls(train_cfg, opts, data, None, device)
        model = objective.build_model(mc)
        weights = c["ema"] if (cfg.use_ema and c.get("ema") is not None) else c["model"]
        model.load_state_dict(weights)
        extra = {}
        saved = c.get("modules") or {}
        if saved:
            for name, m in objective.extra_modules().items():
                if name in saved:
                    m.load_state_dict(saved[name])
                    extra[name] = m.to(device).eval()
        return objective, model.to(device).eval(), extra
    if cfg.init_from is None:
        raise ValueError("irepa-sample needs --ckpt (an irepa-train checkpoint or run folder) or --init-from")
    from irepa.trainer.checkpoint import load_foreign_checkpoint
    from irepa.trainer.models import build_sit, load_reference_state_dict
    from irepa.trainer.objectives.flow import Flow, FlowOptions

    if cfg.resolution % 8:
        raise ValueError(f"--resolution {cfg.resolution} is not a multiple of the VAE factor 8")
    if cfg.latent_norm != "sd":
        raise ValueError("--init-from checkpoints sample with --latent-norm sd (REPA's scaling); "
                         "per-channel stats are only known for irepa-train checkpoints")
    over = {k: int(getattr(cfg, k)) for k in ("hidden_size", "depth", "num_heads", "patch_size")
            if getattr(cfg, k) is not None}
    side = cfg.resolution // 8
    model = build_sit(cfg.model, input_size=side, in_channels=4, num_classes=cfg.num_classes, z_dims=(),
                      qk_norm=cfg.qk_norm, **over)
    info = load_reference_state_dict(model, load_foreign_checkpoint(cfg.init_from),
                                     prefer="ema" if cfg.use_ema else "model", strict=False, source=str(cfg.init_from))
    unexpected = [k for k in info["unexpected"] if not k.startswith("projectors.")]  # alignment heads: unused here
    if info["missing"] or unexpected:
        raise ValueError(f"--init-from {cfg.init_from} does not fit {cfg.model} as the flags describe it: missing "
                         f"{info['missing'][:8]}, unexpected {unexpected[:8]}; check --model / --resolution / sizes")
    data = DataSpec(latent_shape=(8, side, side), num_classes=cfg.num_classes,
                    latent_norm=LatentNorm("sd", cfg.scaling_factor, 0.0), vae=None, store="")
    train_cfg = TrainConfig(model=cfg.model)
    objective = Flow(train_cfg, FlowOptions(path_type=cfg.path_type), data, None, device)
    return objective, model.to(device).eval(), {}


def rank_share(n: int, rank: int, world: int) -> list[int]:
    """The contiguous block of image indices ``range(n)`` this rank samples."""
    import math

    per = int(math.ceil(n / world))
    return list(range(rank * per, min(n, (rank + 1) * per)))


@torch.no_grad()
def generate(objective: Any, model: nn.Module, decode: Any, indices: Sequence[int], seed: int, *,
             batch_size: int = 32, method: str | None = None, steps: int | None = None, cfg_scale: float = 1.0,
             guidance_interval: tuple[float, float] | None = None, labels: Sequence[int] | None = None,
             bar: Any = None) -> np.ndarray:
    """Images ``indices`` as uint8 [n, H, W, 3]: image i's noise, label (cycled from ``labels``,
    else random) and SDE noise come from ``(seed, i)`` alone, so batch size and rank count do not
    change them (``irepa-sample`` and training-time FID both sample this way)."""
    from irepa.trainer.data import mix_seed

    device = objective.device
    shape, num_classes = objective.noise_shape(), objective.data.num_classes
    out = []
    for s in range(0, len(indices), max(1, batch_size)):
        idx = list(indices[s:s + batch_size])
        zs, ys = [], []
        for i in idx:
            g = torch.Generator().manual_seed(mix_seed("sample", seed, i))
            zs.append(torch.randn(shape, generator=g))
            ys.append(labels[i % len(labels)] if labels else int(torch.randint(num_classes, (1,), generator=g)))
        z = torch.stack(zs).to(device)
        y = torch.as_tensor(ys, dtype=torch.long, device=device)
        gen = [torch.Generator(device=device).manual_seed(mix_seed("sample-sde", seed, i)) for i in idx]
        x = objective.sample(model, z, y, method=method, steps=steps, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval, generator=gen)
        out.append(decode(x).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8))  # uint8 [b, H, W, 3]
        if bar is not None:
            bar.update(len(idx))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def run_sampling(cfg: Any) -> Path:
    """``irepa-sample``: sample ``cfg.num_samples`` images (image i from (seed, i) only, so batch
    size and rank count do not change it), decode them and write ``samples.npz`` + ``grid.png``."""
    from irepa.pipeline import dist as distributed

    d = distributed.setup(cfg.device)
    try:
        objective, model, extra = load_for_sampling(cfg, d.device)
        decode = objective.decoder(cfg.vae, extra, offline=False)
        out = Path(cfg.out)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
        distributed.barrier(d)
        mine = rank_share(int(cfg.num_samples), d.rank, d.world_size)
        interval = None
        if cfg.guidance_low is not None or cfg.guidance_high is not None:
            interval = (cfg.guidance_low if cfg.guidance_low is not None else 0.0,
                        cfg.guidance_high if cfg.guidance_high is not None else 1.0)
        bar = None
        if d.main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(mine), unit="img", desc="irepa-sample")
        arr = generate(objective, model, decode, mine, cfg.seed, batch_size=cfg.batch_size,
                       method=cfg.method or objective.final_sampling["method"],
                       steps=cfg.steps or objective.final_sampling["steps"], cfg_scale=cfg.cfg_scale,
                       guidance_interval=interval, labels=list(cfg.labels) if cfg.labels else None, bar=bar)
        if bar is not None:
            bar.close()
        order = mine
        part = out / f".part-{d.rank:05d}.npz"
        atomic_savez(part, arr_0=arr.astype(np.uint8), index=np.asarray(order, dtype=np.int64))
        distributed.barrier(d)
        final = out / "samples.npz"
        if d.main:
            parts = [np.load(out / f".part-{r:05d}.npz", allow_pickle=False) for r in range(d.world_size)]
            chunks = [p["arr_0"] for p in parts if len(p["arr_0"])]
            allx = np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 3), np.uint8)
            alli = np.concatenate([p["index"] for p in parts])
            allx = allx[np.argsort(alli, kind="stable")]
            atomic_savez(final, arr_0=allx)
            for r in range(d.world_size):
                (out / f".part-{r:05d}.npz").unlink()
            if cfg.grid and len(allx):
                save_image_grid(allx[: int(cfg.grid)], out / "grid.png")
            shape_txt = f"{allx.shape[1]}x{allx.shape[2]}" if len(allx) else "-"
            print(f"[irepa-sample] wrote {final} ({allx.shape[0]} images, {shape_txt})", flush=True)
        distributed.barrier(d)
        return final
    finally:
        distributed.teardown(d)
