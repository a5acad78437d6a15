"""The objective seam: what one training variant (flow, meanflow, jit, repae, ...) provides.

The train loop (:mod:`irepa.trainer.train`) knows no objective by name. It asks the objective
selected by ``--objective`` for

* **what it reads** (``inputs``): cached posterior ``latents`` and/or ADM-cropped ``pixels``, plus
  encoder ``features`` when alignment is on;
* **its model** (``model_config`` / ``build_model``): the network that is trained, EMA'd,
  checkpointed and sampled from, plus optional ``extra_modules`` trained beside it (REPA-E's VAE
  and discriminator), all rebuilt from JSON configs kept in the checkpoint;
* **what a step draws** (``draw``): every random tensor of one global step, drawn for the
  *global* batch from a generator seeded by ``(seed, step)``; the loop slices each rank's and
  micro-batch's rows, so N ranks reproduce one rank and a resumed run an unbroken one;
* **the loss and its logged parts** (``phases``): one or more :class:`Phase`, each an
  ``nn.Module`` whose ``forward(batch, draws, carry)`` returns ``{"loss": scalar with grad,
  **logged detached scalars}``, with the parameters its optimizer updates. The loop wraps each
  phase module in DDP, accumulates micro-batches, clips, steps its optimizer, then updates EMAs;
* **its sampler** (``sample`` / ``decoder``): noise -> model output -> uint8 images, used by the
  preview grid in training and by ``irepa-sample``.

Registering a new objective is one module: subclass :class:`Objective`, decorate it with
:func:`irepa.trainer.objectives.register`, and ``--objective NAME`` selects it (a test registers a
toy objective from a test file this way).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn as nn

__all__ = ["DataSpec", "Phase", "Objective"]


@dataclass
class DataSpec:
    """What the run's data holds, from the store's manifest (or the ``--online`` models).

    ``latent_shape`` is the cached posterior ``(2C, h, w)`` (mean and std on channels) or None for
    a pixel-only store; ``pixel_shape`` is ``(3, H, W)`` or None for a store without pixels.
    ``encoders`` / ``feature_dims`` / ``token_grids`` describe the features the run aligns to (in
    target order); ``latent_norm`` is the resolved :class:`irepa.trainer.data.LatentNorm` (or None);
    ``vae`` the manifest's VAE entry (id, scaling factor, ...) for decoding samples.
    """

    latent_shape: tuple[int, int, int] | None = None
    pixel_shape: tuple[int, int, int] | None = None
    encoders: list[str] = field(default_factory=list)
    feature_dims: list[int] = field(default_factory=list)
    token_grids: list[tuple[int, int]] = field(default_factory=list)
    num_classes: int = 1000
    latent_norm: Any = None
    vae: dict | None = None
    latent_stats: dict | None = None
    store: str = ""

    def to_json(self) -> dict:
        """JSON-able form, kept in checkpoints so that ``irepa-sample`` needs no store."""
        return {
            "latent_shape": list(self.latent_shape) if self.latent_shape else None,
            "pixel_shape": list(self.pixel_shape) if self.pixel_shape else None,
            "encoders": list(self.encoders), "feature_dims": [int(d) for d in self.feature_dims],
            "token_grids": [list(g) for g in self.token_grids], "num_classes": int(self.num_classes),
            "latent_norm": self.latent_norm.to_dict() if self.latent_norm is not None else None,
            "vae": self.vae, "latent_stats": self.latent_stats, "store": self.store,
        }

    @classmethod
    def from_json(cls, d: dict) -> "DataSpec":
        from irepa.trainer.data import LatentNorm

        ln = d.get("latent_norm")
        return cls(latent_shape=tuple(d["latent_shape"]) if d.get("latent_shape") else None,
                   pixel_shape=tuple(d["pixel_shape"]) if d.get("pixel_shape") else None,
                   encoders=list(d.get("encoders") or []), feature_dims=list(d.get("feature_dims") or []),
                   token_grids=[tuple(g) for g in d.get("token_grids") or []],
                   num_classes=int(d.get("num_classes", 1000)),
                   latent_norm=LatentNorm.from_dict(ln) if ln else None, vae=d.get("vae"),
                   latent_stats=d.get("latent_stats"), store=d.get("store", ""))


@dataclass
class Phase:
    """One optimisation phase of a step.

    ``module.forward(batch, draws, carry) -> dict`` computes the phase's loss for one micro-batch:
    ``"loss"`` (a scalar carrying the gradient) and any number of detached scalars to log (the
    loop averages them over micro-batches, the log window and ranks; key ``"cosine/<encoder>"``
    style names are fine). ``carry`` is a dict shared by the phases of the same micro-batch
    (REPA-E hands the VAE phase's latents to the SiT phase through it). ``params`` are what the
    phase's optimizer updates and its gradient clip covers (the loop builds one AdamW per phase
    with the run's lr / betas / weight decay / warm-up). ``every`` > 1 runs the phase only on
    steps divisible by it.
    """

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    grad_clip: float | None = None  # None: the run's --grad-clip
    every: int = 1


class Objective:
    """Base class of a training variant; see the module docstring for the contract.

    Subclasses set ``name`` and ``inputs`` and implement the abstract methods. The constructor
    gets the resolved train config (``cfg``: :class:`irepa.trainer.config.TrainConfig`), what the
    data holds (``data``) and the resolved alignment recipe (``align``:
    :class:`irepa.trainer.align.AlignConfig`, None when ``--align none``).
    """

    #: ``--objective`` value
    name: ClassVar[str] = ""
    #: what a batch must carry besides labels and features: any of "latents", "pixels"
    inputs: ClassVar[tuple[str, ...]] = ("latents",)
    #: train-config defaults this objective changes (the "preset" level of the precedence
    #: flag > --config file > preset > default), e.g. {"betas": (0.9, 0.95)} for JiT
    preset: ClassVar[dict[str, Any]] = {}
    #: a dataclass of this objective's own flags (each field: default and
    #: ``metadata={"help": ...}``), or None. Its fields become ``irepa-train`` flags; giving one
    #: with another ``--objective`` is refused before any work. The instance is ``self.opts``.
    Options: ClassVar[type | None] = None

    def __init__(self, cfg: Any, opts: Any, data: DataSpec, align: Any | None, device: torch.device,
                 amp_dtype: torch.dtype | None = None):
        self.cfg, self.opts, self.data, self.align_config = cfg, opts, data, align
        self.device, self.amp_dtype = device, amp_dtype

    # ------------------------------------------------------------------ model

    def model_config(self) -> dict:
        """JSON config of the trained network (checkpointed; a resume must match it)."""
        raise NotImplementedError

    def build_model(self, config: dict) -> nn.Module:
        """The network from :meth:`model_config`'s output. It exposes ``projectors`` (an
        ``nn.ModuleList``, one per encoder, empty without alignment) and ``num_classes``."""
        raise NotImplementedError

    def check_data(self, config: dict, where: str) -> None:
        """Raise :class:`irepa.trainer.store_checks.StoreMismatchError` naming ``where`` (the
        store) when the data cannot train a model of ``config`` (channels, sizes, token grid)."""

    def check_init(self, state: Any, source: str) -> None:
        """Before ``--init-from``: refuse (naming ``source`` and the store) a checkpoint whose
        weights cannot fit the data. Default: nothing to check beyond the strict load."""

    def load_init(self, model: nn.Module, state: Any, source: str, partial: bool) -> dict[str, list[str]]:
        """Load ``--init-from`` weights into ``model``: strictly (every key must fit) unless
        ``partial``; returns ``{"missing": [...], "unexpected": [...]}``."""
        if isinstance(state, dict) and ("ema" in state or "model" in state):
            state = state.get("ema") or state.get("model")
        res = model.load_state_dict(state, strict=not partial)
        return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}

    def check_compile(self) -> None:
        """Raise (one line, before any work) when ``--compile`` cannot work with this objective."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules trained beside the model (checkpointed by name; no EMA). Default: none."""
        return {}

    # ------------------------------------------------------------------ one step

    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """All random tensors of one global step for ``batch`` samples (batch dim first)."""
        raise NotImplementedError

    def phases(self, model: nn.Module, extra: dict[str, nn.Module]) -> list[Phase]:
        """The step's phases, built once after the model (and extras) exist on the device."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sampling

    #: sampler settings of the preview grid in training and of ``irepa-sample`` when not given
    preview_sampling: ClassVar[dict[str, Any]] = {"method": None, "steps": None}
    final_sampling: ClassVar[dict[str, Any]] = {"method": None, "steps": None}
    #: the ``method`` values :meth:`sample` takes (empty: not checked up front)
    sample_methods: ClassVar[tuple[str, ...]] = ()

    def check_sampling(self, method: str | None, steps: int | None) -> None:
        """Refuse (one line, before step 0) a sampler the previews / FID tracking would fail on."""
        from irepa.pipeline.config import OptionError

        if method is not None and self.sample_methods and method not in self.sample_methods:
            raise OptionError(f"--sample-method {method} is not a sampler of --objective {self.name}: "
                              f"{', '.join(self.sample_methods)}")
        if steps is not None and steps < 1:
            raise OptionError(f"--sample-steps must be >= 1; got {steps}")

    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one sample's starting noise (e.g. the latent ``(C, h, w)``)."""
        raise NotImplementedError

    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, method: str | None = None,
               steps: int | None = None, cfg_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Integrate ``noise`` [B, ...] to the model's output space (latents or pixels)."""
        raise NotImplementedError

    def decoder(self, vae_override: str | None = None, extra: dict[str, nn.Module] | None = None,
                offline: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function sampled outputs -> uint8 images [B, 3, H, W]. Loads a VAE when needed
        (``offline``: from local files / the hub cache only, as previews in training do; raises
        with a clear message when it cannot); ``extra`` are the run's extra modules."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def autocast(self):
        """bf16 autocast on CUDA when the run asks for it; a no-op context otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)
