"""Vision encoders for the feature cache: a registry of REPA / iREPA encoder names on timm models.

Preprocessing follows REPA (``preprocess_raw_image``) for every encoder:
ADM-cropped uint8 image / 255, the encoder's own mean/std (timm ``pretrained_cfg``), then a
bicubic resize (``F.interpolate``, ``align_corners=False``, no antialias) to
``input_size = grid * patch_size`` where ``grid = resolution // 16`` is the SiT token grid:
256 px -> 16x16 tokens (DINOv2 /14 sees 224 px, /16 encoders see 256 px), 512 px -> 32x32
(448 px and 512 px). The timm model is built with ``img_size=input_size`` so absolute position
embeddings are resampled once at load time (timm's ``resample_abs_pos_embed``, bicubic +
antialias, the same call REPA makes on DINOv2) and RoPE grids match the input.

Outputs are timm's ``forward_features`` tokens (after the final norm where the model has one;
PE-spatial / PE-lang have none), with every prefix token (CLS and registers) removed, plus the
CLS token when the model has one (SigLIP, I-JEPA and PE-G have no CLS: ``cls`` is None).

Names not available in timm 1.0.31 (so not in the registry; a raw timm id still works):
``mocov3-vit-*`` (no timm weights), ``webssl-*`` (not in timm), ``sam2-vit-*`` (timm's SAM2 is a
hierarchical Hiera without a single patch grid).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import state_dict_sha256

__all__ = [
    "EncoderSpec",
    "ENCODERS",
    "TINY_CONFIG",
    "Encoder",
    "resolve_encoder",
    "load_encoder",
    "load_encoder_weights",
    "token_grid_for",
]

SIT_PATCH = 16  # image pixels per SiT token at every resolution (VAE /8 x SiT patch 2)
TINY_CONFIG: dict[str, Any] = dict(depth=2, embed_dim=64, num_heads=2)


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder: short name, timm id, patch size and prefix tokens (CLS + registers).

    ``mean``/``std`` come from timm's pretrained config of ``timm_id``.
    """

    name: str
    timm_id: str
    patch_size: int
    num_prefix_tokens: int
    family: str = ""
    # extra timm kwargs for config="tiny" where TINY_CONFIG alone does not build
    tiny_overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def pretrained_cfg(self):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(self.timm_id)
        if cfg is None:
            raise ValueError(f"encoder {self.name}: timm has no pretrained config for {self.timm_id!r}")
        return cfg

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self.pretrained_cfg.mean)  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self.pretrained_cfg.std)  # type: ignore[return-value]

    def input_size(self, resolution: int) -> int:
        """Encoder input side for images of ``resolution`` px: (resolution // 16) * patch."""
        return token_grid_for(resolution) * self.patch_size


def token_grid_for(resolution: int) -> int:
    """SiT token grid side for an image side: resolution / 16 (must divide exactly)."""
    if resolution <= 0 or resolution % SIT_PATCH:
        raise ValueError(f"image resolution {resolution} must be a positive multiple of {SIT_PATCH}")
    return resolution // SIT_PATCH


def _spec(name: str, timm_id: str, patch: int, prefix: int, family: str,
          **tiny: Any) -> EncoderSpec:
    return EncoderSpec(name, timm_id, patch, prefix, family, tuple(sorted(tiny.items())))


_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
_entries: list[EncoderSpec] = []
for _k, _v in _SIZES.items():
    # ViT-g uses a packed SwiGLU MLP that needs an even hidden width (64 * 5.33 is odd)
    _tiny = {"mlp_ratio": 5.0} if _k == "g" else {}
    _entries.append(_spec(f"dinov2-vit-{_k}", f"vit_{_v}_patch14_dinov2.lvd142m", 14, 1, "dinov2", **_tiny))
    _entries.append(_spec(f"dinov2-vit-{_k}-reg", f"vit_{_v}_patch14_reg4_dinov2.lvd142m", 14, 5, "dinov2",
                          **_tiny))
_entries += [
    # DINOv3 (timm Eva with RoPE): CLS + 4 registers
    _spec("dinov3-vit-s16", "vit_small_patch16_dinov3.lvd1689m", 16, 5, "dinov3"),
    _spec("dinov3-vit-s16plus", "vit_small_plus_patch16_dinov3.lvd1689m", 16, 5, "dinov3"),
    _spec("dinov3-vit-b16", "vit_base_patch16_dinov3.lvd1689m", 16, 5, "dinov3"),
    _spec("dinov3-vit-l16", "vit_large_patch16_dinov3.lvd1689m", 16, 5, "dinov3"),
    _spec("dinov3-vit-h16plus", "vit_huge_plus_patch16_dinov3.lvd1689m", 16, 5, "dinov3"),
    _spec("dinov3-vit-7b16", "vit_7b_patch16_dinov3.lvd1689m", 16, 5, "dinov3"),
    # DINO v1
    _spec("dino-vit-s", "vit_small_patch16_224.dino", 16, 1, "dino"),
    _spec("dino-vit-b", "vit_base_patch16_224.dino", 16, 1, "dino"),
    # SigLIP / SigLIP2: no CLS token (attention-pool head), all tokens are patches.
    # The 256 px /16 checkpoints give the SiT grid natively; so400m v1 exists only as /14.
    _spec("siglip-vit-b", "vit_base_patch16_siglip_256.webli", 16, 0, "siglip"),
    _spec("siglip-vit-l", "vit_large_patch16_siglip_256.webli", 16, 0, "siglip"),
    _spec("siglip-vit-so400m", "vit_so400m_patch14_siglip_224.webli", 14, 0, "siglip"),
    _spec("siglip2-vit-b", "vit_base_patch16_siglip_256.v2_webli", 16, 0, "siglip2"),
    _spec("siglip2-vit-l", "vit_large_patch16_siglip_256.v2_webli", 16, 0, "siglip2"),
    _spec("siglip2-vit-so400m", "vit_so400m_patch16_siglip_256.v2_webli", 16, 0, "siglip2"),
    _spec("siglip2-vit-g", "vit_giantopt_patch16_siglip_256.v2_webli", 16, 0, "siglip2"),
    # CLIP (OpenAI weights, as REPA's clip-vit-L)
    _spec("clip-vit-B", "vit_base_patch16_clip_224.openai", 16, 1, "clip"),
    _spec("clip-vit-L", "vit_large_patch14_clip_224.openai", 14, 1, "clip"),
    # MAE
    _spec("mae-vit-b", "vit_base_patch16_224.mae", 16, 1, "mae"),
    _spec("mae-vit-l", "vit_large_patch16_224.mae", 16, 1, "mae"),
    _spec("mae-vit-h", "vit_huge_patch14_224.mae", 14, 1, "mae"),
    # I-JEPA (ImageNet-1k ViT-H/14 as in REPA), no CLS
    _spec("jepa-vit-h", "vit_huge_patch14_gap_224.in1k_ijepa", 14, 0, "jepa"),
    # Perception Encoder: core (pe-), spatial (spatialpe-), language-aligned (langpe-)
    _spec("pe-vit-s", "vit_pe_core_small_patch16_384.fb", 16, 1, "pe"),
    _spec("pe-vit-b", "vit_pe_core_base_patch16_224.fb", 16, 1, "pe"),
    _spec("pe-vit-l", "vit_pe_core_large_patch14_336.fb", 14, 1, "pe"),
    _spec("pe-vit-g", "vit_pe_core_gigantic_patch14_448.fb", 14, 0, "pe"),
    _spec("spatialpe-vit-s", "vit_pe_spatial_small_patch16_512.fb", 16, 1, "spatialpe"),
    _spec("spatialpe-vit-b", "vit_pe_spatial_base_patch16_512.fb", 16, 1, "spatialpe"),
    _spec("spatialpe-vit-l", "vit_pe_spatial_large_patch14_448.fb", 14, 1, "spatialpe"),
    _spec("spatialpe-vit-g", "vit_pe_spatial_gigantic_patch14_448.fb", 14, 0, "spatialpe"),
    _spec("langpe-vit-l", "vit_pe_lang_large_patch14_448.fb", 14, 1, "langpe"),
    _spec("langpe-vit-g", "vit_pe_lang_gigantic_patch14_448.fb", 14, 0, "langpe"),
]
ENCODERS: dict[str, EncoderSpec] = {e.name: e for e in _entries}
# Short aliases used on the command line (DESIGN.md: "--encoder siglip").
ALIASES = {"siglip": "siglip-vit-b", "siglip2": "siglip2-vit-b", "dinov2": "dinov2-vit-b",
           "dinov3": "dinov3-vit-b16", "clip": "clip-vit-L", "mae": "mae-vit-l", "pe": "pe-vit-b"}
del _k, _v, _tiny, _entries


def _create(timm_id: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(timm_id, **kwargs)


def resolve_encoder(name: str) -> EncoderSpec:
    """Registry name, alias, or raw timm id -> EncoderSpec.

    A raw timm id (``vit_base_patch16_224.augreg_in21k``) gets its patch size and prefix
    token count from a meta-device instance (no memory, no download).
    """
    key = ALIASES.get(name, name)
    if key in ENCODERS:
        return ENCODERS[key]
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"unknown encoder {name!r}: not a registry name ({', '.join(sorted(ENCODERS))}) "
            "nor a timm model id (see timm.list_models())"
        )
    with torch.device("meta"):
        m = _create(name, pretrained=False, num_classes=0)
    patch = getattr(getattr(m, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise ValueError(f"encoder {name!r}: timm model {type(m).__name__} has no patch_embed; "
                         "only ViT-style encoders with a patch grid are supported")
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if patch[0] != patch[1]:
        raise ValueError(f"encoder {name!r}: non-square patches {patch} are not supported")
    return EncoderSpec(name, name, int(patch[0]), int(getattr(m, "num_prefix_tokens", 0)), "timm")


class Encoder(nn.Module):
    """A frozen timm ViT with REPA preprocessing built in.

    ``forward(uint8 images [B, 3, R, R]) -> (patch_tokens float32 [B, T, D], cls [B, D] | None)``
    with ``T = (R / 16) ** 2``. Attributes: ``name``, ``timm_id``, ``resolution``,
    ``token_grid`` (h, w), ``dim`` (D), ``input_size``, ``patch_size``, ``num_prefix_tokens``,
    ``mean``/``std``, ``has_cls``.
    """

    def __init__(self, model: nn.Module, spec: EncoderSpec, resolution: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.name = spec.name
        self.timm_id = spec.timm_id
        self.resolution = int(resolution)
        grid = token_grid_for(resolution)
        self.token_grid = (grid, grid)
        self.patch_size = spec.patch_size
        self.input_size = spec.input_size(resolution)
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.dim = int(model.embed_dim)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        self.has_cls = getattr(model, "cls_token", None) is not None and self.num_prefix_tokens > 0
        self._sha: str | None = None
        self._check_grid()

    def _check_grid(self) -> None:
        grid = tuple(getattr(self.model.patch_embed, "grid_size", self.token_grid))
        if grid != self.token_grid:
            raise ValueError(f"encoder {self.name}: model patch grid {grid} != expected {self.token_grid}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, R, R] -> normalised float [B, 3, input_size, input_size] (REPA order:
        /255, mean/std, bicubic resize), always in float32 on the model's device."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder {self.name}: expected uint8 images [B, 3, H, W], "
                             f"got {images.dtype} {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"encoder {self.name}: built for {self.resolution} px images, "
                             f"got {tuple(images.shape[-2:])}")
        device = next(self.model.parameters()).device
        x = images.to(device, torch.float32) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.input_size != self.resolution:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.preprocess(images)
        dtype = next(self.model.parameters()).dtype
        tokens = self.model.forward_features(x.to(dtype))
        t = self.token_grid[0] * self.token_grid[1]
        if tokens.shape[1] != self.num_prefix_tokens + t:
            raise RuntimeError(f"encoder {self.name}: got {tokens.shape[1]} tokens, expected "
                               f"{self.num_prefix_tokens} prefix + {t} patch tokens")
        patches = tokens[:, self.num_prefix_tokens:].float()
        cls = tokens[:, 0].float() if self.has_cls else None
        return patches, cls

    def weights_sha256(self) -> str:
        """Stable hash of the encoder weights (after position-embedding resampling); cached."""
        if self._sha is None:
            self._sha = state_dict_sha256(self.model)
        return self._sha

    def describe(self) -> dict[str, Any]:
        """The manifest's ``encoders[name]`` fields this module knows (the build adds
        ``feature_dtype`` and ``cls``)."""
        return {"timm_id": self.timm_id, "weights_sha256": self.weights_sha256(),
                "token_grid": list(self.token_grid), "dim": self.dim, "input_size": self.input_size}

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, timm_id={self.timm_id!r}, resolution={self.resolution}, "
                f"input_size={self.input_size}, token_grid={self.token_grid}, dim={self.dim})")


_WRAPPER_KEYS = ("state_dict", "model", "module", "teacher", "target_encoder")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "teacher.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"encoder weights {path}: cannot read as safetensors or a torch state dict "
                         f"with weights_only=True: {type(exc).__name__}: {exc}") from exc
    # unwrap {"model": {...}} style checkpoints
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"encoder weights {path}: no state dict found (top-level type {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_encoder_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local checkpoint into a timm model, strictly.

    Accepts safetensors or a torch state dict (read with ``weights_only=True``), unwraps
    ``{"model"|"state_dict"|...: {...}}``, strips a prefix shared by all keys (``module.``,
    ``_orig_mod.``, ``model.``, ``backbone.``, ``encoder.``, ``teacher.``), runs timm's own
    ``checkpoint_filter_fn`` for the model class (converts original DINOv2 / OpenAI CLIP / PE
    layouts, resamples position embeddings to the model's grid), drops classifier ``head.*``
    keys the feature model does not have, then ``load_state_dict(strict=True)``.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"encoder weights {p}: file not found")
    sd = _read_state_dict(p)
    changed = True
    while changed and sd:
        changed = False
        for pre in _STRIP_PREFIXES:
            if all(k.startswith(pre) for k in sd):
                sd = {k[len(pre):]: v for k, v in sd.items()}
                changed = True
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        sd = filt(sd, model)
    own = model.state_dict()
    if not any(k.startswith("head.") for k in own):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(sd) & set(own)) if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape_bad:
        def _fmt(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        if shape_bad:
            parts.append(f"shape mismatches: {_fmt(shape_bad)}")
        raise ValueError(f"encoder weights {p} do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def load_encoder(name: str, resolution: int = 256, pretrained: bool = True,
                 weights: str | os.PathLike | None = None,
                 config: str | Mapping[str, Any] | None = None, *, seed: int = 0,
                 device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> Encoder:
    """Build an :class:`Encoder` for images of ``resolution`` px.

    * ``pretrained=True``: timm downloads / reads its hub cache (``timm.create_model(...,
      pretrained=True)``); position embeddings are resampled to ``input_size``.
    * ``weights=PATH``: random init, then ``load_encoder_weights`` (no network).
    * ``config="tiny"``: the same timm class with depth 2, width 64, 2 heads, randomly
      initialised from ``seed`` (never downloads; ``pretrained`` is ignored). Patch size and
      prefix tokens are unchanged, so token grids are the real ones. ``config`` may also be a
      dict of extra ``timm.create_model`` keyword arguments.
    """
    spec = resolve_encoder(name)
    input_size = spec.input_size(resolution)
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=input_size)
    tiny = isinstance(config, str)
    if tiny:
        if config != "tiny":
            raise ValueError(f"encoder {name}: unknown config {config!r} (expected 'tiny' or a dict)")
        kwargs.update(TINY_CONFIG)
        kwargs.update(dict(spec.tiny_overrides))
    elif config is not None:
        kwargs.update(dict(config))
    use_pretrained = bool(pretrained) and weights is None and not tiny
    if use_pretrained:
        try:
            model = _create(spec.timm_id, pretrained=True, **kwargs)
        except Exception as exc:
            raise RuntimeError(
                f"could not load pretrained encoder {spec.name!r} (timm {spec.timm_id}): "
                f"{type(exc).__name__}: {exc}. Offline? Fill the hub cache on a connected machine "
                "or pass weights=PATH (safetensors / state dict)."
            ) from exc
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(spec.timm_id, pretrained=False, **kwargs)
        if weights is not None:
            load_encoder_weights(model, weights)
    patch = model.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    if (int(patch), prefix) != (spec.patch_size, spec.num_prefix_tokens):
        raise ValueError(f"encoder {spec.name}: registry says patch {spec.patch_size} / "
                         f"{spec.num_prefix_tokens} prefix tokens, timm built patch {patch} / {prefix}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean") or spec.mean)
    std = tuple(cfg.get("std") or spec.std)
    enc = Encoder(model, spec, resolution, mean, std)
    if dtype is not None or device is not None:
        enc = enc.to(device=device, dtype=dtype)
    return enc
