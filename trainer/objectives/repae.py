"""``--objective repae``: REPA-E, the VAE trained end to end with SiT, steered by REPA alignment.

What one step does, as the release's ``train_repae.py`` does it (``End2End-Diffusion/REPA-E``),
for every micro-batch of stored ADM-cropped pixels ``x`` (uint8 -> ``x / 127.5 - 1``) and their
cached encoder features:

0. The VAE (diffusers ``AutoencoderKL``, trainable) encodes ``x``; ``z = mean + std * noise``
   (the step's ``post`` draw); ``recon = decode(z)``.
1. **Phase "vae"** (VAE optimizer). The SiT is frozen and in eval mode, so its latent BatchNorm
   normalises ``z`` with its running statistics and does not update them; it runs only up to
   block ``encoder_depth`` on ``x_t = (1 - t) bn(z) + t eps``, without label dropout. Loss =
   ``l1_weight * |x - recon|_1 + lpips_weight * LPIPS + kl_weight * KL + gan_weight * g *
   (-mean D(recon)) + vae_align_coeff * alignment``, where KL is the posterior's KL summed over
   latent elements and averaged over images, D is frozen in this phase, and ``g`` is 1 from step
   ``disc_start`` on (0 before, when D is not run). The release has no adaptive GAN weight (its
   ``d_weight`` is the constant ``discriminator_weight`` 0.1) and starts the GAN at step 0.
2. **Phase "discriminator"** (its own optimizer): ``g * 0.5 * (mean relu(1 - D(x)) + mean
   relu(1 + D(recon.detach())))``. The release's LeCam term has weight 0 and is not implemented.
3. **Phase "sit"** (SiT optimizer): on ``z.detach()`` with the same ``t`` and ``eps``, the SiT
   in training mode: its BatchNorm normalises with the batch statistics (all ranks under DDP) and
   updates its running statistics; flow-matching MSE ``+ proj_coeff * alignment`` (the
   ``--align`` preset's coefficient, 0.5 with ``repa``, the release's setting).

Each phase gets its own AdamW from the loop (the release: three AdamW, lr 1e-4, betas (0.9,
0.999), no weight decay, grad-norm clip 1). The phases hand tensors on through ``carry``:
``z.detach()``, ``recon.detach()`` and ``x``, so the diffusion loss never reaches the VAE and the
VAE step never reaches the SiT (the release's ``requires_grad(model, False)`` / ``z.detach()``).

**The latent BatchNorm.** The trained model is our :class:`~irepa.trainer.models.SiT` with one
more submodule ``bn`` (``BatchNorm2d(C, eps=1e-4, momentum=0.1, affine=False)``, the release's
``SiT.bn``); its checkpoint keys are the SiT's plus ``bn.running_mean``, ``bn.running_var``,
``bn.num_batches_tracked``, as in the release. The objective applies ``model.bn`` to the VAE
latents before the interpolant (the release applies it at the top of ``SiT.forward``), so
``model(x_t, t, y)`` is the plain SiT and every sampler works on BN-normalised latents.
:meth:`RepaeObjective.sample` undoes the normalisation with the model's running statistics
(``x * sqrt(running_var + eps) + running_mean``, the exact inverse of eval-mode BN; the release's
``denormalize_latents`` omits the ``eps``, a relative difference of ``eps / (2 var)``, about 2e-6
for SD-VAE latents). The running statistics start from (``bn_init``):

* ``auto`` (default): the store's per-channel ``latent_stats`` when the store's latents were made
  by the same VAE the run starts from (the release initialises from that VAE's latent statistics);
  otherwise, e.g. a pixel store built with ``--vae none``, from the VAE config's scalar
  ``scaling_factor`` / ``shift_factor`` (mean = shift, var = 1 / scale^2: for SD-VAE REPA's
  0.18215 normalisation). That start only matters for the first steps: the SiT step normalises
  with batch statistics from step 0, and at momentum 0.1 the running statistics are 99.5% the
  data's after 50 steps.
* ``store``: the store's ``latent_stats`` (error when it has none); ``vae``: the config's scalars.

Under DDP the latent BN and the discriminator's BNs compute their batch statistics over all
ranks (:class:`~irepa.trainer.repae_parts.SyncableBatchNorm2d`), so N ranks train as one rank with
the same global batch. (The release converts only the SiT's BN to SyncBatchNorm; its
discriminator normalises per GPU.) The EMA copies the model's buffers, BN statistics included
(the loop's EMA; the release EMAs them with the parameters' decay).

Deviations from the release, all documented above: exact BN inverse for sampling; the
discriminator's BN statistics span all ranks; everything else is reproduced, including the
release's LPIPS input scaling (``lpips_release_scaling``): the release hands LPIPS images in
[-1, 1] through a wrapper that maps assumed-[0, 1] inputs with ``2 x - 1`` again; ``False`` feeds
LPIPS its documented [-1, 1] range instead.

``export_vae(run, out)`` writes the tuned VAE as a diffusers folder for ``irepa-cache build --vae``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from irepa.trainer.align import alignment_terms
from irepa.trainer.objectives import register
from irepa.trainer.objectives.base import DataSpec, Objective, Phase
from irepa.trainer.objectives.options import RepaeOptions
from irepa.trainer.repae_parts import (PatchDiscriminator, SyncableBatchNorm2d, build_lpips, decode_to_uint8,
                                       frozen, hinge_d_loss, load_discriminator, lpips_trunk_path, require_lpips,
                                       set_bn_sync, sit_hidden_at_depth)

__all__ = ["RepaeOptions", "RepaeObjective", "export_vae", "DEFAULT_VAE"]

#: the release starts from SD-VAE ft-MSE (its REPA-E/sdvae checkpoint is derived from it)
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


def _cfg(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default) if cfg is not None else default


def _jsonable(config: Mapping) -> dict:
    """A diffusers config as plain JSON (private ``_*`` entries dropped, tuples as lists)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not str(k).startswith("_")},
                                 default=list))


def _full_precision(device_type: str):
    """Autocast off for the losses (the release computes them in float32); a no-op on the meta
    device, which has no autocast (FLOP counting)."""
    if device_type == "meta":
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class _Ref:
    """Holds a module without registering it (so DDP, ``.train()`` and state dicts of the phase
    module do not see it)."""

    def __init__(self, module: nn.Module):
        self.module = module


# ----------------------------------------------------------------------------- phases


class _VaePhase(nn.Module):
    """VAE loss: reconstruction + LPIPS + KL + GAN (frozen D) + alignment through the frozen SiT."""

    def __init__(self, obj: "RepaeObjective", vae: nn.Module, sit: nn.Module, disc: nn.Module, lpips: nn.Module,
                 align: nn.Module | None, encoders: Sequence[str]):
        super().__init__()
        self.vae = vae  # the only registered (trained) module
        self._sit, self._disc, self._lpips, self._align = _Ref(sit), _Ref(disc), _Ref(lpips), align
        self._obj, self._encoders = obj, list(encoders)

    def forward(self, batch: dict, draws: dict, carry: dict) -> dict:
        o = self._obj
        opts = o.opts
        sit, disc, lp = self._sit.module, self._disc.module, self._lpips.module
        px = batch["pixels"]
        if px.dtype != torch.uint8 or px.dim() != 4 or px.shape[1] != 3:
            raise ValueError(f"--objective repae expects uint8 pixels [B, 3, H, W]; got {px.dtype} {tuple(px.shape)}")
        x = px.float() / 127.5 - 1.0
        with o.autocast():
            post = self.vae.encode(x).latent_dist
        mean, logvar = post.mean.float(), post.logvar.float()  # logvar clamped to [-30, 20] by diffusers
        z = mean + torch.exp(0.5 * logvar) * draws["post"].to(mean.dtype)
        with o.autocast():
            recon = self.vae.decode(z).sample
        carry.update(x=x, z=z.detach(), recon=recon.detach())
        B = x.shape[0]
        g = o.gan_factor(carry, disc)
        dev = x.device.type
        with _full_precision(dev):
            r = recon.float()
            l1 = (x - r).abs().mean()
            lp.eval()
            scale = opts.lpips_release_scaling
            perc = lp(x, r, normalize=scale).mean() if opts.lpips_weight > 0 else torch.zeros((), device=x.device)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / B  # the posterior's KL to N(0, I)
            if g > 0 and opts.gan_weight > 0:
                with frozen(disc, eval_mode=False):  # D keeps its (training) mode, as in the release
                    gan = -disc(r).mean()
            else:
                gan = torch.zeros((), device=x.device)
        loss = opts.l1_weight * l1 + opts.lpips_weight * perc + opts.kl_weight * kl + opts.gan_weight * g * gan
        out = {"l1": l1.detach(), "lpips": perc.detach(), "kl": kl.detach(), "gan_g": gan.detach()}
        if self._align is not None:
            with frozen(sit):  # eval: BN on running statistics, not updated; no label dropout
                xn = sit.bn(z)
                x_t, _ = o.fm.interpolate(xn, draws["eps"].to(xn.dtype), draws["t"])
                with o.autocast():
                    h = sit_hidden_at_depth(sit, x_t, draws["t"].to(x_t.dtype), batch["label"])
                    terms = alignment_terms(self._align, h, batch["features"], self._encoders, z.device)
            loss = loss + opts.vae_align_coeff * terms["align_loss"]
            terms["align_loss"] = terms["align_loss"].detach()
            out.update(terms)
        else:  # --align none: zeros, as every objective logs them
            out.update(alignment_terms(None, None, batch.get("features") or [], self._encoders, z.device))
        return {"loss": loss, **out}


class _DiscriminatorPhase(nn.Module):
    """Hinge loss of the PatchGAN discriminator on the real pixels and the detached reconstructions."""

    def __init__(self, obj: "RepaeObjective", disc: nn.Module):
        super().__init__()
        self.disc = disc
        self._obj = obj

    def forward(self, batch: dict, draws: dict, carry: dict) -> dict:
        if "recon" not in carry:
            raise RuntimeError("the repae discriminator phase needs the vae phase's reconstructions in `carry`; "
                               "the loop must run the phases of a micro-batch in order (vae, discriminator, sit)")
        g = self._obj.gan_factor(carry, self.disc)
        x, recon = carry["x"], carry["recon"]
        with _full_precision(x.device.type):
            real = self.disc(x.float())
            fake = self.disc(recon.float())
            loss = g * hinge_d_loss(real, fake)
        if self.training and torch.is_grad_enabled():
            self.disc.steps.add_(1)
        return {"loss": loss, "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}


class _SitPhase(nn.Module):
    """Flow matching on the detached latents (BN in training mode) + alignment."""

    def __init__(self, obj: "RepaeObjective", model: nn.Module, align: nn.Module | None, coeff: float,
                 encoders: Sequence[str]):
        super().__init__()
        self.model = model
        self._align, self._coeff, self._encoders, self._obj = align, float(coeff), list(encoders), obj

    def forward(self, batch: dict, draws: dict, carry: dict) -> dict:
        if "z" not in carry:
            raise RuntimeError("the repae sit phase needs the vae phase's latents in `carry`; "
                               "the loop must run the phases of a micro-batch in order (vae, discriminator, sit)")
        o = self._obj
        z = carry["z"]
        xn = self.model.bn(z)  # training mode: batch statistics, running statistics updated
        x_t, target = o.fm.interpolate(xn, draws["eps"].to(xn.dtype), draws["t"])
        with o.autocast():
            v, h = self.model(x_t, draws["t"].to(x_t.dtype), batch["label"], force_drop_ids=draws["drop"].long())
            mse = ((v.float() - target.float()) ** 2).mean(dim=tuple(range(1, v.dim()))).mean()
            out = alignment_terms(self._align, h, batch["features"], self._encoders, z.device)
        loss = mse + self._coeff * out["align_loss"]
        out["align_loss"] = out["align_loss"].detach()
        return {"loss": loss, "mse": mse.detach(), **out}


# ----------------------------------------------------------------------------- the objective


@register
class RepaeObjective(Objective):
    """REPA-E: see the module docstring. Needs a store with pixels (features when aligning)."""

    name = "repae"
    inputs = ("pixels",)
    #: the release aligns with REPA's MLP projector and proj_coeff 0.5
    preset = {"align": "repa"}
    Options = RepaeOptions
    preview_sampling = {"method": "ode", "steps": 50}
    #: the release's FID sampling: SDE, 250 steps
    final_sampling = {"method": "sde", "steps": 250}
    #: CFG interval when none is given: the release's for its SD-VAE FID (CFG 2.2 on t in [0, 0.65])
    guidance_interval = (0.0, 0.65)

    def __init__(self, cfg: Any, opts: RepaeOptions | None, data: DataSpec, align: Any | None, device: torch.device,
                 amp_dtype: torch.dtype | None = None):
        opts = opts if opts is not None else RepaeOptions()
        opts.validate()
        super().__init__(cfg, opts, data, align, device, amp_dtype)
        from irepa.trainer.loss import FlowMatching

        self.fm = FlowMatching(opts.path_type, opts.time_sampler)
        self._vae: nn.Module | None = None
        self._vae_id: str | None = None
        self._disc: nn.Module | None = None
        self._lpips: nn.Module | None = None
        self._config: dict | None = None

    # ------------------------------------------------------------------ the VAE

    def vae_id(self) -> str:
        """``--vae``, else the VAE the store's latents were made with, else SD-VAE ft-MSE (the
        release's starting VAE)."""
        return str(_cfg(self.cfg, "vae") or (self.data.vae or {}).get("id") or DEFAULT_VAE)

    def _load_vae(self) -> nn.Module:
        if self._vae is None:
            from irepa.pipeline.vae import load_vae

            enc = load_vae(self.vae_id())  # the hub when it is reachable; one line naming --vae when not
            self._vae_id = enc.id
            self._vae = enc.vae.float().train().requires_grad_(True)
        return self._vae

    def _vae_config(self) -> dict:
        return _jsonable(self._load_vae().config)

    # ------------------------------------------------------------------ model

    def _bn_init(self, vae_cfg: dict) -> dict:
        C = int(vae_cfg["latent_channels"])
        stats = self.data.latent_stats or {}
        self._load_vae()
        same_vae = (self.data.vae or {}).get("id") == self._vae_id
        usable = bool(stats.get("mean")) and bool(stats.get("std")) and len(stats["mean"]) == C == len(stats["std"])
        mode = self.opts.bn_init
        if mode == "store" or (mode == "auto" and usable and same_vae):
            if not usable:
                raise ValueError(f"--bn-init store: {self.data.store or 'the store'} has no per-channel latent_stats "
                                 f"for {C} channels; use --bn-init vae")
            return {"init_mean": [float(v) for v in stats["mean"]],
                    "init_var": [float(v) ** 2 for v in stats["std"]],
                    "init_from": f"store latent_stats ({(self.data.vae or {}).get('id')})"}
        sf = vae_cfg.get("scaling_factor") or 1.0
        shift = vae_cfg.get("shift_factor") or 0.0
        return {"init_mean": [float(shift)] * C, "init_var": [1.0 / float(sf) ** 2] * C,
                "init_from": f"VAE scaling_factor {sf} / shift_factor {shift}"}

    def check_training_parts(self) -> None:
        """The lpips extra and the LPIPS trunk file: training needs them, sampling a run does not.
        :meth:`model_config` (the loop's first call, before any work) runs this check."""
        require_lpips()
        if self.opts.lpips_weight > 0 and self.opts.lpips_weights != "random":
            lpips_trunk_path(self.opts.lpips_weights, self.opts.lpips_net)

    def model_config(self) -> dict:
        self.check_training_parts()  # a missing extra, or missing LPIPS weights, fail before any work
        d = self.data
        if d.pixel_shape is None:
            raise ValueError(f"--objective repae trains the VAE on stored images, but {d.store or 'the store'} holds "
                             "no pixels; build one with `irepa-cache build --pixels ...`")
        vae_cfg = self._vae_config()
        down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        H, W = int(d.pixel_shape[1]), int(d.pixel_shape[2])
        if H % down or W % down:
            raise ValueError(f"{d.store or 'the store'}: pixels {H}x{W} are not divisible by the VAE's factor {down}")
        h, w = H // down, W // down
        a = self.align_config
        cfg = self.cfg
        kw: dict[str, Any] = dict(
            name=_cfg(cfg, "model", "SiT-B/2"), input_size=h if h == w else [h, w],
            in_channels=int(vae_cfg["latent_channels"]), num_classes=int(d.num_classes),
            encoder_depth=a.encoder_depth if a is not None else None,
            z_dims=[int(z) for z in d.feature_dims] if a is not None else [],
            projector=a.projector if a is not None else "mlp", projector_kernel=a.kernel if a is not None else 3,
            projector_dim=a.projector_dim if a is not None else 2048, qk_norm=bool(_cfg(cfg, "qk_norm", False)),
            class_dropout_prob=float(_cfg(cfg, "class_dropout", 0.1)), attn=_cfg(cfg, "attn", "sdpa"))
        for k in ("hidden_size", "depth", "num_heads", "patch_size"):
            v = _cfg(cfg, k)
            if v is not None:
                kw[k] = int(v)
        kw["latent_bn"] = {"eps": float(self.opts.bn_eps), "momentum": float(self.opts.bn_momentum),
                           **self._bn_init(vae_cfg)}
        kw["vae"] = {"id": self._vae_id, "config": vae_cfg}
        return kw

    def build_model(self, config: dict) -> nn.Module:
        from irepa.trainer.models import build_sit

        kw = dict(config)
        bn_cfg, vae_cfg, name = kw.pop("latent_bn"), kw.pop("vae"), kw.pop("name")
        model = build_sit(name, **kw)
        C = model.in_channels
        bn = SyncableBatchNorm2d(C, eps=float(bn_cfg["eps"]), momentum=float(bn_cfg["momentum"]), affine=False)
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor(bn_cfg["init_mean"], dtype=torch.float32))
            bn.running_var.copy_(torch.tensor(bn_cfg["init_var"], dtype=torch.float32))
        model.bn = bn  # key prefix "bn.", as the release's SiT.bn
        model.build_kwargs = dict(config)
        self._config = dict(config)
        if vae_cfg is not None and self._vae_id is None:
            self._vae_id = vae_cfg.get("id")
        return model

    def check_data(self, config: dict, where: str) -> None:
        from irepa.trainer.store_checks import StoreMismatchError

        d = self.data
        if d.pixel_shape is None:
            raise StoreMismatchError(f"{where} holds no pixels; --objective repae trains the VAE on the stored "
                                     "images: build the store with `irepa-cache build --pixels ...`")
        down = 2 ** (len(config["vae"]["config"]["block_out_channels"]) - 1)
        H, W = int(d.pixel_shape[1]), int(d.pixel_shape[2])
        size = config["input_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if (H, W) != (h * down, w * down):
            raise StoreMismatchError(f"{where} holds {H}x{W} pixels; the model {config['name']} was built for "
                                     f"{h * down}x{w * down} (latents {h}x{w} x VAE factor {down})")
        from irepa.trainer.models import SIT_CONFIGS

        p = int(config.get("patch_size") or SIT_CONFIGS[config["name"]]["patch_size"])
        grid = (h // p, w // p)
        for name, g, dim, z in zip(d.encoders, d.token_grids, d.feature_dims, config.get("z_dims") or []):
            if tuple(g) != grid:
                raise StoreMismatchError(f"{where}: encoder {name} has a {g[0]}x{g[1]} token grid; the SiT's is "
                                         f"{grid[0]}x{grid[1]} ({h}x{w} latents / patch {p})")
            if int(dim) != int(z):
                raise StoreMismatchError(f"{where}: encoder {name} features have dim {dim}; the model's projector "
                                         f"expects {z}")
        # a checkpoint's config (the loop asks before refusing a resume): its latent BN started from
        # statistics that came from its store; another store gives others
        then, vae_then = config.get("latent_bn") or {}, (config.get("vae") or {}).get("id")
        if "init_mean" not in then or vae_then is None:
            return
        self._load_vae()  # sets self._vae_id; another VAE is named by the loop's model-config diff
        if self._vae_id != vae_then:
            return
        now = self._bn_init(config["vae"]["config"])
        if (then["init_mean"], then["init_var"]) != (now["init_mean"], now["init_var"]):
            raise StoreMismatchError(
                f"{where}: this run's latent BatchNorm would start from {now['init_from']}, the checkpoint's "
                f"started from {then['init_from']}: resume a REPA-E run on the store (and --bn-init) it started "
                "with, or use a new --out")

    def _sit_needs(self) -> tuple[int, int, tuple[int, int], str]:
        """(latent channels, patch, token grid, VAE id) of the SiT this run builds."""
        from irepa.trainer.models import SIT_CONFIGS

        cfg = self._config or self.model_config()
        size = cfg["input_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        p = int(cfg.get("patch_size") or SIT_CONFIGS[cfg["name"]]["patch_size"])
        return int(cfg["in_channels"]), p, (h // p, w // p), str(cfg["vae"]["id"])

    def check_init(self, state: Any, source: str) -> None:
        """An ``--init-from`` SiT must fit this run's VAE latents (channels) and token grid (patch,
        ``pos_embed``); refused naming the checkpoint, the VAE and the store."""
        from irepa.trainer.store_checks import StoreMismatchError

        flat = state
        if isinstance(state, Mapping) and ("ema" in state or "model" in state):
            flat = state.get("ema") or state.get("model")
        w = pos = None
        for k, v in (flat or {}).items():
            if str(k).endswith("x_embedder.proj.weight"):
                w = v
            elif str(k).endswith("pos_embed"):
                pos = v
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            return  # nothing to judge by: the strict load names what is missing
        C, p, grid, vae = self._sit_needs()
        c, pc = int(w.shape[1]), int(w.shape[2])
        where = self.data.store or "the store"
        if c != C:
            raise StoreMismatchError(f"--init-from {source}: a SiT for {c}-channel latents; this run's VAE {vae} "
                                     f"makes {C}-channel latents from {where}'s images")
        if pc != p:
            raise StoreMismatchError(f"--init-from {source}: a SiT with patch {pc}; this run's SiT has patch {p} "
                                     "(--patch-size)")
        if isinstance(pos, torch.Tensor) and pos.dim() == 3:
            side = math.isqrt(int(pos.shape[1]))
            if side * side == int(pos.shape[1]) and (side, side) != grid:
                raise StoreMismatchError(f"--init-from {source}: a SiT with a {side}x{side} token grid; {where}'s "
                                         f"{self.data.pixel_shape[1]}x{self.data.pixel_shape[2]} images give "
                                         f"{grid[0]}x{grid[1]} tokens (VAE {vae}, patch {p})")

    def load_init(self, model: nn.Module, state: Any, source: str, partial: bool) -> dict[str, list[str]]:
        """``--init-from`` a SiT checkpoint (REPA / iREPA / REPA-E release, or ours; EMA preferred):
        the SiT's keys (and ``bn.*`` where the checkpoint has them, as REPA-E's do). A REPA / iREPA
        SiT has no latent BN (and maybe another projector): strict loading refuses it, naming the
        keys and ``--init-from-partial``."""
        from irepa.trainer.models import load_reference_state_dict

        try:
            return load_reference_state_dict(model, state, prefer="ema", strict=not partial, source=source)
        except ValueError as e:
            if partial or "shape mismatch" in str(e):
                raise
            raise ValueError(f"{e}. --init-from-partial loads the keys that fit and leaves the rest at their start "
                             "(a REPA / iREPA SiT has no latent BatchNorm bn.*: it then starts from --bn-init)") from None

    def extra_modules(self) -> dict[str, nn.Module]:
        """``vae`` (diffusers AutoencoderKL, from ``--vae``) and ``discriminator`` (PatchGAN); built
        once. When :meth:`build_model` got a checkpoint's config and the VAE has not been loaded,
        the VAE is built from the config alone (its weights come from the checkpoint)."""
        if self._vae is None:
            cfg = (self._config or {}).get("vae")
            if cfg is not None and cfg.get("config"):
                from diffusers import AutoencoderKL

                self._vae = AutoencoderKL.from_config(cfg["config"]).float().train()
            else:
                self._load_vae()
        if self._disc is None:
            self._disc = PatchDiscriminator(3, self.opts.disc_channels, self.opts.disc_layers)
            if self.opts.disc_weights:
                load_discriminator(self._disc, self.opts.disc_weights)
        return {"vae": self._vae, "discriminator": self._disc}

    def lpips(self) -> nn.Module:
        """The frozen LPIPS network (built once from ``--lpips-weights``)."""
        if self._lpips is None:
            self._lpips = build_lpips(self.opts.lpips_weights, self.opts.lpips_net)
        return self._lpips

    # ------------------------------------------------------------------ one step

    def noise_shape(self) -> tuple[int, ...]:
        cfg = self._config or self.model_config()
        size = cfg["input_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg["in_channels"]), int(h), int(w))

    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """``post`` (posterior noise), ``t``, ``eps`` (interpolation noise), ``drop`` (label
        dropout), in this order, as the flow objective draws them."""
        shape = (batch, *self.noise_shape())
        post = torch.randn(shape, generator=generator, device=device)
        t = self.fm.sample_t(batch, device, generator)
        eps = torch.randn(shape, generator=generator, device=device)
        drop = torch.rand(batch, generator=generator, device=device) < float(_cfg(self.cfg, "class_dropout", 0.1))
        return {"post": post, "t": t, "eps": eps, "drop": drop}

    def gan_step(self, carry: dict, disc: nn.Module) -> int:
        """The global step for the GAN schedule: the loop's step (``carry["step"]``, right after a
        resume with another --grad-accum too); called outside the loop, the discriminator's
        micro-batch counter (checkpointed) over ``--grad-accum``."""
        if carry.get("step") is not None:
            s = carry["step"]
            return int(s.reshape(-1)[0]) if isinstance(s, torch.Tensor) else int(s)
        return int(disc.steps) // max(1, int(_cfg(self.cfg, "grad_accum", 1) or 1))

    def gan_factor(self, carry: dict, disc: nn.Module) -> float:
        """1.0 from step ``disc_start`` on, else 0.0 (the release's ``discriminator_factor``)."""
        if self.opts.disc_start <= 0:
            return 1.0
        return 1.0 if self.gan_step(carry, disc) >= self.opts.disc_start else 0.0

    def phases(self, model: nn.Module, extra: dict[str, nn.Module]) -> list[Phase]:
        """``vae``, ``discriminator``, ``sit``: the release's order. Under an initialised process
        group of more than one rank, the latent BN and the discriminator's BNs sync statistics."""
        from irepa.trainer.align import AlignmentLoss

        import torch.distributed as dist

        vae, disc = extra["vae"], extra["discriminator"]
        if not hasattr(model, "bn"):
            raise ValueError("the repae model has no latent BatchNorm `bn`; build it with RepaeObjective.build_model")
        dev = next(model.parameters()).device
        lp = self.lpips().to(dev)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        set_bn_sync(model, world > 1)
        set_bn_sync(disc, world > 1)
        a = self.align_config
        align = None
        if a is not None and len(model.projectors):
            align = AlignmentLoss(model.projectors, a, fused=bool(_cfg(self.cfg, "fused_align", True)))
        coeff = float(a.coeff) if a is not None else 0.0
        return [
            Phase("vae", _VaePhase(self, vae, model, disc, lp, align, self.data.encoders), list(vae.parameters())),
            Phase("discriminator", _DiscriminatorPhase(self, disc), list(disc.parameters())),
            Phase("sit", _SitPhase(self, model, align, coeff, self.data.encoders), list(model.parameters())),
        ]

    # ------------------------------------------------------------------ sampling

    @staticmethod
    def denormalize(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """BN-normalised latents -> VAE latents with ``model.bn``'s running statistics (the exact
        inverse of eval-mode BN)."""
        bn = getattr(model, "module", model).bn
        C = x.shape[1]
        std = torch.sqrt(bn.running_var.float() + bn.eps).view(1, C, 1, 1).to(x.device)
        return x.float() * std + bn.running_mean.float().view(1, C, 1, 1).to(x.device)

    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, method: str | None = None,
               steps: int | None = None, cfg_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Integrate in the SiT's BN-normalised space, then return VAE latents (BN undone)."""
        from irepa.trainer.sample import sample as integrate

        interval = tuple(guidance_interval) if guidance_interval is not None else self.guidance_interval
        x = integrate(model, noise, labels, method=method or self.final_sampling["method"],
                      steps=int(steps or self.final_sampling["steps"]), cfg_scale=cfg_scale,
                      guidance_interval=interval, generator=generator, path=self.opts.path_type)
        return self.denormalize(model, x)

    def decoder(self, vae_override: str | None = None, extra: dict[str, nn.Module] | None = None,
                offline: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """VAE latents (from :meth:`sample`) -> uint8 images with the run's tuned VAE
        (``extra["vae"]``). ``vae_override`` decodes instead when no tuned VAE is given or when it
        names another VAE than the one the run started from (``--vae`` in training names the
        starting VAE, and previews pass it: they still decode with the tuned one); loaded with
        ``local_files_only=offline``."""
        tuned = extra.get("vae") if extra is not None else None
        if vae_override and (tuned is None or str(vae_override) != self.vae_id()):
            from irepa.pipeline.vae import load_vae

            vae = load_vae(vae_override, device=self.device, local_files_only=offline).vae
        elif tuned is not None:
            vae = tuned
        else:
            raise RuntimeError("REPA-E samples decode with the run's own tuned VAE: pass the checkpoint's extra "
                               "modules (extra={'vae': ...}) or a VAE folder (e.g. the export-vae output)")
        return lambda z: decode_to_uint8(vae, z)


# ----------------------------------------------------------------------------- export


def _find_module_state(obj: Mapping, name: str) -> Mapping[str, torch.Tensor]:
    def is_state(v: Any) -> bool:
        return isinstance(v, Mapping) and len(v) > 0 and all(isinstance(t, torch.Tensor) for t in v.values())

    if is_state(obj.get(name)):
        return obj[name]
    for k, v in obj.items():
        if isinstance(v, Mapping) and is_state(v.get(name)):
            return v[name]
    raise ValueError(f"no {name!r} state dict in the checkpoint (top-level keys: {sorted(map(str, obj))}); "
                     "is it a --objective repae run?")


def export_vae(run_dir_or_ckpt: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
               overwrite: bool = False) -> Path:
    """Write a REPA-E run's tuned VAE as a diffusers ``AutoencoderKL`` folder (``save_pretrained``,
    safetensors), loadable by ``AutoencoderKL.from_pretrained`` and ``irepa-cache build --vae``.

    ``run_dir_or_ckpt``: a run folder (its newest checkpoint) or one checkpoint file. ``out_dir``
    defaults to ``<run>/vae``. The folder's config is the starting VAE's with ``latents_mean`` /
    ``latents_std`` set to the EMA SiT's latent BatchNorm statistics (diffusers' per-channel
    latent fields; ``latents_std = sqrt(running_var + eps)``); ``repae_export.json`` records the
    source checkpoint and step. Written to a temporary folder and renamed into place; an existing
    ``out_dir`` is refused unless ``overwrite``. For the second stage re-cache latents with this VAE
    and train with ``--latent-norm stats`` (per-channel statistics, as the release's second stage).
    """
    from diffusers import AutoencoderKL

    from irepa.trainer.checkpoint import latest_checkpoint

    src = Path(run_dir_or_ckpt)
    if src.is_dir():
        ckpt = latest_checkpoint(src)
        if ckpt is None:
            raise FileNotFoundError(f"{src}: no checkpoints/NNNNNNN.pt in this run folder")
        run = src
    elif src.is_file():
        ckpt = src
        run = src.parent.parent if src.parent.name == "checkpoints" else src.parent
    else:
        raise FileNotFoundError(f"{src}: no such run folder or checkpoint")
    out = Path(out_dir) if out_dir is not None else run / "vae"
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or another folder")
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{ckpt}: not a training checkpoint")
    mc = obj.get("model_config")
    mc = json.loads(mc) if isinstance(mc, str) else (mc or {})
    vae_entry = mc.get("vae") if isinstance(mc, Mapping) else None
    if not isinstance(vae_entry, Mapping) or not vae_entry.get("config"):
        raise ValueError(f"{ckpt}: its model_config has no VAE config; is it a --objective repae run?")
    config = dict(vae_entry["config"])
    state = _find_module_state(obj, "vae")
    ema = obj.get("ema") if isinstance(obj.get("ema"), Mapping) else obj.get("model")
    bn = None
    if isinstance(ema, Mapping) and "bn.running_mean" in ema:
        eps = float((mc.get("latent_bn") or {}).get("eps", 1e-4))
        mean = ema["bn.running_mean"].float()
        std = torch.sqrt(ema["bn.running_var"].float() + eps)
        config["latents_mean"], config["latents_std"] = mean.tolist(), std.tolist()
        bn = {"running_mean": mean.tolist(), "running_var": ema["bn.running_var"].float().tolist(), "eps": eps}
    vae = AutoencoderKL.from_config(config)
    missing, unexpected = vae.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: the VAE weights do not fit its config (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    info = {"source_checkpoint": str(Path(ckpt).resolve()), "step": int(obj.get("step", -1)),
            "start_vae": vae_entry.get("id"), "latent_bn_ema": bn}
    (tmp / "repae_export.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    old = None
    if out.exists():  # moved aside, not deleted, until the new folder is in place
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return out
