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

import torch
import torch.nn as nn

from irepa.trainer.loss import interpolant

__all__ = ["METHODS", "sample", "velocity_to_score", "guidance_active"]

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
