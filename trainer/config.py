"""``irepa-train`` and ``irepa-sample`` options: one dataclass each, the single source of their flags.

Torch-free at import, so that command lines are checked before anything heavy loads. An
objective's own flags are its ``Options`` dataclass (see ``irepa.trainer.objectives``); the
train config's resolution (:func:`resolve_train`) applies the precedence of
:func:`irepa.pipeline.config.resolve`: flag > ``--config`` file > preset (the objective's, then
the alignment preset's) > default.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from irepa.pipeline.config import OptionError, check_fields, option, resolve, to_json
from irepa.pipeline.defaults import SD_VAE_SCALE

__all__ = ["TrainConfig", "SampleConfig", "EvalConfig", "ExportVaeConfig", "ALIGN_FIELDS", "resolve_train", "objective_fields", "train_to_json",
           "require_extras", "model_size"]

def model_size(model_name: str) -> str:
    """The size of a model name (``SiT-XL/2`` -> ``XL``, ``JiT-B/16`` -> ``B``; empty when there is none)."""
    try:
        return model_name.split("-", 1)[1].split("/", 1)[0]
    except IndexError:
        return ""


ALIGN_PRESETS = ("irepa", "repa", "irepa-official-ldm", "irepa-official-jit", "none")
#: TrainConfig field -> AlignConfig field, for the alignment preset's values
ALIGN_FIELDS = {"proj_coeff": "coeff", "projector": "projector", "projector_kernel": "kernel",
                "projector_dim": "projector_dim", "spatial_norm": "spatial_norm", "gamma": "gamma",
                "encoder_depth": "encoder_depth"}


@dataclass
class TrainConfig:
    """Train a diffusion model with REPA / iREPA alignment from a feature cache (or --online from images)."""

    cache: str | None = option(None, "store folder written by `irepa-cache build` (zarr or webdataset)", metavar="STORE")
    objective: str = option("flow", "training variant: flow (SiT, REPA's interpolant), meanflow, jit, repae, "
                                    "or any registered objective")
    model: str = option("SiT-B/2", "model name, e.g. SiT-{S,B,L,XL}/{2,4,8}")
    align: str = option("irepa", "alignment preset: irepa (conv k3, zscore gamma 1, coeff 1) | repa (mlp, coeff 0.5) | "
                                 "irepa-official-ldm (conv k1, gamma 0.6) | irepa-official-jit | none",
                         choices=ALIGN_PRESETS)
    proj_coeff: float | None = option(None, "alignment coefficient (default: the preset's)")
    projector: str | None = option(None, "projector: mlp | conv | linear (default: the preset's)",
                                   choices=("mlp", "conv", "linear"))
    projector_kernel: int | None = option(None, "conv projector kernel size, odd (default: the preset's)")
    projector_dim: int | None = option(None, "hidden width of the mlp projector (default 2048)")
    spatial_norm: str | None = option(None, "spatial normalisation of the encoder features: none | zscore",
                                      choices=("none", "zscore"))
    gamma: float | None = option(None, "zscore mean weight: (x - gamma * mean) / std (default: the preset's)")
    encoder_depth: int | None = option(None, "1-based block whose output is aligned (default 4 for S/B, 8 for L/XL)")
    encoders: list[str] | None = option(None, "encoders to align to, comma separated (default: all in the store)",
                                        metavar="A,B")
    batch_size: int = option(256, "global batch (all ranks and accumulation steps together)")
    lr: float = option(1e-4, "AdamW learning rate (ignored when --blr is set)")
    blr: float | None = option(None, "base learning rate: lr = blr * batch_size / 256 (JiT's convention)")
    warmup_steps: int = option(0, "linear learning-rate warm-up over this many steps (lr * step / N)")
    warmup_epochs: float = option(0.0, "warm-up length in epochs instead (JiT's convention; --warmup-steps wins)")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", metavar="B1,B2")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient-norm clip (0 = off)")
    steps: int = option(400_000, "total optimizer steps")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    ema: tuple[float, ...] = option((0.9999,), "EMA decay(s), comma separated; samples use the first", metavar="D1,D2")
    seed: int = option(0, "seeds the model init, the sample order and every per-step draw")
    out: str | None = option(None, "run folder (default runs/<model>-<store>-<align>)", metavar="DIR")
    ckpt_every: int = option(50_000, "checkpoint every N steps (and at the end); 0 = only at the end")
    sample_every: int = option(10_000, "PNG grid of EMA samples every N steps (needs the decoder offline); 0 = off")
    log_every: int = option(100, "metrics line every N steps (<out>/metrics.jsonl)")
    compile: bool = option(False, "torch.compile the training step")
    online: bool = option(False, "compute latents and features from images every step (REPA's way; the baseline)")
    data: str | None = option(None, "images for --online (default: the source the store was built from)",
                              metavar="PATH")
    vae: str | None = option(None, "VAE id / folder for --online and sample previews (default: the store's)",
                             metavar="ID")
    encoder_weights: str | None = option(None, "local encoder weights for --online (PATH or name=PATH,...)",
                                         metavar="PATH")
    resolution: int = option(256, "image size for --online without a store")
    resume: bool | None = option(None, "continue from the newest checkpoint in --out (default: yes when there is one)")
    init_from: str | None = option(None, "start from the weights of a REPA / iREPA / irepa checkpoint (EMA "
                                         "preferred); every key must fit", metavar="CKPT")
    init_from_partial: bool = option(False, "with --init-from: allow missing / unexpected keys (e.g. a checkpoint "
                                            "without projectors) and print what was left out")
    num_workers: int = option(4, "DataLoader workers")
    latent_norm: str = option("sd", "sd ((z - shift) * scaling_factor, REPA's 0.18215) | stats (per-channel "
                                    "(z - mean_c) / std_c from the manifest, iREPA / REPA-E)", choices=("sd", "stats"))
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    precision: str = option("bf16", "bf16 (autocast on CUDA) | fp32", choices=("bf16", "fp32"))
    class_dropout: float = option(0.1, "label-dropout probability for classifier-free guidance")
    qk_norm: bool = option(False, "LayerNorm on queries and keys")
    attn: str = option("sdpa", "attention: sdpa (torch scaled_dot_product_attention) | xformers | math",
                       choices=("sdpa", "xformers", "math"))
    fused_align: bool = option(True, "fused alignment loss (recomputes in backward: less memory); "
                                     "--nofused-align uses the plain composition")
    hidden_size: int | None = option(None, "model width override (tiny models: tests, demo)")
    depth: int | None = option(None, "model depth override")
    num_heads: int | None = option(None, "attention heads override")
    patch_size: int | None = option(None, "patch size override")
    verify: bool = option(False, "recompute the store's checksums before training")
    skip_damaged: bool = option(False, "leave samples whose bytes fail their read-time checksum out of their batch "
                                       "(counted in metrics.jsonl and logged) instead of stopping the run")
    shuffle_buffer: int = option(1000, "samples in the shuffle buffer of webdataset stores")
    sample_n: int = option(16, "images in each preview grid")
    sample_steps: int | None = option(None, "sampler steps for previews (default: the objective's)")
    sample_method: str | None = option(None, "sampler for previews (default: the objective's; flow: ode | sde | heun)")
    sample_cfg: float = option(1.0, "CFG scale for previews")
    eval_every: int = option(0, "every N steps, sample --eval-samples images with the EMA (the preview sampler "
                                "settings) and log their FID against --eval-ref as fid_<K> in metrics.jsonl; 0 = off")
    eval_ref: str | None = option(None, "reference for --eval-every: an ADM reference batch .npz or images "
                                        "(see irepa-eval)", metavar="REF")
    eval_samples: int = option(1000, "images per training-time FID (FID-K is biased upward for K < 50000)")
    eval_inception_weights: str | None = option(None, "Inception weights for --eval-every (see irepa-eval "
                                                      "--inception-weights)", metavar="PATH")
    tensorboard: bool = option(False, "also log to <out>/tensorboard (needs the tensorboard extra)")
    wandb: bool = option(False, "also log the metrics rows to Weights & Biases (needs the wandb extra)")
    wandb_project: str = option("irepa", "W&B project")
    wandb_name: str | None = option(None, "W&B run name (default: the run folder's name)")
    wandb_mode: str = option("online", "W&B mode: online, or offline (sync later with `wandb sync`)",
                             choices=("online", "offline"))
    progress: bool = option(True, "show the tqdm bar")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.steps < 0:
            raise OptionError(f"--steps must be >= 0; got {self.steps}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if not self.ema or not all(0.0 <= d < 1.0 for d in self.ema):
            raise OptionError(f"--ema takes decays in [0, 1); got {self.ema}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise OptionError(f"--class-dropout must be in [0, 1); got {self.class_dropout}")
        if self.eval_every < 0 or (self.eval_every and (not self.eval_ref or self.eval_samples < 2)):
            raise OptionError("--eval-every N needs --eval-ref REF and --eval-samples >= 2")
        if self.num_workers < 0 or self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise OptionError("--num-workers, --warmup-steps and --warmup-epochs must be >= 0")

    def run_name(self) -> str:
        """Default run folder name: <model>-<store>-<align>."""
        store = Path(self.cache).name if self.cache else (Path(self.data).name if self.data else "online")
        raw = f"{self.model}-{store}-{self.align}" + ("" if self.objective == "flow" else f"-{self.objective}")
        return re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).strip("-")

    def learning_rate(self) -> float:
        """The peak learning rate: --blr * batch / 256 when --blr is set, else --lr."""
        return self.blr * self.batch_size / 256 if self.blr is not None else self.lr

    def to_json(self) -> dict:
        return to_json(self)


@dataclass
class SampleConfig:
    """Sample from a trained model; write a PNG grid and the ADM evaluation suite's .npz."""

    ckpt: str | None = option(None, "an irepa-train checkpoint (.pt) or run folder (its newest checkpoint)",
                              metavar="CKPT")
    init_from: str | None = option(None, "a REPA / iREPA release or training checkpoint instead (give --model etc.)",
                                   metavar="CKPT")
    out: str = option("samples", "output folder: samples.npz (uint8 [N, H, W, 3] under arr_0) and grid.png")
    num_samples: int = option(64, "number of images (50000 for FID)")
    batch_size: int = option(32, "images per forward batch per rank")
    method: str | None = option(None, "sampler (default: the objective's: flow sde (REPA's headline; also ode, "
                                      "heun), meanflow its average-velocity steps, jit heun, repae sde)")
    steps: int | None = option(None, "sampler steps (default: the objective's: flow 250, meanflow 1 NFE (2: 2-NFE), "
                                     "jit 50, repae 250)")
    cfg_scale: float = option(1.0, "classifier-free guidance scale (REPA's FID setting: 1.8)")
    guidance_low: float | None = option(None, "CFG only for guidance_low <= t <= guidance_high (default: the "
                                              "objective's; flow: 0, REPA's interval)")
    guidance_high: float | None = option(None, "upper end of the guidance interval (default: the objective's; "
                                               "flow: 0.7, REPA's)")
    labels: list[int] | None = option(None, "class labels, comma separated, cycled; default: random per image from seed",
                                      metavar="A,B")
    seed: int = option(0, "image i's noise and label depend on (seed, i) only, not on ranks or batch size")
    vae: str | None = option(None, "VAE id / folder (default: the checkpoint's store VAE)", metavar="ID")
    use_ema: bool = option(True, "sample with the EMA weights")
    model: str = option("SiT-XL/2", "SiT name for --init-from checkpoints")
    resolution: int = option(256, "image size for --init-from checkpoints (latent = resolution / 8)")
    num_classes: int = option(1000, "classes for --init-from checkpoints")
    latent_norm: str = option("sd", "latent scaling for --init-from checkpoints", choices=("sd", "stats"))
    scaling_factor: float = option(SD_VAE_SCALE, "SD-VAE scaling for --init-from checkpoints")
    path_type: str = option("linear", "interpolant of --init-from checkpoints (ours record it)",
                            choices=("linear", "cosine"))
    qk_norm: bool = option(False, "qk-norm of --init-from checkpoints")
    hidden_size: int | None = option(None, "tiny-model override for --init-from checkpoints")
    depth: int | None = option(None, "tiny-model override")
    num_heads: int | None = option(None, "tiny-model override")
    patch_size: int | None = option(None, "patch-size override")
    grid: int = option(64, "images in grid.png (0 = none)")
    device: str = option("auto", "auto | cpu | cuda")
    progress: bool = option(True, "show a tqdm bar")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.num_samples < 0 or self.batch_size < 1:
            raise OptionError(f"--num-samples must be >= 0 and --batch-size >= 1; got {self.num_samples}, "
                              f"{self.batch_size}")


@dataclass
class EvalConfig:
    """Score a samples .npz (or folder) as the ADM evaluation suite does: FID, sFID, IS, precision, recall."""

    samples: str = option("", "samples to score: a .npz with uint8 [N, H, W, 3] under arr_0 (irepa-sample's, ADM's "
                              "format) or a folder of images", positional=True)
    ref: str = option("", "reference: an ADM reference batch .npz (mu/sigma/mu_s/sigma_s read from it, arr_0 images "
                          "for precision/recall), a .npz of images (arr_0) or a folder of images", metavar="REF")
    out: str | None = option(None, "JSON result file (default: next to the samples, <samples>.eval.json)")
    batch_size: int = option(200, "images per Inception forward pass (per rank)")
    device: str = option("auto", "auto (cuda:LOCAL_RANK when available, else cpu) | cpu | cuda | cuda:N")
    inception_weights: str | None = option(None, "torch-fidelity Inception weights file "
                                                 "(weights-inception-2015-12-05-6726825d.pth); default $IREPA_INCEPTION, "
                                                 "then the torch hub cache; 'random' = random network, tests only",
                                           metavar="PATH")
    encoder: str | None = option(None, "encoder the sampled model was aligned to, recorded in the JSON for "
                                       "`irepa-cache metrics --fid` (default: from the run's args.json next to the "
                                       "samples)")
    metrics: str = option("fid,sfid,is,pr", "comma list of fid, sfid, is, pr (precision/recall), or all")
    resolution: int = option(0, "ADM center-crop size for folders of images (default: the samples' resolution)")
    num_workers: int = option(4, "image-decoding workers for folders of images")
    ref_cache: bool = option(True, "cache what is computed from reference images next to the reference "
                                   "(--noref-cache: never)")
    save_features: str | None = option(None, "also write the samples' features (pool, spatial, logits; float32) "
                                             "and the reference's precision/recall features to this .npz")
    progress: bool = option(True, "show progress bars (rank 0)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.batch_size < 1 or self.num_workers < 0 or self.resolution < 0:
            raise OptionError("--batch-size must be >= 1, --num-workers and --resolution >= 0")


@dataclass
class ExportVaeConfig:
    """Write a REPA-E run's tuned VAE as a diffusers folder, for `irepa-cache build --vae FOLDER`."""

    run: str = option("", "a REPA-E run folder (its newest checkpoint) or one checkpoint file", positional=True)
    out: str | None = option(None, "output folder (default <run>/vae)", metavar="DIR")
    overwrite: bool = option(False, "replace an existing, non-empty output folder")


# ----------------------------------------------------------------------------- objectives' own options


def objective_fields(name: str | None = None) -> dict[str, dataclasses.Field]:
    """Fields of the objectives' own options (one objective's, or every built-in's), by name."""
    from irepa.trainer.objectives import objective_names, objective_options

    out: dict[str, dataclasses.Field] = {}
    for n in ([name] if name else objective_names()):
        opts = objective_options(n)
        if opts is not None:
            for f in dataclasses.fields(opts):
                out[f.name] = f
    return out


def _presets(explicit: dict[str, Any], defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The objective's preset, then the alignment preset (named by flag, file or objective)."""
    from irepa.trainer.align import PRESETS
    from irepa.trainer.objectives import get_objective

    obj = get_objective(explicit.get("objective", defaults["objective"]))
    objective_preset = dict(obj.preset)
    align = explicit.get("align", objective_preset.get("align", defaults["align"]))
    base = PRESETS[align]
    align_preset = {k: getattr(base, a) for k, a in ALIGN_FIELDS.items()}
    return {"objective": objective_preset, "align": align_preset}


def resolve_train(flags: Mapping[str, Any] | None = None, config: Mapping[str, Any] | str | None = None
                  ) -> tuple[TrainConfig, Any, list[str]]:
    """(TrainConfig, the objective's Options instance or None, notes) from flags and a config file.

    Flags and config-file keys that are fields of the selected objective's ``Options`` go there;
    one of another objective is refused, naming the objective it belongs to.
    """
    from irepa.pipeline.config import load_config_file
    from irepa.trainer.objectives import get_objective, objective_names

    flags = dict(flags or {})
    conf: dict[str, Any] = {}
    where = "--config"
    if isinstance(config, (str, Path)):
        where = f"--config {config}"
        conf = load_config_file(config)
    elif config:
        conf = {str(k).replace("-", "_"): v for k, v in dict(config).items()}
    common = {f.name for f in dataclasses.fields(TrainConfig)}
    name = flags.get("objective", conf.get("objective", "flow"))
    cls = get_objective(str(name))
    own = {f.name for f in dataclasses.fields(cls.Options)} if cls.Options is not None else set()
    split_flags = {k: v for k, v in flags.items() if k in own}
    split_conf = {k: v for k, v in conf.items() if k in own}
    for src, what in ((flags, "flag"), (conf, where)):
        for k in src:
            if k in common or k in own:
                continue
            owners = [n for n in objective_names() if k in objective_fields(n)]
            if owners:
                where_ = "" if what == "flag" else f"{what}: "
                raise OptionError(f"{where_}--{k.replace('_', '-')} belongs to --objective {' / '.join(owners)}, "
                                  f"not {name}")
    cfg, notes = resolve(TrainConfig, {k: v for k, v in flags.items() if k in common},
                         {k: v for k, v in conf.items() if k not in own}, presets=_presets, where=where)
    # an explicit --lr beats a base learning rate that only a preset (or a weaker level) set
    if ("lr" in flags and "blr" not in flags) or ("lr" in conf and "blr" not in conf and "blr" not in flags):
        if cfg.blr is not None:
            notes.append(f"--lr {cfg.lr} given: the preset's --blr {cfg.blr} is not used")
            cfg.blr = None
    opts = None
    if cls.Options is not None:
        opts, more = resolve(cls.Options, split_flags, split_conf, where=where)
        notes += more
    return cfg, opts, notes


def train_to_json(cfg: TrainConfig, opts: Any = None) -> dict[str, Any]:
    """The resolved config as ``args.json`` holds it (the objective's options flat beside it)."""
    d = to_json(cfg)
    if opts is not None:
        d.update(to_json(opts))
    return d


#: optional features -> (import name, pyproject extra)
EXTRAS = {"xformers": ("xformers", "xformers"), "tensorboard": ("tensorboard", "tensorboard"),
          "wandb": ("wandb", "wandb")}


def require_extras(cfg: TrainConfig) -> None:
    """Fail before any work when a flag needs an optional package that is not installed."""
    import importlib.util

    wanted = [k for k, on in (("xformers", cfg.attn == "xformers"), ("tensorboard", cfg.tensorboard),
                              ("wandb", cfg.wandb)) if on]
    for k in wanted:
        module, extra = EXTRAS[k]
        if importlib.util.find_spec(module) is None:
            flag = "--attn xformers" if k == "xformers" else f"--{k}"
            raise OptionError(f"{flag} needs the {module} package: pip install 'irepa[{extra}]' (or drop {flag})")
