"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") as an objective.

The network predicts the *average* velocity ``u(z, r, t)`` over ``[r, t]`` (a two-time SiT:
:func:`irepa.trainer.models.build_sit` with ``time_conditions=("t", "t-r")``), trained with the
MeanFlow identity ``u = v - (t - r) du/dt``, on the same cached latents and REPA interpolant
(t = 0 data, t = 1 noise) as ``flow``. The recipe follows the official JAX release
(``Gsunshine/meanflow``, ``meanflow.py``):

* t and r are drawn logit-normal (``sigmoid(N(mu, sigma))``, mu -0.4, sigma 1.0) and sorted so
  that ``r <= t``; an exact fraction ``int(B * mf_ratio)`` (0.75) of each global batch has ``r = t``.
* ``z = (1 - t) x + t e``, ``v = e - x``.
* Training-time guidance: ``v_g = w v + (1 - w - k) u(z, t, t | null) + k u(z, t, t | c)`` for
  samples with ``mf_cfg_t_min <= t <= mf_cfg_t_max``; ``v_g = v`` outside the window and for
  label-dropped samples. The guidance forward passes run under ``no_grad``.
* ``u`` and ``du/dt`` from one Jacobian-vector product of ``(z, t, r) -> u(z, r, t | y)`` with
  tangents ``(v_g, 1, 0)``; ``u_tgt = stopgrad(v_g - clip(t - r, 0, 1) du/dt)``.
* Per sample ``L = sum over (C, H, W) of (u - u_tgt)^2`` (a sum, as the release), adaptive weight
  ``L / stopgrad((L + c)^p)`` (c = 1e-2, p = 1), mean over the batch.

Labels are dropped outside the model (``force_drop_ids``), so the guidance, the JVP and the
gradient pass see the same labels. As in the release, the dropped samples are a Binomial(B, p)
count taken among the ``r = t`` samples (the release drops the *first* rows of a batch, which are
its ``r = t`` rows); here the rows are random positions of the global batch, so every rank and
micro-batch gets its share. Alignment (REPA / iREPA, every ``--align`` preset) is the flow
objective's: :class:`irepa.trainer.align.AlignmentLoss` on the block-``encoder_depth`` tokens of
the pass that carries the gradient; ``total = mf_loss + coeff * align`` (the adaptive weight
applies to the MeanFlow term only).

The JVP and DDP / bf16 / torch.compile (see docs/MEANFLOW.md for the costs)
---------------------------------------------------------------------------
``torch.func.jvp`` has no forward-mode rule for the flash / memory-efficient SDPA kernels (nor
xformers) and does not accept a DDP-wrapped module. One step therefore runs three passes inside
the phase module's forward (the module DDP wraps):

1. guidance: one forward of ``2B`` (``1B`` when ``k = 0``, none when unguided) of the plain model,
   ``no_grad``, with the run's attention kernel (flash / memory-efficient SDPA on CUDA);
2. target: a forward-mode JVP (``torch.autograd.forward_ad``, the machinery of ``torch.func.jvp``)
   of the plain (unwrapped) model, ``no_grad`` (no graph is kept), with the explicit ``math``
   attention (the only path with a forward-mode rule) and linear layers on a 2-matmul tangent rule
   (:class:`_LinearTangent`; PyTorch's own multiplies by a zero weight tangent too);
3. gradient: an ordinary forward of ``u`` through the model with the run's kernel, whose backward
   DDP all-reduces like any other step (pass 2 only feeds the stop-gradient target).

All three run under the run's autocast (bf16 on CUDA). ``torch.compile``: the JVP region is
excluded from compilation (``torch.compiler.disable``), so a compiled phase compiles passes 1
and 3 and runs the JVP eagerly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn as nn

from irepa.trainer.align import alignment_terms
from irepa.trainer.objectives import register
from irepa.trainer.objectives.base import DataSpec, Objective, Phase
from irepa.trainer.objectives.options import (GUIDANCE_PRESETS, TIME_DISTS, GuidancePreset,
                                                 MeanFlowOptions, resolve_options)

__all__ = ["GUIDANCE_PRESETS", "GuidancePreset", "MeanFlowOptions", "resolve_options", "MeanFlowLoss",
           "MeanFlow", "math_attention", "meanflow_sample", "TIME_DISTS", "SAMPLE_METHODS"]


#: "meanflow": z_r = z_t - (t - r) u(z_t, r, t) on t = linspace(1, 0, steps + 1); "ode" is accepted
#: as its alias (the Euler step of the average velocity), so a flow-style config samples too
SAMPLE_METHODS = ("meanflow", "ode")


# ----------------------------------------------------------------------------- attention for the JVP


@contextlib.contextmanager
def math_attention(model: nn.Module) -> Iterator[None]:
    """Run every SiT attention of ``model`` on the explicit ``math`` path inside the block (the
    only one with a forward-mode AD rule), restoring each module's backend afterwards."""
    saved = []
    for m in model.modules():
        if hasattr(m, "backend") and hasattr(m, "qkv"):
            saved.append((m, m.backend))
            m.backend = "math"
    try:
        yield
    finally:
        for m, b in saved:
            m.backend = b


class _LinearTangent(torch.autograd.Function):
    """``F.linear(x, W, b)`` with a dual ``x`` and plain ``W``, ``b``: tangent ``x_t W^T``.

    PyTorch's forward-mode rule for ``addmm`` / ``mm`` fills the missing weight tangent with
    materialised zeros and multiplies by them, so the JVP of a linear layer runs three matmuls
    (primal, ``x_t W^T`` and ``x 0^T``): 3.2x a forward instead of 2x, measured on CPU. A custom
    Function gets zeros for ``W``'s and ``b``'s tangents too, so :class:`_TangentLinears` routes
    only calls whose weight and bias carry no tangent here, and the rule ignores theirs.
    Forward-mode only: the JVP runs under ``no_grad``."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, w_t: Any, b_t: Any) -> torch.Tensor:
        (weight,) = ctx.saved_tensors
        return torch.nn.functional.linear(x_t, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # pragma: no cover - the JVP runs under no_grad
        raise RuntimeError("_LinearTangent is forward-mode only (MeanFlow's du/dt runs under no_grad)")


def _has_tangent(t: Any) -> bool:
    import torch.autograd.forward_ad as fwAD

    return isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None


class _TangentLinears(torch.overrides.TorchFunctionMode):
    """Inside this mode ``F.linear`` (every ``nn.Linear``) with a dual input and plain weight and
    bias goes through :class:`_LinearTangent`; any other call runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _has_tangent(x) and not _has_tangent(weight) and not _has_tangent(bias):
                return _LinearTangent.apply(x, weight, bias)
        return func(*args, **kwargs)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


# ----------------------------------------------------------------------------- the phase module


class MeanFlowLoss(nn.Module):
    """The MeanFlow phase: ``forward(batch, draws, carry) -> {"loss", logged parts}``.

    ``batch``: ``latents`` (cached posterior [b, 2C, h, w]), ``label`` [b], ``features`` (one
    tensor per encoder; may be empty without alignment). ``draws``: this micro-batch's rows of
    :meth:`MeanFlow.draw`. Logged: ``mf_loss`` (adaptive-weighted term), ``mse`` (unweighted
    mean of (u - u_tgt)^2), ``v_loss`` (the release's monitor: sum over C, H, W of (u - v)^2,
    batch mean), ``align_loss``, ``cosine`` and per encoder ``cosine/<encoder>``, ``align_loss/<encoder>``.
    """

    def __init__(self, model: nn.Module, opts: MeanFlowOptions, align: nn.Module | None = None,
                 coeff: float = 0.0, latent_norm: Any = None, amp_dtype: torch.dtype | None = None,
                 encoders: Sequence[str] = ()):
        super().__init__()
        if getattr(model, "time_conditions", ("t",)) == ("t",):
            raise ValueError("MeanFlow needs a two-time SiT (build_sit(..., time_conditions=('t', 't-r')))")
        if opts.mf_cfg_w is None:
            raise ValueError("MeanFlowLoss needs resolved options (resolve_options)")
        self.model = model
        self.align = align
        self.coeff = float(coeff)
        self.opts = opts
        self.latent_norm = latent_norm
        self.amp_dtype = amp_dtype
        self.encoders = list(encoders)

    # -- pieces (public so that tests and benchmarks can call them on fixed inputs)

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def guided_velocity(self, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, y: torch.Tensor,
                        drop: torch.Tensor) -> torch.Tensor:
        """``v_g`` (float32 or the input's float64): guided inside the t-window, ``v`` elsewhere and
        for label-dropped samples. One forward of the plain model at r = t (no graph)."""
        o = self.opts
        w, k = float(o.mf_cfg_w), float(o.mf_cfg_k)
        if w == 1.0 and k == 0.0:
            return v
        null = torch.full_like(y, self.model.num_classes)
        if k != 0.0:
            zz, tt, yy = torch.cat([z, z]), torch.cat([t, t]), torch.cat([null, y])
        else:
            zz, tt, yy = z, t, null
        with self._autocast(z.device):
            out, _ = self.model(zz, tt.to(z.dtype), yy, force_drop_ids=torch.zeros_like(yy), r=tt.to(z.dtype))
        out = out.to(v.dtype)
        u_null, u_cond = out.chunk(2) if k != 0.0 else (out, None)
        v_g = w * v + (1.0 - w - k) * u_null
        if u_cond is not None:
            v_g = v_g + k * u_cond
        inside = (t >= o.mf_cfg_t_min) & (t <= o.mf_cfg_t_max) & ~drop
        return torch.where(_bcast(inside, v).bool(), v_g, v)

    @torch.compiler.disable
    def du_dt(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v_g: torch.Tensor,
              y_in: torch.Tensor) -> torch.Tensor:
        """``du/dt`` along ``(dz, dt, dr) = (v_g, 1, 0)``: one forward-mode JVP of the plain model
        (``torch.autograd.forward_ad`` dual tensors: what ``torch.func.jvp`` does, with less
        overhead), no graph, explicit math attention. Eager even inside a compiled phase."""
        import torch.autograd.forward_ad as fwAD

        net = getattr(self.model, "_orig_mod", self.model)  # a torch.compile'd model: its eager module
        dt = z.dtype
        with torch.no_grad(), math_attention(net), _TangentLinears(), self._autocast(z.device), fwAD.dual_level():
            zd = fwAD.make_dual(z, v_g.to(dt))
            td = fwAD.make_dual(t.to(dt), torch.ones_like(t, dtype=dt))
            rd = fwAD.make_dual(r.to(dt), torch.zeros_like(r, dtype=dt))
            u = net(zd, td, y_in, force_drop_ids=torch.zeros_like(y_in), r=rd)[0]
            du = fwAD.unpack_dual(u).tangent
        if du is None:  # u does not depend on (z, t, r) at all
            return torch.zeros_like(v_g)
        return du.to(v_g.dtype)

    def compute(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, r: torch.Tensor, e: torch.Tensor,
                drop: torch.Tensor, targets: Sequence[torch.Tensor] = ()) -> dict[str, torch.Tensor]:
        """The loss for normalised clean latents ``x``, labels ``y``, times ``t >= r`` [b], noise
        ``e`` and the label-dropout mask ``drop`` (see the module docstring for the formula)."""
        o = self.opts
        tb, rb = _bcast(t, x), _bcast(r, x)
        z = (1 - tb) * x + tb * e
        v = e - x
        y_in = torch.where(drop.bool(), torch.full_like(y, self.model.num_classes), y)
        v_g = self.guided_velocity(z, t, v, y, drop.bool())
        du = self.du_dt(z, t, r, v_g, y_in)
        u_tgt = (v_g - torch.clamp(tb - rb, 0.0, 1.0) * du).detach()
        with self._autocast(x.device):
            u, h = self.model(z, t.to(x.dtype), y_in, force_drop_ids=torch.zeros_like(y_in), r=r.to(x.dtype))
            terms = alignment_terms(self.align, h, list(targets), self.encoders, x.device)
        u = u.to(u_tgt.dtype)
        per = ((u - u_tgt) ** 2).flatten(1).sum(1)
        weight = (per.detach() + o.mf_adaptive_c) ** o.mf_adaptive_p
        mf = (per / weight).mean()
        loss = mf + self.coeff * terms["align_loss"]
        out = {**terms, "loss": loss, "mf_loss": mf.detach(), "mse": (per.detach() / u[0].numel()).mean(),
               "v_loss": ((u.detach() - v) ** 2).flatten(1).sum(1).mean(),
               "align_loss": terms["align_loss"].detach()}
        return out

    def forward(self, batch: dict, draws: dict, carry: dict | None = None) -> dict[str, torch.Tensor]:
        from irepa.trainer.data import sample_posterior

        x = sample_posterior(batch["latents"].float(), draws["post"])
        if self.latent_norm is not None:
            x = self.latent_norm.normalize(x)
        return self.compute(x, batch["label"], draws["t"], draws["r"], draws["eps"], draws["drop"],
                            batch.get("features") or [])


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def meanflow_sample(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, steps: int = 1,
                    cfg_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """MeanFlow's few-step sampler: ``z_r = z_t - (t - r) u(z_t, r, t | y)`` on ``t = linspace(1, 0,
    steps + 1)`` (1-NFE: ``z_0 = z_1 - u(z_1, 0, 1)``; 2-NFE: 1 -> 0.5 -> 0). ``cfg_scale`` 1
    (default) uses the trained-in guidance; any other value adds test-time CFG on top,
    ``u_null + s (u_cond - u_null)``, inside ``guidance_interval`` (t of the step). The state is
    integrated in float64, the model sees ``noise.dtype``; it runs in eval mode, restored after."""
    if steps < 1:
        raise ValueError(f"MeanFlow sampling needs steps >= 1; got {steps}")
    net = getattr(model, "module", model)
    null = int(net.num_classes)
    dtype, dev = noise.dtype, noise.device
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    was = model.training
    model.eval()
    try:
        x = noise.to(torch.float64)
        for i in range(steps):
            t, r = ts[i], ts[i + 1]
            guided = cfg_scale != 1.0 and (guidance_interval is None
                                           or guidance_interval[0] <= t <= guidance_interval[1])
            if guided:
                xin, yin = torch.cat([x, x]), torch.cat([labels, torch.full_like(labels, null)])
            else:
                xin, yin = x, labels
            tt = torch.full((xin.shape[0],), t, device=dev, dtype=dtype)
            rr = torch.full((xin.shape[0],), r, device=dev, dtype=dtype)
            out = model(xin.to(dtype), tt, yin, r=rr)
            u = (out[0] if isinstance(out, (tuple, list)) else out).to(torch.float64)
            if guided:
                u_c, u_n = u.chunk(2)
                u = u_n + cfg_scale * (u_c - u_n)
            x = x - (t - r) * u
        return x.to(dtype)
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- the objective


@register
class MeanFlow(Objective):
    """``--objective meanflow``: one-step generation on the cached latents (see the module doc)."""

    name: ClassVar[str] = "meanflow"
    inputs: ClassVar[tuple[str, ...]] = ("latents",)
    #: the release trains with Adam betas (0.9, 0.95) and no gradient clipping; previews sample
    #: with 1 NFE
    preset: ClassVar[dict[str, Any]] = {"betas": (0.9, 0.95), "grad_clip": 0.0, "sample_steps": 1}
    Options: ClassVar[type | None] = MeanFlowOptions
    #: previews and ``irepa-sample`` take 1 NFE unless ``--sample-steps`` / ``--steps`` say otherwise
    preview_sampling: ClassVar[dict[str, Any]] = {"method": "meanflow", "steps": 1}
    final_sampling: ClassVar[dict[str, Any]] = {"method": "meanflow", "steps": 1}
    #: keys a flow SiT checkpoint lacks: ``--init-from`` a flow SiT leaves them at their init
    init_missing_ok: ClassVar[tuple[str, ...]] = ("h_embedder.",)
    #: its average-velocity steps ('ode' an alias); --sample-steps sets the NFE
    sample_methods: ClassVar[tuple[str, ...]] = SAMPLE_METHODS

    def __init__(self, cfg: Any, opts: Any, data: DataSpec, align: Any | None, device: torch.device,
                 amp_dtype: torch.dtype | None = None):
        super().__init__(cfg, opts, data, align, device, amp_dtype)
        self.opts = resolve_options(opts, str(cfg.model))
        if data.latent_shape is None:
            raise ValueError(f"--objective meanflow trains on VAE latents, but {data.store or 'the data'} has none "
                             "(a pixel-only store); build one with a VAE")
        o = self.opts
        if float(cfg.class_dropout) <= 0 and (o.mf_cfg_w != 1.0 or o.mf_cfg_k != 0.0):
            raise ValueError(f"--objective meanflow with guidance (--mf-preset {o.mf_preset}: w {o.mf_cfg_w}, "
                             f"k {o.mf_cfg_k}) needs the null class: --class-dropout > 0 (the release: 0.1), "
                             "or --mf-preset unguided")

    # ------------------------------------------------------------------ model

    def model_config(self) -> dict:
        """The flow SiT's config (:func:`sit_model_config`) conditioned on two times, with the
        alignment depth resolved (REPA's default: 4 for S/B, 8 for L/XL, capped at the depth)."""
        from irepa.trainer.models import SIT_CONFIGS, default_encoder_depth
        from irepa.trainer.objectives.flow import sit_model_config

        cfg = self.cfg
        if cfg.model not in SIT_CONFIGS:
            raise ValueError(f"unknown SiT model {cfg.model!r}; expected one of {sorted(SIT_CONFIGS)}")
        c2, h, w = self.data.latent_shape
        mc = sit_model_config(cfg, self.data, self.align_config, c2 // 2, (h, w), time_conditions=["t", "t-r"])
        if mc["encoder_depth"] is None:
            depth = int(mc.get("depth", SIT_CONFIGS[cfg.model]["depth"]))
            mc["encoder_depth"] = default_encoder_depth(cfg.model, depth)
        return mc

    def build_model(self, config: dict) -> nn.Module:
        from irepa.trainer.models import build_sit

        kw = dict(config)
        name = kw.pop("name")
        return build_sit(name, **kw)

    def check_data(self, config: dict, where: str) -> None:
        from irepa.trainer.models import SIT_CONFIGS
        from irepa.trainer.objectives.flow import check_sit_data, hw_of
        from irepa.trainer.store_checks import StoreMismatchError

        if self.data.latent_shape is None:
            raise StoreMismatchError(f"{where} holds no latents; --objective meanflow trains on VAE latents")
        patch = int(config.get("patch_size") or SIT_CONFIGS[config["name"]]["patch_size"])
        check_sit_data(self.data, f"MeanFlow {config['name']}", int(config["in_channels"]), hw_of(config["input_size"]),
                       patch, where, encoders=bool(config.get("z_dims")))
        bad = [f"encoder {e} feature dim {d} != projector dim {z}" for e, d, z in
               zip(self.data.encoders, self.data.feature_dims, config.get("z_dims") or []) if int(d) != int(z)]
        if bad:
            raise StoreMismatchError(f"{where} does not fit the MeanFlow model {config['name']}: " + "; ".join(bad))

    def check_init(self, state: Any, source: str) -> None:
        from irepa.trainer.objectives.flow import check_sit_init

        check_sit_init(self.data, self.cfg.model, state, source)

    def load_init(self, model: nn.Module, state: Any, source: str, partial: bool) -> dict[str, list[str]]:
        """A MeanFlow or flow SiT checkpoint (REPA / iREPA names): a flow SiT lacks only the
        (t - r) embedder, which keeps its initialisation; anything else missing needs
        ``--init-from-partial``."""
        from irepa.trainer.models import load_reference_state_dict

        info = load_reference_state_dict(model, state, prefer="ema", strict=False, source=source)
        bad = [k for k in info["missing"] if not k.startswith(self.init_missing_ok)] + info["unexpected"]
        if bad and not partial:
            raise ValueError(f"{source} does not fit this MeanFlow SiT: missing {info['missing'][:8]}, unexpected "
                             f"{info['unexpected'][:8]}; --init-from-partial loads what fits and says what was left")
        return info

    def check_compile(self) -> None:
        """Nothing to refuse: ``--compile`` compiles the guidance and gradient passes; the JVP runs
        eagerly (``torch.compiler.disable``). Kept so that the loop can ask every objective."""

    # ------------------------------------------------------------------ one step

    def _times(self, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        o = self.opts
        if o.mf_time_dist == "uniform":
            return torch.rand(batch, generator=generator, device=device)
        n = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(n * o.mf_time_sigma + o.mf_time_mu)

    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """Posterior noise, t >= r (``int(B * mf_ratio)`` random rows with r = t), the interpolation
        noise and the label-dropout mask (a Binomial(B, class_dropout) count among the r = t rows,
        as the release's first-rows rule), for the global batch."""
        c2, h, w = self.data.latent_shape
        shape = (batch, c2 // 2, h, w)
        post = torch.randn(shape, generator=generator, device=device)
        a = self._times(batch, generator, device)
        b = self._times(batch, generator, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        eps = torch.randn(shape, generator=generator, device=device)
        perm = torch.randperm(batch, generator=generator, device=device)
        pos = torch.empty_like(perm)
        pos[perm] = torch.arange(batch, device=device)
        r = torch.where(pos < int(batch * self.opts.mf_ratio), t, r)
        n_drop = (torch.rand(batch, generator=generator, device=device) < float(self.cfg.class_dropout)).sum()
        drop = pos < n_drop
        return {"post": post, "t": t, "r": r, "eps": eps, "drop": drop}

    def phases(self, model: nn.Module, extra: dict[str, nn.Module]) -> list[Phase]:
        from irepa.trainer.align import AlignmentLoss

        al = self.align_config
        use_align = al is not None and len(getattr(model, "projectors", [])) > 0
        align = AlignmentLoss(model.projectors, al, fused=bool(getattr(self.cfg, "fused_align", True))) \
            if use_align else None
        module = MeanFlowLoss(model, self.opts, align, al.coeff if use_align else 0.0, self.data.latent_norm,
                              self.amp_dtype, self.data.encoders)
        return [Phase("meanflow", module, [p for p in model.parameters() if p.requires_grad])]

    # ------------------------------------------------------------------ sampling

    def noise_shape(self) -> tuple[int, ...]:
        c2, h, w = self.data.latent_shape
        return (c2 // 2, h, w)

    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, method: str | None = None,
               steps: int | None = None, cfg_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """1-NFE by default (``steps`` NFEs otherwise); deterministic, so ``generator`` is unused."""
        if method is not None and method not in SAMPLE_METHODS:
            raise ValueError(f"--objective meanflow samples with its average-velocity steps (method 'meanflow', "
                             f"alias 'ode'); {method!r} is a flow sampler")
        return meanflow_sample(model, noise, labels, steps=1 if steps is None else int(steps), cfg_scale=cfg_scale,
                               guidance_interval=guidance_interval)

    def decoder(self, vae_override: str | None = None, extra: dict[str, nn.Module] | None = None,
                offline: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """Sampled (normalised) latents -> uint8 images with the store's VAE (the flow objective's)."""
        from irepa.trainer.objectives.flow import latent_decoder

        return latent_decoder(self.data, self.device, vae_override, offline)
