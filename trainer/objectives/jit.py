"""``--objective jit``: JiT, pixel-space diffusion with x-prediction and a v-space loss.

JiT's convention (Li & He 2025; the official code and the iREPA release's ``jit/``): t = 1 is
data. For ADM-cropped pixels ``x = uint8 / 127.5 - 1`` in [-1, 1], one step draws, for the
global batch,

    t = sigmoid(N(P_mean, P_std))        (P_mean -0.8, P_std 0.8: "logit-normal")
    e ~ N(0, noise_scale^2)              (noise_scale 1.0 at 256 px, 2.0 at 512 px)

and trains the network ``net(z, t, y) -> x_pred`` (x-prediction) on

    z      = t x + (1 - t) e
    v      = (x - z) / max(1 - t, t_eps),   v_pred = (x_pred - z) / max(1 - t, t_eps)
    loss   = mean_{b}( mean_{c,h,w} (v - v_pred)^2 ) + coeff * alignment

Labels are dropped to the null class (``num_classes``) with ``class_dropout`` (0.1) by a mask
drawn with the step's other numbers. Alignment (iREPA's released JiT recipe, preset
``irepa-official-jit``: conv 3x3 projector, z-score with gamma 0.8, coeff 0.5) is applied to the
tokens after block ``encoder_depth`` without the in-context class tokens.

Sampling (the official ``Denoiser.generate``): ``z_0 = noise_scale * noise``; times
``linspace(0, 1, steps + 1)``; ``steps - 1`` Heun (or Euler) steps then one Euler step to t = 1;
the velocity at ``(z, t)`` is ``(x_cfg - z) / max(1 - t, t_eps)`` with classifier-free guidance
on the x-prediction, ``x_cfg = x_u + s (x_c - x_u)``, applied only when ``s != 1`` and
``t < interval_max`` and (``interval_min == 0`` or ``t > interval_min``), the test being on the
JiT time of the model call. Samples are written as the official code writes its PNGs:
``round(clip((x + 1) / 2 * 255, 0, 255))``.

Training defaults that differ from the flow objective are the :attr:`JiTObjective.preset`
(AdamW betas (0.9, 0.95), lr = blr * batch / 256 with blr 5e-5 and a 5-epoch linear warm-up,
EMAs 0.9999 (sampled from) and 0.9996, no gradient clipping, label drop 0.1).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from irepa.trainer.align import alignment_terms
from irepa.trainer.objectives import register
from irepa.trainer.objectives.base import DataSpec, Objective, Phase
from irepa.trainer.objectives.options import JIT_SAMPLERS as SAMPLERS
from irepa.trainer.objectives.options import JiTOptions

__all__ = ["JiTOptions", "JiTObjective", "JiTStep", "heun_sample", "to_uint8", "pixels_to_unit"]



def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B, 3, H, W] -> float32 in [-1, 1] (``p / 127.5 - 1``)."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"--objective jit expects uint8 pixels [B, 3, H, W] from the store; got {pixels.dtype}")
    return pixels.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> uint8, as the official code writes its samples:
    ``round(clip((x + 1) / 2 * 255, 0, 255))`` (round half to even)."""
    return ((x.float() + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (the loop asks for bf16 on CUDA only); no-op for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def guidance_active(t: float | torch.Tensor, cfg_scale: float, interval: tuple[float, float]) -> bool:
    """The official interval test on the JiT time ``t`` of a model call: CFG iff ``cfg_scale != 1``,
    ``t < high`` and (``low == 0`` or ``t > low``). A float32 tensor ``t`` is compared in float32,
    as the official code compares its float32 time grid."""
    low, high = interval
    return cfg_scale != 1.0 and bool(t < high) and (low == 0 or bool(t > low))


@torch.no_grad()
def heun_sample(model: nn.Module, z: torch.Tensor, labels: torch.Tensor, *, steps: int = 50, method: str = "heun",
                cfg_scale: float = 1.0, interval: tuple[float, float] = (0.1, 1.0), t_eps: float = 0.05,
                null_class: int | None = None, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Integrate the scaled noise ``z`` [B, C, H, W] from t = 0 to t = 1 (the official sampler).

    ``steps - 1`` ``method`` steps (Heun or Euler) on the float32 grid ``linspace(0, 1, steps + 1)``
    and a final Euler step; CFG on the x-prediction inside the interval (:func:`guidance_active`),
    the conditional and null halves in one batched call. Times, steps and the ``max(1 - t, t_eps)``
    denominators are float32 as in the official code; the state stays in ``z.dtype``; the model
    runs under autocast to ``amp_dtype`` when given (bf16 on CUDA, as the official sampler).
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown JiT sampler {method!r}; expected one of {SAMPLERS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    net = getattr(model, "module", model)
    if null_class is None:
        null_class = int(net.num_classes)
    y_null = torch.full_like(labels, null_class)

    ts = torch.linspace(0.0, 1.0, steps + 1, device=z.device)
    guided_at = [guidance_active(t, cfg_scale, interval) for t in ts.cpu()]  # no device sync per call

    def velocity(z: torch.Tensor, i: int) -> torch.Tensor:
        t, guided = ts[i], guided_at[i]
        zin, yin = (torch.cat([z, z]), torch.cat([labels, y_null])) if guided else (z, labels)
        with _autocast(z.device, amp_dtype):
            out = model(zin, t.expand(zin.shape[0]), yin)
        x = (out[0] if isinstance(out, (tuple, list)) else out).to(z.dtype)
        if guided:
            x_c, x_u = x.chunk(2)
            x = x_u + cfg_scale * (x_c - x_u)
        return (x - z) / (1.0 - t).clamp_min(t_eps)

    was_training = model.training
    model.eval()
    try:
        for i in range(steps):
            dt = ts[i + 1] - ts[i]
            d = velocity(z, i)
            if method == "heun" and i < steps - 1:
                d = 0.5 * (d + velocity(z + dt * d, i + 1))
            z = z + dt * d
        return z
    finally:
        model.train(was_training)


class JiTStep(nn.Module):
    """One micro-batch of the JiT loss (the phase module the loop wraps in DDP).

    ``forward(batch, draws, carry)``: ``batch["pixels"]`` uint8 [B, 3, H, W], ``batch["label"]``
    int64 [B], ``batch["features"]`` one [B, T, D] tensor per encoder; ``draws`` the rows of
    :meth:`JiTObjective.draw` (``t``, ``e``, ``drop``). Returns ``loss`` (v-space MSE + coeff *
    alignment) and detached ``mse``, ``align_loss``, ``cosine`` and, per encoder,
    ``cosine/<encoder>`` and ``align_loss/<encoder>``.
    """

    def __init__(self, model: nn.Module, align: nn.Module | None, coeff: float, t_eps: float, num_classes: int,
                 encoders: Sequence[str] = (), amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.align = align
        self.coeff = float(coeff)
        self.t_eps = float(t_eps)
        self.num_classes = int(num_classes)
        self.encoders = list(encoders)
        self.amp_dtype = amp_dtype

    def forward(self, batch: dict, draws: dict, carry: dict) -> dict[str, torch.Tensor]:
        x = pixels_to_unit(batch["pixels"])
        t, e, drop = draws["t"].float(), draws["e"].float(), draws["drop"]
        if t.shape[0] != x.shape[0] or e.shape != x.shape:
            raise ValueError(f"draws do not match the batch: t {list(t.shape)}, e {list(e.shape)} "
                             f"for pixels {list(x.shape)}")
        y = torch.where(drop.bool(), torch.full_like(batch["label"], self.num_classes), batch["label"])
        tb = t.view(-1, 1, 1, 1)
        z = tb * x + (1 - tb) * e
        denom = (1 - tb).clamp_min(self.t_eps)
        v = (x - z) / denom
        with _autocast(x.device, self.amp_dtype):
            x_pred, h = self.model(z, t, y)
            out = alignment_terms(self.align, h, batch["features"], self.encoders, x.device)
        v_pred = (x_pred.float() - z) / denom
        mse = ((v - v_pred) ** 2).mean(dim=(1, 2, 3)).mean()
        out["loss"] = mse + self.coeff * out["align_loss"]
        out["mse"] = mse.detach()
        out["align_loss"] = out["align_loss"].detach()
        return out


@register
class JiTObjective(Objective):
    """JiT on ADM-cropped pixels with cached encoder features (see the module docstring)."""

    name = "jit"
    inputs = ("pixels",)
    #: train-config defaults of the release (``jit/main_jit.py``, ``jit/configs/irepa.yaml``)
    preset = {
        "model": "JiT-B/16",
        "align": "irepa-official-jit",
        "betas": (0.9, 0.95),
        "blr": 5e-5,  # lr = blr * global batch / 256 when --lr is not given
        "warmup_epochs": 5,  # linear from 0, per step: lr * (step / steps_per_epoch) / 5
        "ema": (0.9999, 0.9996),  # the first is the one samples are drawn from
        "class_dropout": 0.1,
        "weight_decay": 0.0,
        "grad_clip": 0.0,  # the release does not clip gradients
    }
    Options = JiTOptions
    preview_sampling = {"method": None, "steps": None}  # None: --sampler / --sampling-steps
    final_sampling = {"method": None, "steps": None}
    sample_methods = (*SAMPLERS, "ode")  # "ode" is read as euler

    def __init__(self, cfg: Any, opts: Any, data: DataSpec, align: Any | None, device: torch.device,
                 amp_dtype: torch.dtype | None = None):
        super().__init__(cfg, opts if opts is not None else JiTOptions(), data, align, device, amp_dtype)
        if getattr(cfg, "attn", "sdpa") == "xformers":
            from irepa.pipeline.config import OptionError

            raise OptionError("--objective jit runs torch's scaled_dot_product_attention (RoPE and qk-norm inside "
                              "its attention): --attn sdpa or math, not xformers")

    # ------------------------------------------------------------------ helpers
    @property
    def image_size(self) -> tuple[int, int]:
        if self.data.pixel_shape is None:
            raise self._no_pixels(self.data.store or "the data")
        _, h, w = self.data.pixel_shape
        return int(h), int(w)

    @property
    def noise_scale(self) -> float:
        """``--noise-scale``, or by resolution: 1.0 at 256 px, 2.0 at 512 px (max(1, H / 256))."""
        if self.opts.noise_scale is not None:
            return float(self.opts.noise_scale)
        return max(1.0, self.image_size[0] / 256)

    @staticmethod
    def _no_pixels(where: str):
        from irepa.trainer.store_checks import StoreMismatchError

        return StoreMismatchError(f"store {where} holds no pixels; --objective jit trains on the ADM-cropped "
                                  "images: build the store with `irepa-cache build --pixels` (--vae none for a "
                                  "pixel-only store)")

    # ------------------------------------------------------------------ model
    def model_config(self) -> dict:
        from irepa.trainer.jit_model import JIT_CONFIGS, build_jit

        cfg, opts, a = self.cfg, self.opts, self.align_config
        name = getattr(cfg, "model", None) or self.preset["model"]
        if name not in JIT_CONFIGS:
            raise ValueError(f"--objective jit trains a JiT model; got --model {name!r} "
                             f"(expected one of {sorted(JIT_CONFIGS)})")
        h, w = self.image_size
        aligned = a is not None
        kw: dict[str, Any] = dict(
            input_size=h if h == w else [h, w], in_channels=int(self.data.pixel_shape[0]),
            num_classes=int(self.data.num_classes),
            encoder_depth=a.encoder_depth if aligned else None,
            z_dims=[int(d) for d in self.data.feature_dims] if aligned else [],
            projector=a.projector if aligned else "conv", projector_kernel=a.kernel if aligned else 3,
            projector_dim=a.projector_dim if aligned else 2048,
            attn_drop=float(opts.attn_dropout), proj_drop=float(opts.proj_dropout),
            attn="math" if getattr(cfg, "attn", "sdpa") == "math" else "sdpa")
        for k in ("hidden_size", "depth", "num_heads", "patch_size"):
            v = getattr(cfg, k, None)
            if v is not None:
                kw[k] = int(v)
        for k in ("bottleneck_dim", "in_context_len", "in_context_start"):
            v = getattr(opts, k)
            if v is not None:
                kw[k] = int(v)
        # resolve defaults (encoder depth) the way the builder does, on the meta device
        with torch.device("meta"):
            return dict(build_jit(name, **kw).build_kwargs)

    def build_model(self, config: dict) -> nn.Module:
        from irepa.trainer.jit_model import build_jit

        return build_jit(**config)

    def check_data(self, config: dict, where: str) -> None:
        from irepa.trainer.jit_model import JIT_CONFIGS, jit_grid
        from irepa.trainer.store_checks import StoreMismatchError

        d = self.data
        if d.pixel_shape is None:
            raise self._no_pixels(where)
        name = config["name"]
        size = config["input_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        patch = int(config.get("patch_size") or JIT_CONFIGS[name]["patch_size"])
        c, ph, pw = (int(v) for v in d.pixel_shape)
        problems = []
        if c != int(config.get("in_channels", 3)):
            problems.append(f"pixels have {c} channels, the model {config.get('in_channels', 3)}")
        if (ph, pw) != (h, w):
            problems.append(f"pixels are {ph}x{pw}, {name} was built for {h}x{w}")
        if h % patch or w % patch:
            problems.append(f"{h}x{w} is not divisible by patch {patch}")
        grid = jit_grid(name, (h, w), patch)
        z_dims = list(config.get("z_dims") or [])
        if z_dims:
            if len(d.token_grids) != len(z_dims) or len(d.feature_dims) != len(z_dims):
                problems.append(f"the model aligns to {len(z_dims)} encoder(s), the data has {len(d.encoders)}")
            for enc, g, dim, z in zip(d.encoders, d.token_grids, d.feature_dims, z_dims):
                if tuple(int(v) for v in g) != grid:
                    problems.append(f"encoder {enc} token grid {g[0]}x{g[1]} != {name}'s patch grid "
                                    f"{grid[0]}x{grid[1]} ({h}x{w} px / patch {patch}); alignment needs one feature "
                                    "token per patch: build the store's features at that grid or pick a model "
                                    "whose patch grid matches")
                if int(dim) != int(z):
                    problems.append(f"encoder {enc} feature dim {dim} != projector dim {z}")
        if int(d.num_classes) > int(config.get("num_classes", d.num_classes)):
            problems.append(f"{d.num_classes} classes > the model's {config['num_classes']}")
        if problems:
            raise StoreMismatchError(f"store {where} does not fit --objective jit: " + "; ".join(problems))

    # ------------------------------------------------------------------ one step
    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """``t`` [B] = sigmoid(N(p_mean, p_std)), ``e`` [B, 3, H, W] ~ N(0, noise_scale^2), ``drop``
        [B] bool (label dropout with ``class_dropout``), in that order from ``generator``."""
        o = self.opts
        n = torch.randn(batch, generator=generator, device=device)
        t = torch.sigmoid(n * o.p_std + o.p_mean)
        e = torch.randn((batch, *self.noise_shape()), generator=generator, device=device) * self.noise_scale
        p_drop = float(getattr(self.cfg, "class_dropout", self.preset["class_dropout"]))
        drop = torch.rand(batch, generator=generator, device=device) < p_drop
        return {"t": t, "e": e, "drop": drop}

    def phases(self, model: nn.Module, extra: dict[str, nn.Module]) -> list[Phase]:
        from irepa.trainer.align import AlignmentLoss

        a = self.align_config
        align = None
        if a is not None and len(getattr(model, "projectors", [])):
            align = AlignmentLoss(model.projectors, a, fused=bool(getattr(self.cfg, "fused_align", True)))
        step = JiTStep(model, align, a.coeff if align is not None else 0.0, self.opts.t_eps,
                       int(model.num_classes), self.data.encoders, self.amp_dtype)
        return [Phase("model", step, [p for p in model.parameters() if p.requires_grad])]

    # ------------------------------------------------------------------ sampling
    def noise_shape(self) -> tuple[int, ...]:
        return (int(self.data.pixel_shape[0]) if self.data.pixel_shape else 3, *self.image_size)

    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, method: str | None = None,
               steps: int | None = None, cfg_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] from standard-normal ``noise`` [B, 3, H, W] (scaled here by
        ``noise_scale``). ``method`` heun / euler ("ode" is read as euler); None takes
        ``--sampler``, ``steps`` / ``guidance_interval`` None take the options. Deterministic:
        ``generator`` is not used."""
        o = self.opts
        method = o.sampler if method is None else ("euler" if method == "ode" else method)
        interval = (o.interval_min, o.interval_max) if guidance_interval is None else tuple(guidance_interval)
        return heun_sample(model, noise * self.noise_scale, labels, steps=o.sampling_steps if steps is None else steps,
                           method=method, cfg_scale=cfg_scale, interval=interval, t_eps=o.t_eps,
                           amp_dtype=self.amp_dtype)

    def decoder(self, vae_override: str | None = None, extra: dict[str, nn.Module] | None = None,
                offline: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        if vae_override:
            raise ValueError(f"--objective jit samples pixels directly; it uses no VAE (got --vae {vae_override})")
        return to_uint8
