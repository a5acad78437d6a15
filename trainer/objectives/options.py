"""The built-in objectives' own flags, as plain dataclasses (no torch at import).

``irepa-train`` checks a whole command line against :class:`~irepa.trainer.config.TrainConfig`
and these before it imports torch, so a misspelt flag is answered at once. Each objective module
sets ``Options`` to its class here (``flow.Flow.Options is FlowOptions``); an objective registered
from outside keeps its ``Options`` on its own class (checked after its module is imported).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from irepa.pipeline.config import option
from irepa.trainer.config import model_size

__all__ = ["FlowOptions", "JiTOptions", "MeanFlowOptions", "RepaeOptions", "BUILTIN_OPTIONS", "PATHS",
           "TIME_SAMPLERS", "JIT_SAMPLERS", "TIME_DISTS", "GuidancePreset", "GUIDANCE_PRESETS", "AUTO_PRESET",
           "resolve_options", "BN_INITS"]

#: flow-matching interpolants and time draws (``irepa.trainer.loss`` implements them)
PATHS = ("linear", "cosine")
TIME_SAMPLERS = ("uniform", "lognormal")
#: JiT's ODE samplers (the last step is Euler either way)
JIT_SAMPLERS = ("heun", "euler")
#: the REPA-E latent BatchNorm's starting statistics
BN_INITS = ("auto", "store", "vae")


# ----------------------------------------------------------------------------- flow


@dataclass
class FlowOptions:
    """Options of the flow objective."""

    path_type: str = option("linear", "interpolant: linear (REPA) | cosine", choices=PATHS)
    time_sampler: str = option("uniform", "t ~ uniform | lognormal (t = sigmoid(N(0, 1)))", choices=TIME_SAMPLERS)


# ----------------------------------------------------------------------------- jit


@dataclass
class JiTOptions:
    """``--objective jit``'s own flags."""

    noise_scale: float | None = field(default=None, metadata={
        "help": "std of the noise e: z = t x + (1 - t) e, e ~ N(0, noise_scale^2); default by resolution: "
                "1.0 at 256 px, 2.0 at 512 px (the paper's), H / 256 in general (at least 1.0)"})
    p_mean: float = field(default=-0.8, metadata={
        "help": "mean of the logit-normal time draw t = sigmoid(N(p_mean, p_std))"})
    p_std: float = field(default=0.8, metadata={"help": "std of the logit-normal time draw"})
    t_eps: float = field(default=0.05, metadata={
        "help": "clamp of 1 - t in v = (x - z) / max(1 - t, t_eps), in training and sampling"})
    in_context_len: int | None = field(default=None, metadata={
        "help": "number of in-context class tokens (default: the model table's, 32; 0 = none)"})
    in_context_start: int | None = field(default=None, metadata={
        "help": "0-based block before which the in-context tokens are prepended (default: the model table's: "
                "B 4, L 8, H/G 10)"})
    bottleneck_dim: int | None = field(default=None, metadata={
        "help": "width of the bottleneck patch embedding (default: the model table's: B/L 128, H/G 256)"})
    attn_dropout: float = field(default=0.0, metadata={
        "help": "attention dropout in the middle half of the blocks (official code; draws from torch's global "
                "RNG, so a run with dropout does not reproduce across rank counts)"})
    proj_dropout: float = field(default=0.0, metadata={
        "help": "projection / MLP dropout in the middle half of the blocks (same caveat)"})
    sampler: str = field(default="heun", metadata={
        "help": "ODE sampler: heun (the official default) or euler; the last step is Euler either way"})
    sampling_steps: int = field(default=50, metadata={"help": "number of ODE steps (heun: 2 * steps - 1 model calls)"})
    interval_min: float = field(default=0.1, metadata={
        "help": "CFG is applied only for t > interval_min (JiT time, t = 1 is data; 0 = no lower bound)"})
    interval_max: float = field(default=1.0, metadata={"help": "CFG is applied only for t < interval_max"})

    def __post_init__(self) -> None:
        if self.noise_scale is not None and self.noise_scale <= 0:
            raise ValueError(f"--noise-scale must be > 0; got {self.noise_scale}")
        if self.p_std <= 0:
            raise ValueError(f"--p-std must be > 0; got {self.p_std}")
        if not 0 < self.t_eps <= 1:
            raise ValueError(f"--t-eps must be in (0, 1]; got {self.t_eps}")
        if self.sampler not in JIT_SAMPLERS:
            raise ValueError(f"--sampler must be one of {JIT_SAMPLERS}; got {self.sampler!r}")
        if self.sampling_steps < 1:
            raise ValueError(f"--sampling-steps must be >= 1; got {self.sampling_steps}")
        if not 0 <= self.interval_min < self.interval_max <= 1:
            raise ValueError("the CFG interval needs 0 <= --interval-min < --interval-max <= 1; "
                             f"got [{self.interval_min}, {self.interval_max}]")
        for k in ("attn_dropout", "proj_dropout"):
            if not 0 <= getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be in [0, 1); got {getattr(self, k)}")


# ----------------------------------------------------------------------------- meanflow

TIME_DISTS = ("logit_normal", "uniform")


@dataclass(frozen=True)
class GuidancePreset:
    """Training-time guidance: ``v_g = w v + (1 - w - k) u_null + k u_cond`` for t in [t_min, t_max]."""

    w: float
    k: float
    t_min: float
    t_max: float
    source: str

    @property
    def effective_scale(self) -> float:
        """The CFG scale the trained field corresponds to, ``w / (1 - k)`` (the release's README)."""
        return self.w / (1.0 - self.k) if self.k != 1.0 else math.inf


#: Named recipes. ``b2`` is also the release's MF-B/4 default (configs/default.py); ``b2``/``l2``
#: /``xl2`` are the paper's per-model settings as its third-party reproductions transcribe them
#: (see docs/MEANFLOW.md); ``unguided`` trains ``v_g = v`` (no guidance passes).
GUIDANCE_PRESETS: dict[str, GuidancePreset] = {
    "b2": GuidancePreset(1.0, 0.5, 0.0, 1.0, "release configs/default.py (MF-B/4); paper, MF-B/2"),
    "l2": GuidancePreset(0.2, 0.92, 0.0, 0.8, "paper, MF-L/2"),
    "xl2": GuidancePreset(0.2, 0.92, 0.0, 0.75, "paper, MF-XL/2"),
    "unguided": GuidancePreset(1.0, 0.0, 0.0, 1.0, "release guidance_eq='none'"),
}
#: ``--mf-preset auto``: by the SiT size of ``--model`` (S is not in the paper: it gets B's)
AUTO_PRESET = {"S": "b2", "B": "b2", "L": "l2", "XL": "xl2"}


@dataclass
class MeanFlowOptions:
    """``irepa-train --objective meanflow`` flags (defaults: the official release)."""

    mf_preset: str = field(default="auto", metadata={"help": (
        "training-time guidance recipe: auto (by --model: S/B -> b2, L -> l2, XL -> xl2), b2 (w 1.0, k 0.5, "
        "t in [0, 1]), l2 (w 0.2, k 0.92, t in [0, 0.8]), xl2 (w 0.2, k 0.92, t in [0, 0.75]), unguided; "
        "--mf-cfg-* override single fields")})
    mf_cfg_w: float | None = field(default=None, metadata={
        "help": "guidance w (omega): weight of the conditional velocity v (default: the preset's)"})
    mf_cfg_k: float | None = field(default=None, metadata={
        "help": "guidance k (kappa): weight of the model's own conditional u(z, t, t | c) (default: the preset's)"})
    mf_cfg_t_min: float | None = field(default=None, metadata={"help": "guidance applies for t >= this "
                                                                       "(default: the preset's)"})
    mf_cfg_t_max: float | None = field(default=None, metadata={"help": "guidance applies for t <= this "
                                                                       "(default: the preset's)"})
    mf_ratio: float = field(default=0.75, metadata={
        "help": "fraction of each batch with r = t (the release's data_proportion; the paper's 'ratio of r != t' "
                "is 1 - this)"})
    mf_time_dist: str = field(default="logit_normal", metadata={"help": "t and r distribution: logit_normal "
                                                                        "(sigmoid(N(mu, sigma))) or uniform"})
    mf_time_mu: float = field(default=-0.4, metadata={"help": "logit-normal mean of t and r"})
    mf_time_sigma: float = field(default=1.0, metadata={"help": "logit-normal std of t and r"})
    mf_adaptive_p: float = field(default=1.0, metadata={"help": "adaptive weight power p: loss / sg((loss + c)^p); "
                                                                "0 = plain squared error"})
    mf_adaptive_c: float = field(default=1e-2, metadata={"help": "adaptive weight constant c"})

    def __post_init__(self) -> None:
        if self.mf_preset != "auto" and self.mf_preset not in GUIDANCE_PRESETS:
            raise ValueError(f"--mf-preset {self.mf_preset!r}: expected auto or one of {sorted(GUIDANCE_PRESETS)}")
        if not 0.0 <= self.mf_ratio <= 1.0:
            raise ValueError(f"--mf-ratio must lie in [0, 1]; got {self.mf_ratio}")
        if self.mf_time_dist not in TIME_DISTS:
            raise ValueError(f"--mf-time-dist {self.mf_time_dist!r}: expected one of {TIME_DISTS}")
        if not self.mf_time_sigma > 0:
            raise ValueError(f"--mf-time-sigma must be > 0; got {self.mf_time_sigma}")
        if self.mf_adaptive_p < 0 or not self.mf_adaptive_c > 0:
            raise ValueError(f"--mf-adaptive-p must be >= 0 and --mf-adaptive-c > 0; got p {self.mf_adaptive_p}, "
                             f"c {self.mf_adaptive_c}")
        lo, hi = self.mf_cfg_t_min, self.mf_cfg_t_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"--mf-cfg-t-min {lo} > --mf-cfg-t-max {hi}")


def resolve_options(opts: MeanFlowOptions | None, model_name: str) -> MeanFlowOptions:
    """``opts`` with the preset expanded: ``mf_preset`` concrete (``auto`` resolved by the model
    size) and every ``mf_cfg_*`` filled in (explicit values win). What ``args.json`` should hold."""
    opts = opts if opts is not None else MeanFlowOptions()
    name = opts.mf_preset
    if name == "auto":
        size = model_size(model_name)
        if size not in AUTO_PRESET:
            raise ValueError(f"--mf-preset auto: cannot tell the SiT size of --model {model_name!r}; "
                             f"pass --mf-preset one of {sorted(GUIDANCE_PRESETS)}")
        name = AUTO_PRESET[size]
    p = GUIDANCE_PRESETS[name]
    pick = {"mf_cfg_w": p.w, "mf_cfg_k": p.k, "mf_cfg_t_min": p.t_min, "mf_cfg_t_max": p.t_max}
    filled = {k: (getattr(opts, k) if getattr(opts, k) is not None else v) for k, v in pick.items()}
    out = dataclasses.replace(opts, mf_preset=name, **filled)
    if out.mf_cfg_t_min > out.mf_cfg_t_max:
        raise ValueError(f"MeanFlow guidance window [{out.mf_cfg_t_min}, {out.mf_cfg_t_max}] is empty")
    return out


# ----------------------------------------------------------------------------- repae


@dataclass
class RepaeOptions:
    """``--objective repae`` flags; defaults are the release's (``train_repae.py`` and
    ``configs/l1_lpips_kl_gan.yaml``)."""

    path_type: str = option("linear", "interpolant: linear (REPA, the release) | cosine", choices=PATHS)
    time_sampler: str = option("uniform", "t ~ uniform (the release) | lognormal (t = sigmoid(N(0, 1)))",
                             choices=TIME_SAMPLERS)
    vae_align_coeff: float = option(1.5, "weight of the alignment loss in the VAE loss (release --vae-align-proj-coeff)")
    l1_weight: float = option(1.0, "weight of the L1 reconstruction loss (pixels in [-1, 1])")
    lpips_weight: float = option(1.0, "weight of the LPIPS perceptual loss")
    kl_weight: float = option(1e-6, "weight of the posterior KL (summed over latent elements, mean over images)")
    gan_weight: float = option(0.1, "weight of the generator's hinge GAN loss (release discriminator_weight; constant, "
                                  "no adaptive weight)")
    disc_start: int = option(0, "step from which the GAN losses are on (release discriminator_start)")
    disc_layers: int = option(3, "PatchGAN discriminator strided layers (release n_layers)")
    disc_channels: int = option(64, "PatchGAN discriminator width of the first layer (release ndf)")
    disc_weights: str | None = option(None, "start the discriminator from these weights (release "
                                          "--disc-pretrained-ckpt, e.g. REPA-E/sdvae's sdvae-f8d4-discriminator-ckpt.pt; "
                                          "a state dict with main.* keys or a checkpoint holding 'discriminator')")
    lpips_net: str = option("vgg", "LPIPS trunk: vgg (release), alex or squeeze", choices=("vgg", "alex", "squeeze"))
    lpips_weights: str | None = option(None, "LPIPS trunk weights: a torchvision state dict or full LPIPS state dict; "
                                           "default torchvision's cached vgg16-397923af.pth; 'random' for tests")
    lpips_release_scaling: bool = option(True, "feed LPIPS as the release does (its [-1, 1] images mapped again by "
                                             "2x - 1); false: LPIPS's documented [-1, 1] input")
    bn_momentum: float = option(0.1, "momentum of the SiT's latent BatchNorm (release --bn-momentum)")
    bn_eps: float = option(1e-4, "eps of the SiT's latent BatchNorm (release: 1e-4)")
    bn_init: str = option("auto", "latent BatchNorm start: auto (store latent_stats when they are this VAE's, else the "
                                "VAE's scaling_factor), store, or vae", choices=BN_INITS)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Bad values fail when the options are made, before any work."""
        if self.path_type not in ("linear", "cosine") or self.time_sampler not in ("uniform", "lognormal"):
            raise ValueError(f"--path-type must be linear or cosine and --time-sampler uniform or lognormal; got "
                             f"{self.path_type!r}, {self.time_sampler!r}")
        for k in ("vae_align_coeff", "l1_weight", "lpips_weight", "kl_weight", "gan_weight"):
            if getattr(self, k) < 0:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 0; got {getattr(self, k)}")
        if self.disc_start < 0:
            raise ValueError(f"--disc-start must be >= 0; got {self.disc_start}")
        if self.disc_layers < 1 or self.disc_channels < 1:
            raise ValueError(f"--disc-layers and --disc-channels must be >= 1; got {self.disc_layers}, "
                             f"{self.disc_channels}")
        if self.lpips_net not in ("vgg", "alex", "squeeze"):
            raise ValueError(f"--lpips-net must be vgg, alex or squeeze; got {self.lpips_net!r}")
        if not 0 <= self.bn_momentum <= 1 or self.bn_eps <= 0:
            raise ValueError(f"--bn-momentum must be in [0, 1] and --bn-eps > 0; got {self.bn_momentum}, {self.bn_eps}")
        if self.bn_init not in BN_INITS:
            raise ValueError(f"--bn-init must be one of {BN_INITS}; got {self.bn_init!r}")


#: objective name -> its options class (what the command line is checked against)
BUILTIN_OPTIONS: dict[str, type] = {"flow": FlowOptions, "jit": JiTOptions, "meanflow": MeanFlowOptions,
                                    "repae": RepaeOptions}
