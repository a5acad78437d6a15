"""``--objective flow``: SiT with REPA's flow-matching interpolant; REPA and iREPA are alignment presets on it.

One step (REPA's recipe): from the global batch's draws take the posterior noise, the times, the
interpolation noise and the label-dropout mask; latents are ``z = mean + std * noise`` from the
cached posterior, scaled by the run's :class:`~irepa.trainer.data.LatentNorm`; the loss is
``mean MSE(v, eps - x) + proj_coeff * alignment`` on the block-``encoder_depth`` tokens.
Samplers: Euler ODE, Euler-Maruyama SDE, Heun (:mod:`irepa.trainer.sample`), decoded by the
store's VAE.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from irepa.trainer.align import AlignmentLoss, alignment_terms
from irepa.trainer.data import sample_posterior
from irepa.trainer.loss import FlowMatching, mean_flat
from irepa.trainer.objectives import register
from irepa.trainer.objectives.base import DataSpec, Objective, Phase
from irepa.trainer.objectives.options import FlowOptions

__all__ = ["FlowOptions", "Flow", "FlowStep", "sit_model_config", "check_sit_data", "check_sit_init", "latent_decoder",
           "hw_of"]


class FlowStep(nn.Module):
    """Model + alignment in one module (what DDP wraps): the loss of one micro-batch and its parts."""

    def __init__(self, model: nn.Module, fm: FlowMatching, align: AlignmentLoss | None, coeff: float,
                 latent_norm: Any, autocast: Callable[[], Any], encoders: Sequence[str]):
        super().__init__()
        self.model = model
        self.fm, self.align, self.coeff = fm, align, float(coeff)
        self.latent_norm, self._autocast, self.encoders = latent_norm, autocast, list(encoders)

    def forward(self, batch: dict, draws: dict, carry: dict) -> dict[str, torch.Tensor]:
        x = self.latent_norm.normalize(sample_posterior(batch["latents"].float(), draws["post"]))
        x_t, target = self.fm.interpolate(x, draws["eps"], draws["t"])
        with self._autocast():
            v, h = self.model(x_t, draws["t"].to(x.dtype), batch["label"], force_drop_ids=draws["drop"].long())
            mse = mean_flat((v.float() - target.float()) ** 2).mean()
            out = alignment_terms(self.align, h, batch["features"], self.encoders, x.device)
        out["loss"] = mse + self.coeff * out["align_loss"]
        out["mse"] = mse.detach()
        out["align_loss"] = out["align_loss"].detach()
        return out


def sit_model_config(cfg: Any, data: DataSpec, align: Any | None, in_channels: int, input_hw: tuple[int, int],
                     **more: Any) -> dict:
    """JSON config of a SiT for this run (``build_sit``'s keyword arguments plus its name)."""
    kw: dict[str, Any] = dict(
        name=cfg.model,
        input_size=int(input_hw[0]) if input_hw[0] == input_hw[1] else list(input_hw),
        in_channels=int(in_channels), num_classes=int(data.num_classes),
        encoder_depth=align.encoder_depth if align is not None else None,
        z_dims=[int(z) for z in data.feature_dims] if align is not None else [],
        projector=align.projector if align is not None else "mlp",
        projector_kernel=align.kernel if align is not None else 3,
        projector_dim=align.projector_dim if align is not None else 2048,
        qk_norm=cfg.qk_norm, class_dropout_prob=cfg.class_dropout, attn=cfg.attn, **more)
    for k in ("hidden_size", "depth", "num_heads", "patch_size"):
        v = getattr(cfg, k)
        if v is not None:
            kw[k] = int(v)
    return kw


def hw_of(v: Any) -> tuple[int, int]:
    """A model config's ``input_size`` (an int or [h, w]) as (h, w)."""
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _patch_of(name: str, config: dict) -> int:
    from irepa.trainer.models import SIT_CONFIGS

    if config.get("patch_size"):
        return int(config["patch_size"])
    if name not in SIT_CONFIGS:
        raise ValueError(f"unknown SiT model {name!r}; expected one of {sorted(SIT_CONFIGS)}")
    return int(SIT_CONFIGS[name]["patch_size"])


def check_sit_data(data: DataSpec, what: str, in_channels: int, input_hw: tuple[int, int], patch: int,
                   where: str, encoders: bool = True) -> None:
    """Refuse latents / token grids that do not fit a SiT of these sizes (names the store)."""
    from irepa.trainer.store_checks import ModelNeeds, StoreMismatchError

    needs = ModelNeeds(name=what, in_channels=int(in_channels), input_size=input_hw, patch_size=int(patch))
    problems = []
    if data.latent_shape is None:
        raise StoreMismatchError(f"store {where} holds no latents ({what} trains on VAE latents); "
                                 "build it with a VAE, or use an objective that trains on pixels")
    c2, h, w = data.latent_shape
    if c2 // 2 != needs.in_channels:
        problems.append(f"latent channel count {c2 // 2} != {needs.in_channels}")
    if (h, w) != tuple(needs.input_size):
        problems.append(f"latent size {h}x{w} != {needs.input_size[0]}x{needs.input_size[1]}")
    if encoders:
        for e, g in zip(data.encoders, data.token_grids):
            if tuple(g) != needs.grid:
                problems.append(f"encoder {e} token grid {g[0]}x{g[1]} != the model's patch grid "
                                f"{needs.grid[0]}x{needs.grid[1]}")
    if problems:
        enc = ", ".join(f"{e} (token grid {g[0]}x{g[1]}, dim {d})"
                        for e, g, d in zip(data.encoders, data.token_grids, data.feature_dims)) or "no encoder features"
        raise StoreMismatchError(
            f"store {where} does not fit the model: {'; '.join(problems)}. The store holds latents "
            f"[{c2}, {h}, {w}] ({c2 // 2} channels at {h}x{w}, mean+std) and encoders: {enc}; {needs.describe()}.")


def check_sit_init(data: DataSpec, model_name: str, state: Any, source: str) -> None:
    """What a REPA / iREPA / irepa SiT checkpoint's weights need of the store: channels and patch
    from the patch embedding, the token count from ``pos_embed`` (refused naming ``source``)."""
    flat = state
    if isinstance(state, dict) and ("ema" in state or "model" in state):
        flat = state.get("ema") or state.get("model")
    w = pos = None
    for k, v in (flat or {}).items():
        if k.endswith("x_embedder.proj.weight"):
            w = v
        if k.endswith("pos_embed"):
            pos = v
    if w is None or data.latent_shape is None:
        return
    c, p = int(w.shape[1]), int(w.shape[2])
    size = (int(data.latent_shape[1]), int(data.latent_shape[2]))
    if pos is not None:
        side = math.isqrt(int(pos.shape[1]))
        if side * side == int(pos.shape[1]):
            size = (side * p, side * p)
    check_sit_data(data, f"{model_name} from {source}", c, size, p, data.store, encoders=False)


def latent_decoder(data: DataSpec, device: torch.device, vae_override: str | None = None, offline: bool = True
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised latents -> uint8 images with the store's VAE, or REPA's default VAE when the
    data names none (a release checkpoint); ``offline``: no hub access."""
    from irepa.pipeline.defaults import DEFAULT_VAE
    from irepa.pipeline.vae import load_vae

    vae_id = vae_override or (data.vae or {}).get("id") or DEFAULT_VAE
    vae = load_vae(str(vae_id), device=device, local_files_only=offline)
    norm = data.latent_norm

    def decode(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(norm.denormalize(x.float()))

    decode.vae = vae  # type: ignore[attr-defined]
    return decode


@register
class Flow(Objective):
    """SiT + REPA's interpolant (t = 0 is data), v-prediction, MSE over all non-batch dims."""

    name = "flow"
    inputs = ("latents",)
    Options = FlowOptions
    preview_sampling = {"method": "ode", "steps": 50}
    final_sampling = {"method": "sde", "steps": 250}
    sample_methods = ("ode", "sde", "heun")

    def check_sampling(self, method: str | None, steps: int | None) -> None:
        super().check_sampling(method, steps)
        if (method or self.preview_sampling["method"]) == "sde" and steps is not None and steps < 2:
            from irepa.pipeline.config import OptionError

            raise OptionError(f"--sample-method sde needs --sample-steps >= 2; got {steps}")

    def __init__(self, cfg: Any, opts: Any, data: DataSpec, align: Any | None, device: torch.device,
                 amp_dtype: torch.dtype | None = None):
        super().__init__(cfg, opts if opts is not None else FlowOptions(), data, align, device, amp_dtype)
        self.fm = FlowMatching(self.opts.path_type, self.opts.time_sampler)

    # -------------------------------------------------------------- model

    def _latent(self) -> tuple[int, tuple[int, int]]:
        if self.data.latent_shape is None:
            raise ValueError(f"--objective {self.name} trains on VAE latents; store {self.data.store} has none (a "
                             "pixel-only store, built with --vae none): build one with a VAE or --latents-from, or "
                             "train a pixel objective (--objective jit, repae)")
        c2, h, w = self.data.latent_shape
        return c2 // 2, (int(h), int(w))

    def model_config(self) -> dict:
        c, hw = self._latent()
        return sit_model_config(self.cfg, self.data, self.align_config, c, hw)

    def build_model(self, config: dict) -> nn.Module:
        from irepa.trainer.models import build_sit

        kw = dict(config)
        return build_sit(kw.pop("name"), **kw)

    def check_data(self, config: dict, where: str) -> None:
        check_sit_data(self.data, str(config.get("name")), int(config["in_channels"]), hw_of(config["input_size"]),
                       _patch_of(str(config.get("name")), config), where, encoders=self.align_config is not None)

    def check_init(self, state: Any, source: str) -> None:
        check_sit_init(self.data, self.cfg.model, state, source)

    def load_init(self, model: nn.Module, state: Any, source: str, partial: bool) -> dict[str, list[str]]:
        from irepa.trainer.models import load_reference_state_dict

        return load_reference_state_dict(model, state, prefer="ema", strict=not partial, source=source)

    # -------------------------------------------------------------- step

    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        c, (h, w) = self._latent()
        post = torch.randn((batch, c, h, w), generator=generator, device=device)
        t = self.fm.sample_t(batch, device, generator)
        eps = torch.randn((batch, c, h, w), generator=generator, device=device)
        drop = torch.rand(batch, generator=generator, device=device) < self.cfg.class_dropout
        return {"post": post, "t": t, "eps": eps, "drop": drop}

    def phases(self, model: nn.Module, extra: dict[str, nn.Module]) -> list[Phase]:
        align = (AlignmentLoss(model.projectors, self.align_config, fused=self.cfg.fused_align)
                 if self.align_config is not None else None)
        coeff = self.align_config.coeff if self.align_config is not None else 0.0
        step = FlowStep(model, self.fm, align, coeff, self.data.latent_norm, self.autocast, self.data.encoders)
        return [Phase("model", step, list(model.parameters()))]

    # -------------------------------------------------------------- sampling

    def noise_shape(self) -> tuple[int, ...]:
        c, hw = self._latent()
        return (c, *hw)

    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, method: str | None = None,
               steps: int | None = None, cfg_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        from irepa.trainer.sample import sample

        return sample(model, noise, labels, method=method or self.final_sampling["method"],
                      steps=int(steps or self.final_sampling["steps"]), cfg_scale=cfg_scale,
                      guidance_interval=guidance_interval or (0.0, 0.7), generator=generator, path=self.opts.path_type)

    def decoder(self, vae_override: str | None = None, extra: dict[str, nn.Module] | None = None,
                offline: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        return latent_decoder(self.data, self.device, vae_override, offline)
