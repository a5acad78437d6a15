"""Representation alignment (REPA / iREPA): projectors, spatial normalisation, loss, presets.

The loss for encoder k, as REPA's ``SILoss`` and iREPA's release compute it::

    z_k   = spatial_normalize(target_k)               # iREPA only: per image, over tokens
    loss  = - mean_{b, t} cos(proj_k(h)[b, t], z_k[b, t])   # cosine over channels
    total = mean_k loss_k                              # the trainer adds coeff * total

Spatial normalisation (iREPA, ``spnorm_method="zscore"``) is
``(x - gamma * mean_T(x)) / (std_T(x) + eps)`` per image and channel, over the T tokens. The
std is torch's default **unbiased** ``Tensor.std`` (correction 1), of ``x`` itself; the std is
shift-invariant, so taking it before or after subtracting ``gamma * mean`` is the same number.
``gamma`` is iREPA's ``zscore_alpha``. Half-precision features are promoted to float32.

Projectors (names follow the public REPA / iREPA SiT, see ``trainer.models``):
``mlp``    Linear(D, 2048)-SiLU-Linear(2048, 2048)-SiLU-Linear(2048, z)   keys ``{0,2,4}.*``
``linear`` Linear(D, z)                                                   keys ``weight, bias``
``conv``   Conv2d(D, z, k, padding k // 2) over the token grid (iREPA)     keys ``weight, bias``

:class:`AlignmentLoss` is the fused implementation used for training: one autograd Function
computes projection, target normalisation and loss without keeping any intermediate for
backward (only references to ``h`` and the raw targets, which are alive anyway), processes
the batch in chunks of images, and recomputes each chunk in backward. Peak memory of the
alignment head drops to one chunk's activations; values and gradients equal
:func:`alignment_loss_reference` (the plain autograd composition) to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PROJECTOR_KINDS",
    "SPATIAL_NORMS",
    "TokenConv2d",
    "build_projector",
    "spatial_normalize",
    "AlignConfig",
    "PRESETS",
    "resolve_align",
    "alignment_loss_reference",
    "AlignmentLoss",
    "alignment_terms",
]

PROJECTOR_KINDS = ("mlp", "linear", "conv")
SPATIAL_NORMS = ("none", "zscore")


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Promote half precisions to float32; keep float32 / float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --------------------------------------------------------------------------------------
# Projectors
# --------------------------------------------------------------------------------------
class TokenConv2d(nn.Conv2d):
    """Conv2d applied to a token sequence [B, T, D] laid out on a raster grid (h, w).

    A subclass (not a wrapper) so that its parameters are named ``weight`` / ``bias``, as
    iREPA's ``projection_layer`` Conv2d is once its wrapper prefix is dropped.
    """

    def __init__(self, hidden: int, z_dim: int, kernel: int, grid: tuple[int, int] | None):
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"conv projector kernel must be odd and positive (same padding); got {kernel}")
        super().__init__(hidden, z_dim, kernel, stride=1, padding=kernel // 2, bias=True)
        self.grid = tuple(grid) if grid is not None else None

    def _grid_for(self, T: int) -> tuple[int, int]:
        if self.grid is not None:
            gh, gw = self.grid
            if gh * gw != T:
                raise ValueError(f"conv projector built for a {gh}x{gw} token grid got {T} tokens")
            return gh, gw
        side = math.isqrt(T)
        if side * side != T:
            raise ValueError(f"conv projector needs a square token grid or an explicit grid; got T={T}")
        return side, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if x.dim() == 4:
            return super().forward(x)
        B, T, D = x.shape
        gh, gw = self._grid_for(T)
        y = super().forward(x.reshape(B, gh, gw, D).permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).reshape(B, T, -1)


def build_projector(
    kind: str,
    hidden: int,
    z_dim: int,
    kernel: int = 3,
    projector_dim: int = 2048,
    grid: tuple[int, int] | None = None,
) -> nn.Module:
    """Projector from SiT hidden size ``hidden`` to encoder feature size ``z_dim``.

    Every projector maps tokens [B, T, hidden] -> [B, T, z_dim]. ``grid`` (h, w) is the token
    grid for ``conv`` (inferred as square when omitted).
    """
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(hidden, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )
    if kind == "linear":
        return nn.Linear(hidden, z_dim)
    if kind == "conv":
        return TokenConv2d(hidden, z_dim, kernel, grid)
    raise ValueError(f"unknown projector kind {kind!r}; expected one of {PROJECTOR_KINDS}")


# --------------------------------------------------------------------------------------
# Spatial normalisation
# --------------------------------------------------------------------------------------
def spatial_normalize(z: torch.Tensor, mode: str = "none", gamma: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """iREPA spatial normalisation of features ``z`` [B, T, D] over the token axis.

    ``none`` returns ``z`` (half precisions promoted to float32); ``zscore`` returns
    ``(z - gamma * mean_T(z)) / (std_T(z) + eps)`` with the unbiased std (torch default).
    """
    if mode not in SPATIAL_NORMS:
        raise ValueError(f"unknown spatial_norm {mode!r}; expected one of {SPATIAL_NORMS}")
    if z.dim() != 3:
        raise ValueError(f"spatial_normalize expects [B, T, D] tokens; got shape {list(z.shape)}")
    z = _f32(z)
    if mode == "none":
        return z
    if z.shape[1] < 2:
        raise ValueError("zscore spatial normalisation needs at least 2 tokens per image")
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, keepdim=True)
    return (z - gamma * mean) / (std + eps)


# --------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AlignConfig:
    """Alignment recipe. ``coeff`` multiplies the alignment loss in the total loss;
    ``encoder_depth`` None keeps the model's default (4 for SiT-S/B, 8 for SiT-L/XL)."""

    projector: str = "mlp"
    kernel: int = 3
    spatial_norm: str = "none"
    gamma: float = 1.0
    coeff: float = 0.5
    encoder_depth: int | None = None
    projector_dim: int = 2048
    preset: str = "custom"

    def __post_init__(self) -> None:
        if self.projector not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector {self.projector!r}; expected one of {PROJECTOR_KINDS}")
        if self.spatial_norm not in SPATIAL_NORMS:
            raise ValueError(f"unknown spatial_norm {self.spatial_norm!r}; expected one of {SPATIAL_NORMS}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd positive integer; got {self.kernel}")
        if self.coeff < 0:
            raise ValueError(f"coeff must be >= 0; got {self.coeff}")
        if self.encoder_depth is not None and self.encoder_depth < 1:
            raise ValueError(f"encoder_depth is 1-based and must be >= 1; got {self.encoder_depth}")
        if self.projector_dim < 1:
            raise ValueError(f"projector_dim must be positive; got {self.projector_dim}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Named recipes. ``irepa`` is the paper's page / README; ``irepa-official-ldm`` is what the
#: released latent-diffusion code runs (argparse defaults under its irepa.yaml).
PRESETS: dict[str, AlignConfig] = {
    "repa": AlignConfig(projector="mlp", spatial_norm="none", gamma=1.0, coeff=0.5, preset="repa"),
    "irepa": AlignConfig(projector="conv", kernel=3, spatial_norm="zscore", gamma=1.0, coeff=1.0, preset="irepa"),
    "irepa-official-ldm": AlignConfig(
        projector="conv", kernel=1, spatial_norm="zscore", gamma=0.6, coeff=1.0, preset="irepa-official-ldm"
    ),
    "irepa-official-jit": AlignConfig(
        projector="conv", kernel=3, spatial_norm="zscore", gamma=0.8, coeff=0.5, preset="irepa-official-jit"
    ),
    "none": AlignConfig(coeff=0.0, preset="none"),
}


def resolve_align(name: str | AlignConfig, **overrides) -> AlignConfig:
    """Preset ``name`` with fields replaced by ``overrides`` (``None`` values are ignored)."""
    if isinstance(name, AlignConfig):
        base = name
    else:
        if name not in PRESETS:
            raise ValueError(f"unknown alignment preset {name!r}; expected one of {sorted(PRESETS)}")
        base = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(AlignConfig)} - {"preset"}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown alignment field(s) {bad}; valid fields: {sorted(fields)}")
    changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    preset = base.preset if not changed else f"{base.preset}+" + ",".join(f"{k}={v}" for k, v in sorted(changed.items()))
    return dataclasses.replace(base, **overrides, preset=preset)


# --------------------------------------------------------------------------------------
# Loss: plain composition (reference)
# --------------------------------------------------------------------------------------
def _check_inputs(projectors: Sequence[nn.Module], h: torch.Tensor, targets: Sequence[torch.Tensor]) -> None:
    if h.dim() != 3:
        raise ValueError(f"alignment expects hidden tokens [B, T, D]; got shape {list(h.shape)}")
    if len(targets) != len(projectors):
        raise ValueError(f"got {len(targets)} target feature tensors for {len(projectors)} projectors (one per encoder)")
    for k, z in enumerate(targets):
        if z.dim() != 3 or z.shape[0] != h.shape[0] or z.shape[1] != h.shape[1]:
            raise ValueError(
                f"encoder {k}: target features {list(z.shape)} do not line up with SiT tokens {list(h.shape)} "
                f"(need the same batch size and token count; check the encoder resolution vs the SiT patch grid)"
            )


def _encoder_loss_sum(proj: nn.Module, h: torch.Tensor, z: torch.Tensor, spatial_norm: str, gamma: float) -> torch.Tensor:
    """Sum over images of the per-image mean negative cosine (float32 scalar)."""
    zt = F.normalize(spatial_normalize(z, spatial_norm, gamma), dim=-1)
    p = F.normalize(_f32(proj(h)), dim=-1)
    return -(p * zt).sum(dim=-1).mean(dim=1).sum()


_COMPILED_LOSS_SUM = None


def _compiled_encoder_loss_sum():
    """``_encoder_loss_sum`` through torch.compile (built once): on CUDA, inductor fuses the
    spatial norm, both L2 normalisations and the cosine reduction into a few kernels."""
    global _COMPILED_LOSS_SUM
    if _COMPILED_LOSS_SUM is None:
        _COMPILED_LOSS_SUM = torch.compile(_encoder_loss_sum, dynamic=None)
    return _COMPILED_LOSS_SUM


def alignment_loss_reference(
    projectors: Sequence[nn.Module], h: torch.Tensor, targets: Sequence[torch.Tensor], config: AlignConfig
) -> dict[str, torch.Tensor]:
    """Plain autograd composition: ``dict(loss, cosine, per_encoder)`` (loss without coeff)."""
    _check_inputs(projectors, h, targets)
    B = h.shape[0]
    per = torch.stack(
        [_encoder_loss_sum(p, h, z.detach(), config.spatial_norm, config.gamma) / B for p, z in zip(projectors, targets)]
    )
    loss = per.mean()
    return {"loss": loss, "cosine": -loss.detach(), "per_encoder": -per.detach()}


# --------------------------------------------------------------------------------------
# Loss: fused, recomputing autograd Function
# --------------------------------------------------------------------------------------
class _FusedAlignment(torch.autograd.Function):
    """Inputs: (spec, h, *targets, *params). Output: per-encoder loss [K] (float32).

    Forward runs without building a graph; backward recomputes chunk by chunk of images.
    """

    @staticmethod
    def forward(ctx, spec: dict, h: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        K = len(spec["projectors"])
        targets = rest[:K]
        B = h.shape[0]
        out = torch.zeros(K, dtype=torch.float64 if h.dtype == torch.float64 else torch.float32, device=h.device)
        with torch.no_grad():
            for k, (proj, z) in enumerate(zip(spec["projectors"], targets)):
                for s in range(0, B, spec["chunk"]):
                    out[k] += spec["loss_sum"](proj, h[s:s + spec["chunk"]], z[s:s + spec["chunk"]],
                                               spec["spatial_norm"], spec["gamma"])
        out /= B
        dev = h.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) if dev in ("cuda", "cpu") else None
        ctx.spec = spec
        ctx.save_for_backward(h, *targets)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        spec = ctx.spec
        h, *targets = ctx.saved_tensors
        K = len(targets)
        B = h.shape[0]
        params_per = spec["params"]  # list (per encoder) of parameter lists
        need = ctx.needs_input_grad  # (spec, h, *targets, *params)
        need_h = need[1]
        flat_offset = 2 + K
        grad_h = torch.zeros_like(h) if need_h else None
        grad_params: list[torch.Tensor | None] = []
        ac = ctx.autocast
        autocast = torch.autocast(ac[0], dtype=ac[2], enabled=ac[1]) if ac is not None else torch.autocast("cpu", enabled=False)
        offset = flat_offset
        for k in range(K):
            params = params_per[k]
            wanted = [i for i, _ in enumerate(params) if need[offset + i]]
            acc: list[torch.Tensor | None] = [None] * len(params)
            gk = grad_out[k] / B
            if need_h or wanted:
                for s in range(0, B, spec["chunk"]):
                    with torch.enable_grad(), autocast:
                        hc = h[s:s + spec["chunk"]].detach().requires_grad_(need_h)
                        loss = spec["loss_sum"](spec["projectors"][k], hc, targets[k][s:s + spec["chunk"]],
                                                spec["spatial_norm"], spec["gamma"])
                        inputs = ([hc] if need_h else []) + [params[i] for i in wanted]
                        grads = torch.autograd.grad(loss, inputs, grad_outputs=gk.to(loss.dtype), allow_unused=True)
                    if need_h:
                        grad_h[s:s + spec["chunk"]] += grads[0].to(grad_h.dtype)
                        grads = grads[1:]
                    for i, g in zip(wanted, grads):
                        if g is not None:
                            acc[i] = g if acc[i] is None else acc[i] + g
            for i, p in enumerate(params):
                if need[offset + i] and acc[i] is None:
                    acc[i] = torch.zeros_like(p)
            grad_params.extend(acc)
            offset += len(params)
        return (None, grad_h, *([None] * K), *grad_params)


class AlignmentLoss(nn.Module):
    """Alignment loss over the model's projectors: ``forward(h, targets) -> dict``.

    ``h`` [B, T, D] are the SiT tokens after block ``encoder_depth``; ``targets`` one raw
    encoder feature tensor [B, T, D_k] per projector (spatial normalisation is applied here,
    per ``config``). Returns ``loss`` (scalar, mean over encoders, **without** ``coeff``),
    ``cosine`` (detached mean cosine = -loss) and ``per_encoder`` (detached cosines [K]).

    The projectors stay owned by the model (not registered here, so state dicts and
    optimizers see them once). ``fused=True`` uses the recomputing autograd Function;
    ``chunk_size`` images are processed at a time (default: a quarter of the batch).
    ``compile`` runs each chunk's projection + normalisation + loss through ``torch.compile``
    (default: on CUDA tensors only; the eager path is the reference it is tested against).
    When wrapping the model in DDP, keep ``find_unused_parameters=False``: the projector
    parameters receive gradients through this loss, outside the model's forward.
    """

    def __init__(self, projectors: Sequence[nn.Module], config: AlignConfig, fused: bool = True,
                 chunk_size: int | None = None, compile: bool | None = None):
        super().__init__()
        self._projectors = list(projectors)  # plain list: deliberately not registered
        self.config = config
        self.fused = fused
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
        self.chunk_size = chunk_size
        self.compile = compile

    @property
    def coeff(self) -> float:
        return self.config.coeff

    def forward(self, h: torch.Tensor, targets: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.fused:
            return alignment_loss_reference(self._projectors, h, targets, self.config)
        _check_inputs(self._projectors, h, targets)
        B = h.shape[0]
        chunk = self.chunk_size or max(1, math.ceil(B / 4))
        params = [list(p.parameters()) for p in self._projectors]
        compiled = h.is_cuda if self.compile is None else self.compile
        spec = dict(projectors=self._projectors, params=params, chunk=chunk,
                    spatial_norm=self.config.spatial_norm, gamma=self.config.gamma,
                    loss_sum=_compiled_encoder_loss_sum() if compiled else _encoder_loss_sum)
        flat = [p for ps in params for p in ps]
        per = _FusedAlignment.apply(spec, h, *[z.detach() for z in targets], *flat)
        loss = per.mean()
        return {"loss": loss, "cosine": -loss.detach(), "per_encoder": -per.detach()}


def alignment_terms(align: AlignmentLoss | None, h: torch.Tensor | None, targets: Sequence[torch.Tensor],
                    encoders: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """What every objective logs of the alignment: ``align_loss`` (with grad, without coeff), the
    mean ``cosine``, and ``align_loss/<encoder>`` / ``cosine/<encoder>`` per encoder (detached);
    zeros without alignment."""
    if align is None or h is None:
        zero = torch.zeros((), device=device)
        return {"align_loss": zero, "cosine": zero.clone()}
    a = align(h, targets)
    out = {"align_loss": a["loss"].float(), "cosine": a["cosine"].float()}
    for name, c in zip(encoders, a["per_encoder"]):
        out[f"cosine/{name}"] = c.float()
        out[f"align_loss/{name}"] = -c.float()
    return out
