"""Flow-matching (SiT interpolant) loss, REPA's convention: t = 0 is data, t = 1 is noise.

``linear``: x_t = (1 - t) x + t eps, target v = eps - x.
``cosine``: x_t = cos(pi t / 2) x + sin(pi t / 2) eps, target v = d x_t / dt
            = -pi/2 sin(pi t / 2) x + pi/2 cos(pi t / 2) eps.
Time sampling: ``uniform`` t ~ U(0, 1), or ``lognormal`` as REPA's SILoss writes it:
sigma = exp(N(mean, std)), t = sigma / (1 + sigma) (linear; = sigmoid(N(mean, std)), the
"logit-normal") or t = 2/pi atan(sigma) (cosine). The loss is the squared error averaged over
all non-batch dimensions, one value per sample (REPA's ``mean_flat``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from irepa.trainer.objectives.options import PATHS, TIME_SAMPLERS

__all__ = ["PATHS", "TIME_SAMPLERS", "interpolant", "FlowMatching", "mean_flat"]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions -> [B]."""
    return x.mean(dim=tuple(range(1, x.dim())))


def interpolant(path: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t, d alpha/dt, d sigma/dt) with x_t = alpha_t x + sigma_t eps."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":
        a = t * (math.pi / 2)
        return torch.cos(a), torch.sin(a), -(math.pi / 2) * torch.sin(a), (math.pi / 2) * torch.cos(a)
    raise ValueError(f"unknown interpolant path {path!r}; expected one of {PATHS}")


class FlowMatching:
    """SiT flow-matching objective (v-prediction)."""

    def __init__(self, path: str = "linear", time_sampler: str = "uniform",
                 lognormal_mean: float = 0.0, lognormal_std: float = 1.0):
        if path not in PATHS:
            raise ValueError(f"unknown interpolant path {path!r}; expected one of {PATHS}")
        if time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown time sampler {time_sampler!r}; expected one of {TIME_SAMPLERS}")
        self.path = path
        self.time_sampler = time_sampler
        self.lognormal_mean = lognormal_mean
        self.lognormal_std = lognormal_std

    def sample_t(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Times [B] in [0, 1] (float32)."""
        if self.time_sampler == "uniform":
            return torch.rand(batch_size, device=device, generator=generator)
        n = torch.randn(batch_size, device=device, generator=generator)
        sigma = (n * self.lognormal_std + self.lognormal_mean).exp()
        if self.path == "linear":
            return sigma / (1 + sigma)
        return (2 / math.pi) * torch.atan(sigma)

    def interpolate(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target velocity) for data ``x``, noise ``eps`` and times ``t`` [B]."""
        tb = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        alpha, sigma, d_alpha, d_sigma = interpolant(self.path, tb)
        return alpha * x + sigma * eps, d_alpha * x + d_sigma * eps

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None, t: torch.Tensor | None = None,
             eps: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Run ``model`` on a fresh (t, eps) draw: ``dict(per_sample_mse [B], h, t, v)``.

        ``h`` is whatever the model returns second (block-``encoder_depth`` tokens or None).
        ``t`` / ``eps`` may be given to reproduce a draw.
        """
        B = x.shape[0]
        if t is None:
            t = self.sample_t(B, x.device, generator)
        if eps is None:
            eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t, target = self.interpolate(x, eps, t)
        v, h = model(x_t, t.to(x.dtype), y)
        per_sample = mean_flat((v.float() - target.float()) ** 2)
        return {"per_sample_mse": per_sample, "h": h, "t": t, "v": v}
