"""Vision encoders for the feature cache: the registry of REPA / iREPA encoder names on timm models.

Every entry is built with timm (ViT, Eva, HieraDet classes) and has two preprocessing profiles
(see :mod:`irepa.pipeline.encoder_profiles` and docs/ENCODERS.md):

* ``preprocess="irepa"`` (default): what the official iREPA release (``ldm/vision_encoder.py``)
  feeds the alignment loss: its normalisation constants and resize order / mode, its position-
  embedding resampling and RoPE grid, its choice of tokens (before or after the final norm,
  prefix tokens dropped) and activation variant (OpenAI CLIP's QuickGELU).
* ``preprocess="native"``: the encoder's own timm config (the behaviour before profiles existed):
  ``/ 255``, timm mean/std, bicubic resize without antialias, timm's ``forward_features``.

Either way the image side ``R`` maps to the SiT token grid ``R / 16`` (16x16 at 256 px, 32x32 at
512 px): ViT/14 encoders see ``14 * R / 16`` px, ViT/16 ``R`` px, SAM2's Hiera (stride 32) ``2 R``.
Outputs are patch tokens ``[B, T, D]`` (prefix tokens dropped) and the CLS token where the profile
has one.

Names: registry names follow the official release (``dinov2-vit-b``, ``pe-vit-bnorm``,
``webssl-vit-dino1b_full2b_224``); the official spellings that differ are aliases
(``dinov2reg-vit-b`` -> ``dinov2-vit-b-reg``, :func:`canonical_encoder_name`). ``dinov2mixed`` is
not a second cache: build ``dinov2-vit-*`` with ``--cls`` and apply :func:`feature_transform`.
A raw timm model id (``vit_base_patch16_224.augreg_in21k``) also works, with the native profile.
Not built here (not among the paper's encoders, or no timm architecture): SAM v1, SIFT, HOG, VGG.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .encoder_profiles import (
    FAMILY_RULES, IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_THEN_RESIZE, PROFILES,
    PosEmbedRule, Profile, preprocess_images, resample_pos_embed,
)
from .encoder_weights import PREFERRED_KEYS, load_encoder_weights, load_state_dict_strict, read_checkpoint
from .vae import state_dict_sha256

__all__ = [
    "EncoderSpec",
    "ENCODERS",
    "ALIASES",
    "TINY_CONFIG",
    "Encoder",
    "canonical_encoder_name",
    "resolve_encoder",
    "resolve_profile",
    "load_encoder",
    "load_encoder_weights",
    "feature_transform",
    "feature_transform_name",
    "FEATURE_TRANSFORMS",
    "token_grid_for",
]

SIT_PATCH = 16  # image pixels per SiT token at every resolution (VAE /8 x SiT patch 2)
TINY_CONFIG: dict[str, Any] = dict(depth=2, embed_dim=64, num_heads=2)
# HieraDet has stages instead of depth; 8 * 2**3 = 64 channels at the last stage; the global-attention
# block must not be a stage's first (q-pooling) block
TINY_HIERA: dict[str, Any] = dict(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                                  window_spec=(8, 4, 4, 2), global_pos_size=(7, 7))


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder: registry name, timm id, token stride and prefix tokens (CLS + registers).

    ``family`` selects the official formula (:data:`FAMILY_RULES`). ``irepa_timm_id``: the timm
    variant the official weights need (OpenAI CLIP: QuickGELU). ``arch``: timm kwargs that define
    the architecture when the timm id alone does not (MoCo v3 ViT-S heads, WebSSL widths).
    ``weights``: ``"timm"`` (timm's pretrained tag), ``"local"`` (``--weights`` only) or
    ``"hf:<repo>"`` (a Hugging Face repo in the original layout, converted at load).
    ``native_size``: image size the released checkpoint's position embedding is laid out for,
    where timm's pretrained config does not say it. ``final_norm``: overrides the family rule
    (PE ``...norm`` names). ``mean``/``std``: the native constants where timm's config is not the
    checkpoint's (non-timm weights).
    """

    name: str
    timm_id: str
    patch_size: int
    num_prefix_tokens: int
    family: str = ""
    tiny_overrides: tuple[tuple[str, Any], ...] = ()
    irepa_timm_id: str | None = None
    arch: tuple[tuple[str, Any], ...] = ()
    weights: str = "timm"
    native_size: int | None = None
    final_norm: bool | None = None
    official: bool = True
    native_mean: tuple[float, float, float] | None = None
    native_std: tuple[float, float, float] | None = None

    @property
    def pretrained_cfg(self):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(self.timm_id)
        if cfg is None:
            raise ValueError(f"encoder {self.name}: timm has no pretrained config for {self.timm_id!r}")
        return cfg

    @property
    def mean(self) -> tuple[float, float, float]:
        """Native mean (timm's config of ``timm_id``, or the checkpoint's own)."""
        return self.native_mean or tuple(float(x) for x in self.pretrained_cfg.mean)  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return self.native_std or tuple(float(x) for x in self.pretrained_cfg.std)  # type: ignore[return-value]

    @property
    def hierarchical(self) -> bool:
        return self.family == "sam2"

    def input_size(self, resolution: int) -> int:
        """Encoder input side for images of ``resolution`` px: (resolution // 16) * stride."""
        return token_grid_for(resolution) * self.patch_size

    def checkpoint_size(self) -> int:
        """Image side the released weights' position embedding is laid out for."""
        if self.native_size:
            return self.native_size
        return int(self.pretrained_cfg.input_size[-1])


def token_grid_for(resolution: int) -> int:
    """SiT token grid side for an image side: resolution / 16 (must divide exactly)."""
    if resolution <= 0 or resolution % SIT_PATCH:
        raise ValueError(f"image resolution {resolution} must be a positive multiple of {SIT_PATCH}")
    return resolution // SIT_PATCH


def _spec(name: str, timm_id: str, patch: int, prefix: int, family: str, tiny: Mapping[str, Any] | None = None,
          **kw: Any) -> EncoderSpec:
    return EncoderSpec(name, timm_id, patch, prefix, family, tuple(sorted((tiny or {}).items())), **kw)


def _swiglu_ratio(dim: int) -> float:
    """mlp_ratio for timm's packed SwiGLU equal to DINOv2's SwiGLUFFNFused hidden width
    ((int(4 D * 2 / 3) + 7) // 8 * 8 per half); + 0.5 so int(D * ratio) lands on it exactly."""
    half = (int(4 * dim * 2 / 3) + 7) // 8 * 8
    return (2 * half + 0.5) / dim


def _webssl(config: str, dim: int, depth: int, heads: int) -> EncoderSpec:
    from timm.layers import SwiGLUPacked

    return _spec(f"webssl-vit-{config}", "vit_giant_patch14_dinov2", 14, 1, "webssl",
                 tiny={"mlp_ratio": _swiglu_ratio(64)},
                 arch=(("embed_dim", dim), ("depth", depth), ("num_heads", heads), ("mlp_ratio", _swiglu_ratio(dim)),
                       ("init_values", 1e-5), ("mlp_layer", SwiGLUPacked), ("act_layer", nn.SiLU)),
                 weights=f"hf:facebook/webssl-{config.replace('_', '-')}", native_size=224,
                 native_mean=IMAGENET_MEAN, native_std=IMAGENET_STD)


_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
_entries: list[EncoderSpec] = []
for _k, _v in _SIZES.items():
    # ViT-g uses a packed SwiGLU MLP that needs an even hidden width (64 * 5.33 is odd)
    _tiny = {"mlp_ratio": 5.0} if _k == "g" else {}
    _entries.append(_spec(f"dinov2-vit-{_k}", f"vit_{_v}_patch14_dinov2.lvd142m", 14, 1, "dinov2", _tiny))
    _entries.append(_spec(f"dinov2-vit-{_k}-reg", f"vit_{_v}_patch14_reg4_dinov2.lvd142m", 14, 5, "dinov2", _tiny))
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
    _spec("siglip-vit-b", "vit_base_patch16_siglip_256.webli", 16, 0, "siglip"),
    _spec("siglip-vit-l", "vit_large_patch16_siglip_256.webli", 16, 0, "siglip"),
    _spec("siglip-vit-so400m", "vit_so400m_patch14_siglip_224.webli", 14, 0, "siglip"),
    _spec("siglip2-vit-b", "vit_base_patch16_siglip_256.v2_webli", 16, 0, "siglip2"),
    _spec("siglip2-vit-l", "vit_large_patch16_siglip_256.v2_webli", 16, 0, "siglip2"),
    _spec("siglip2-vit-so400m", "vit_so400m_patch16_siglip_256.v2_webli", 16, 0, "siglip2"),
    _spec("siglip2-vit-g", "vit_giantopt_patch16_siglip_256.v2_webli", 16, 0, "siglip2"),
    # CLIP, OpenAI weights: the irepa profile uses timm's QuickGELU variant the weights were trained with
    _spec("clip-vit-B", "vit_base_patch16_clip_224.openai", 16, 1, "clip",
          irepa_timm_id="vit_base_patch16_clip_quickgelu_224.openai", official=False),
    _spec("clip-vit-L", "vit_large_patch14_clip_224.openai", 14, 1, "clip",
          irepa_timm_id="vit_large_patch14_clip_quickgelu_224.openai"),
    # MoCo v3 (timm ViT, MoCo's ViT-S has 12 heads); weights only from the release (--weights)
    _spec("mocov3-vit-s", "vit_small_patch16_224", 16, 1, "mocov3", arch=(("num_heads", 12),), weights="local",
          native_size=224, native_mean=IMAGENET_MEAN, native_std=IMAGENET_STD),
    _spec("mocov3-vit-b", "vit_base_patch16_224", 16, 1, "mocov3", weights="local",
          native_size=224, native_mean=IMAGENET_MEAN, native_std=IMAGENET_STD),
    _spec("mocov3-vit-l", "vit_large_patch16_224", 16, 1, "mocov3", weights="local",
          native_size=224, native_mean=IMAGENET_MEAN, native_std=IMAGENET_STD),
    # MAE (the official code builds ViT-L/16 only)
    _spec("mae-vit-b", "vit_base_patch16_224.mae", 16, 1, "mae", official=False),
    _spec("mae-vit-l", "vit_large_patch16_224.mae", 16, 1, "mae"),
    _spec("mae-vit-h", "vit_huge_patch14_224.mae", 14, 1, "mae", official=False),
    # I-JEPA (ImageNet-1k ViT-H/14 as in REPA), no CLS
    _spec("jepa-vit-h", "vit_huge_patch14_gap_224.in1k_ijepa", 14, 0, "jepa"),
    # WebSSL Web-DINO (DINOv2 ViTs with SwiGLU and layer scale), weights from Hugging Face
    _webssl("dino300m_full2b_224", 1024, 24, 16),
    _webssl("dino1b_full2b_224", 1536, 40, 24),
    _webssl("dino2b_full2b_224", 2688, 24, 21),
    _webssl("dino3b_full2b_224", 3072, 26, 24),
    _webssl("dino5b_full2b_224", 3584, 32, 28),
    _webssl("dino7b_full8b_224", 4096, 32, 32),
    # Perception Encoder: core (pe-), spatial (spatialpe-), language-aligned (langpe-)
    _spec("pe-vit-t", "vit_pe_core_tiny_patch16_384.fb", 16, 1, "pe"),
    _spec("pe-vit-s", "vit_pe_core_small_patch16_384.fb", 16, 1, "pe"),
    _spec("pe-vit-b", "vit_pe_core_base_patch16_224.fb", 16, 1, "pe"),
    _spec("pe-vit-l", "vit_pe_core_large_patch14_336.fb", 14, 1, "pe"),
    _spec("pe-vit-g", "vit_pe_core_gigantic_patch14_448.fb", 14, 0, "pe"),
    _spec("spatialpe-vit-s", "vit_pe_spatial_small_patch16_512.fb", 16, 1, "spatialpe", official=False),
    _spec("spatialpe-vit-b", "vit_pe_spatial_base_patch16_512.fb", 16, 1, "spatialpe"),
    _spec("spatialpe-vit-l", "vit_pe_spatial_large_patch14_448.fb", 14, 1, "spatialpe"),
    _spec("spatialpe-vit-g", "vit_pe_spatial_gigantic_patch14_448.fb", 14, 0, "spatialpe"),
    _spec("langpe-vit-l", "vit_pe_lang_large_patch14_448.fb", 14, 1, "langpe"),
    _spec("langpe-vit-g", "vit_pe_lang_gigantic_patch14_448.fb", 14, 0, "langpe"),
    # C-RADIOv3: CLS + 7 more summary/register tokens
    _spec("cradio-vit-b", "vit_base_patch16_radio_v3.c_radio", 16, 8, "cradio"),
    _spec("cradio-vit-l", "vit_large_patch16_radio_v3.c_radio", 16, 8, "cradio"),
    _spec("cradio-vit-h", "vit_huge_patch16_radio_v3.c_radio", 16, 8, "cradio"),
    _spec("cradio-vit-g", "vit_giant_patch16_radio_v3.c_radio", 16, 8, "cradio"),
    # SAM2 (SAM 2.0) Hiera trunks: the last stage (stride 32) is the token grid
    _spec("sam2-vit-s", "sam2_hiera_small.fb_r896", 32, 0, "sam2"),
    _spec("sam2-vit-b", "sam2_hiera_base_plus.fb_r896", 32, 0, "sam2"),
    _spec("sam2-vit-l", "sam2_hiera_large.fb_r1024", 32, 0, "sam2"),
]
# PE core with ln_post (the official '...norm' names); spatial/lang PE have no ln_post (aliases below)
_entries += [
    EncoderSpec(f"{e.name}norm", e.timm_id, e.patch_size, e.num_prefix_tokens, e.family, e.tiny_overrides,
                final_norm=True)
    for e in list(_entries) if e.family == "pe"
]
ENCODERS: dict[str, EncoderSpec] = {e.name: e for e in _entries}

# Aliases: short names used on the command line (DESIGN.md: "--encoder siglip") and the official
# release's spellings that differ from the registry names.
ALIASES: dict[str, str] = {
    "siglip": "siglip-vit-b", "siglip2": "siglip2-vit-b", "dinov2": "dinov2-vit-b", "dinov3": "dinov3-vit-b16",
    "clip": "clip-vit-L", "mae": "mae-vit-l", "pe": "pe-vit-b", "dino": "dino-vit-b", "jepa": "jepa-vit-h",
    "mocov3": "mocov3-vit-b", "cradio": "cradio-vit-b", "sam2": "sam2-vit-b", "spatialpe": "spatialpe-vit-b",
    "langpe": "langpe-vit-l", "webssl": "webssl-vit-dino300m_full2b_224",
    "clip-vit-l": "clip-vit-L", "clip-vit-b": "clip-vit-B",
}
# official dinov2mixed names: the dinov2 cache (with --cls) plus the 'dinov2mixed' feature transform
MIXED: dict[str, str] = {}
for _k in _SIZES:
    ALIASES[f"dinov2reg-vit-{_k}"] = f"dinov2-vit-{_k}-reg"
    ALIASES[f"dinov2mixed-vit-{_k}"] = MIXED[f"dinov2mixed-vit-{_k}"] = f"dinov2-vit-{_k}"
    ALIASES[f"dinov2mixedreg-vit-{_k}"] = MIXED[f"dinov2mixedreg-vit-{_k}"] = f"dinov2-vit-{_k}-reg"
for _e in _entries:
    if _e.family in ("spatialpe", "langpe"):
        ALIASES[f"{_e.name}norm"] = _e.name  # no ln_post in these models: '...norm' is the same encoder
del _k, _v, _tiny, _entries, _e


# --------------------------------------------------------------------------------------- names


def _suggest(name: str) -> str:
    pool = sorted(set(ENCODERS) | set(ALIASES))
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
    if not close:
        low = name.lower()
        close = [n for n in pool if low and (low in n.lower() or n.lower() in low)][:5]
    return f"did you mean {', '.join(close)}? " if close else ""


def _lookup(name: str) -> str | None:
    if name in ENCODERS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    low = {k.lower(): k for k in ENCODERS}
    if name.lower() in low:
        return low[name.lower()]
    lowa = {k.lower(): v for k, v in ALIASES.items()}
    return lowa.get(name.lower())


def canonical_encoder_name(name: str) -> str:
    """Registry name for a registry name, an alias or an official name (``dinov2reg-vit-b`` ->
    ``dinov2-vit-b-reg``; ``dinov2mixed-vit-b`` -> ``dinov2-vit-b``, see :func:`feature_transform`).
    A raw timm model id is returned as it is. Anything else: ValueError naming the closest names."""
    key = _lookup(name)
    if key is not None:
        return key
    import timm

    if timm.is_model(name):
        return name
    raise ValueError(
        f"unknown encoder {name!r}: {_suggest(name)}"
        "(registry names and aliases: docs/ENCODERS.md; a timm model id from timm.list_models() also works)"
    )


def resolve_encoder(name: str) -> EncoderSpec:
    """Registry name, alias, or raw timm id -> EncoderSpec.

    A raw timm id (``vit_base_patch16_224.augreg_in21k``) gets its patch size and prefix
    token count from a meta-device instance (no memory, no download).
    """
    key = canonical_encoder_name(name)
    if key in ENCODERS:
        return ENCODERS[key]
    with torch.device("meta"):
        m = _create(key, pretrained=False, num_classes=0)
    patch = getattr(getattr(m, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise ValueError(f"encoder {name!r}: timm model {type(m).__name__} has no patch_embed; "
                         "only ViT-style encoders with a patch grid are supported")
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if patch[0] != patch[1]:
        raise ValueError(f"encoder {name!r}: non-square patches {patch} are not supported")
    return EncoderSpec(key, key, int(patch[0]), int(getattr(m, "num_prefix_tokens", 0)), "timm")


# ---------------------------------------------------------------------------- feature transforms


def _identity(patches: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
    return patches


def dinov2_mixed(patches: torch.Tensor, cls: torch.Tensor | None, alpha: float = 0.1) -> torch.Tensor:
    """The official ``DINOv2MixedEncoder``: ``cls[:, None] * alpha + patches * (1 - alpha)``."""
    if cls is None:
        raise ValueError("feature transform 'dinov2mixed' needs the CLS token: build the store with --cls")
    if cls.ndim != 2 or patches.ndim != 3 or cls.shape[0] != patches.shape[0] or cls.shape[-1] != patches.shape[-1]:
        raise ValueError(f"feature transform 'dinov2mixed': CLS {tuple(cls.shape)} does not fit patch tokens "
                         f"{tuple(patches.shape)} ([B, D] and [B, T, D])")
    return cls[:, None, :] * alpha + patches * (1 - alpha)


FEATURE_TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {"none": _identity, "dinov2mixed": dinov2_mixed}


def feature_transform_name(encoder: str) -> str:
    """``"dinov2mixed"`` for the official mixed names (``dinov2mixed-vit-b``, ``dinov2mixedreg-vit-l``),
    else ``"none"``."""
    return "dinov2mixed" if encoder in MIXED or encoder.lower() in MIXED else "none"


def feature_transform(name: str) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A function ``(patches [B, T, D], cls [B, D] | None) -> [B, T, D]`` applied to cached tokens.

    ``name`` is a transform (``"none"``, ``"dinov2mixed"``) or an encoder name as the user typed it
    (the official ``dinov2mixed-vit-b`` selects ``dinov2mixed``, other encoders ``"none"``).
    ``dinov2mixed`` needs a store built with ``--cls``: ``irepa-cache build --encoder dinov2-vit-b --cls``
    caches CLS and patch tokens once; the trainer mixes them (0.1 CLS + 0.9 patch, as the official
    code) when it reads them.
    """
    if name in FEATURE_TRANSFORMS:
        return FEATURE_TRANSFORMS[name]
    kind = feature_transform_name(name)
    if kind == "none":
        canonical_encoder_name(name)  # an unknown name is an error, not a silent identity
    return FEATURE_TRANSFORMS[kind]


# ------------------------------------------------------------------------------------ profiles


def _create(timm_id: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(timm_id, **kwargs)


def _activation(model: nn.Module) -> str:
    try:
        blk = model.blocks[0]
        mlp = blk.mlp
        act = getattr(mlp, "act", None)
        name = type(act).__name__ if act is not None else type(mlp).__name__
        return {"QuickGELU": "quick_gelu", "GELU": "gelu", "SiLU": "swiglu (silu)"}.get(name, name)
    except Exception:
        return "unknown"


def _has_final_norm(model: nn.Module) -> bool:
    norm = getattr(model, "norm", None)
    return norm is not None and not isinstance(norm, nn.Identity)


def resolve_profile(spec: EncoderSpec, resolution: int, profile: str = "irepa",
                    model: nn.Module | None = None) -> Profile:
    """Every preprocessing / token-selection field of ``spec`` at ``resolution`` under ``profile``.

    ``model`` (the built timm model) fills the fields only the model knows (activation, whether
    it has a final norm / CLS token); without it they come from the registry."""
    if profile not in PROFILES:
        raise ValueError(f"unknown preprocessing profile {profile!r}: expected one of {', '.join(PROFILES)}")
    grid = token_grid_for(resolution)
    input_size = spec.input_size(resolution)
    rule = FAMILY_RULES.get(spec.family)
    notes: tuple[str, ...] = ()
    if profile == "irepa" and rule is None:
        notes = ("raw timm id: the official release has no formula for it; the native profile is used",)
        profile = "native"
    model_norm = _has_final_norm(model) if model is not None else True
    model_cls = (getattr(model, "cls_token", None) is not None) if model is not None else spec.num_prefix_tokens > 0
    act = _activation(model) if model is not None else ""
    pos_at = "none" if spec.family == "dinov3" else ("runtime" if spec.hierarchical else "load")
    if profile == "irepa":
        assert rule is not None
        pe = rule.pos_embed
        load_size = _irepa_load_size(spec, rule, input_size)
        pos = {"at": pe.at, "mode": pe.mode, "antialias": pe.antialias, "align_corners": pe.align_corners,
               "to_grid": [grid, grid]}
        if pe.at == "load":
            pos["from_grid"] = [load_size // spec.patch_size] * 2
            if pe.via_load_grid:
                pos["from_checkpoint_grid"] = "resampled to the 256-px grid at load (bicubic + antialias) first"
            if pe.scale_offset:
                pos["scale_offset"] = pe.scale_offset
        rope = None
        if rule.rope == "integer":
            offset = 1 if spec.num_prefix_tokens else 0
            rope = {"type": "axial 2D (PE Rope2D)", "positions": f"integer {offset}..{grid - 1 + offset}",
                    "cls_position": 0 if spec.num_prefix_tokens else None}
        elif rule.rope == "dinov3":
            rope = {"type": "dinov3", "positions": "patch centres normalised to [-1, 1] (timm = DINOv3)"}
        final_norm = spec.final_norm if spec.final_norm is not None else rule.final_norm
        if resolution not in rule.official_resolutions or not spec.official:
            notes = rule.notes + (("not run by the official code: the family's formula is applied",)
                                  if not spec.official else ())
        else:
            notes = ()
        return Profile(
            profile="irepa", rule=rule.source,
            timm_id=spec.irepa_timm_id or spec.timm_id, resolution=resolution, input_size=input_size,
            mean=rule.mean, std=rule.std, order=rule.order, interpolation=rule.interpolation,
            antialias=rule.antialias, align_corners=False, pos_embed=pos, rope=rope,
            final_norm=bool(final_norm and model_norm), prefix_tokens_dropped=spec.num_prefix_tokens,
            cls=bool(rule.cls and model_cls and spec.num_prefix_tokens > 0),
            activation=act or ("quick_gelu" if spec.family == "clip" else ""), checkpoint=rule.checkpoint,
            notes=notes,
        )
    # native: timm's own config
    mean, std, interp = spec.mean, spec.std, "bicubic"
    if spec.family == "timm" or spec.native_mean is None:
        try:
            cfg = spec.pretrained_cfg
            interp = str(cfg.interpolation or "bicubic")
        except ValueError:
            pass
    if model is not None and spec.native_mean is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = tuple(float(x) for x in (cfg.get("mean") or mean))
        std = tuple(float(x) for x in (cfg.get("std") or std))
        interp = str(cfg.get("interpolation") or interp)
    radio = spec.family == "cradio"
    pos = {"at": pos_at, "mode": "bilinear" if radio else "bicubic", "antialias": not radio,
           "align_corners": None, "to_grid": [grid, grid]}
    if pos_at == "load":
        try:
            pos["from_grid"] = [spec.checkpoint_size() // spec.patch_size] * 2
        except ValueError:
            pass
    if radio:
        pos["align_corners"] = "timm's per-variant choice (True for B/H v3)"
    rope = None
    if spec.family in ("pe", "spatialpe", "langpe"):
        ref = getattr(getattr(model, "rope", None), "ref_feat_shape", None) if model is not None else None
        rope = {"type": "axial 2D (timm)", "positions": "rescaled to the pretraining grid",
                "ref_feat_shape": list(ref) if ref is not None else None}
    elif spec.family == "dinov3":
        rope = {"type": "dinov3", "positions": "patch centres normalised to [-1, 1]"}
    return Profile(
        profile="native", rule=f"timm pretrained_cfg of {spec.timm_id}", timm_id=spec.timm_id,
        resolution=resolution, input_size=input_size, mean=mean, std=std, order=NORMALIZE_THEN_RESIZE,
        interpolation=interp, antialias=False, align_corners=False, pos_embed=pos, rope=rope,
        final_norm=model_norm if model is not None else True, prefix_tokens_dropped=spec.num_prefix_tokens,
        cls=bool(model_cls and spec.num_prefix_tokens > 0), activation=act, notes=notes,
    )


def _irepa_load_size(spec: EncoderSpec, rule, input_size: int) -> int:
    """Image size the irepa profile loads the weights at before resampling to ``input_size``."""
    pe: PosEmbedRule = rule.pos_embed
    if pe.at != "load":
        return input_size
    if pe.via_load_grid:
        return 16 * spec.patch_size  # the official code builds these at img_size 256 (16x16)
    return spec.checkpoint_size()


# ------------------------------------------------------------------------------------- encoder


class Encoder(nn.Module):
    """A frozen timm encoder with its preprocessing profile built in.

    ``forward(uint8 images [B, 3, R, R]) -> (patch_tokens float32 [B, T, D], cls [B, D] | None)``
    with ``T = (R / 16) ** 2``. Attributes: ``name``, ``timm_id``, ``resolution``,
    ``token_grid`` (h, w), ``dim`` (D), ``input_size``, ``patch_size``, ``num_prefix_tokens``,
    ``mean``/``std``, ``has_cls``, ``profile`` (the resolved :class:`Profile`).
    """

    def __init__(self, model: nn.Module, spec: EncoderSpec, resolution: int, profile: Profile):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.name = spec.name
        self.profile = profile
        self.timm_id = profile.timm_id
        self.resolution = int(resolution)
        grid = token_grid_for(resolution)
        self.token_grid = (grid, grid)
        self.patch_size = spec.patch_size
        self.input_size = profile.input_size
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.dim = int(getattr(model, "embed_dim", 0) or model.num_features)
        self.mean = tuple(float(x) for x in profile.mean)
        self.std = tuple(float(x) for x in profile.std)
        self.has_cls = profile.cls
        self._sha: str | None = None
        self._check_grid()

    def _check_grid(self) -> None:
        if self.spec.hierarchical:
            return
        grid = tuple(getattr(self.model.patch_embed, "grid_size", self.token_grid))
        if grid != self.token_grid:
            raise ValueError(f"encoder {self.name}: model patch grid {grid} != expected {self.token_grid}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, R, R] -> normalised float32 [B, 3, input_size, input_size] on the model's
        device, in the profile's order (see :func:`encoder_profiles.preprocess_images`)."""
        device = next(self.model.parameters()).device
        return preprocess_images(images, self.profile, device, who=self.name)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All T patch tokens and the CLS token (or None), taken as the profile says."""
        m, npt = self.model, self.num_prefix_tokens
        if self.spec.hierarchical:
            out = m.forward_features(x)  # [B, H, W, C]
            return out.reshape(out.shape[0], -1, out.shape[-1]), None
        if self.profile.final_norm or not _has_final_norm(m):
            tokens = m.forward_features(x)
            patches, prefix = tokens[:, npt:], tokens[:, :npt]
        else:  # the last block's output, before the final norm
            out = m.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=npt > 0)[0]
            patches, prefix = out if npt else (out, None)
        cls = prefix[:, 0] if (self.has_cls and prefix is not None) else None
        return patches, cls

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.preprocess(images)
        dtype = next(self.model.parameters()).dtype
        patches, cls = self._tokens(x.to(dtype))
        t = self.token_grid[0] * self.token_grid[1]
        if patches.shape[1] != t:
            raise RuntimeError(f"encoder {self.name}: got {patches.shape[1]} patch tokens, expected {t} "
                               f"({self.token_grid[0]}x{self.token_grid[1]})")
        return patches.float(), (cls.float() if cls is not None else None)

    def weights_sha256(self) -> str:
        """Stable hash of the encoder weights (after position-embedding resampling); cached."""
        if self._sha is None:
            self._sha = state_dict_sha256(self.model)
        return self._sha

    def describe(self) -> dict[str, Any]:
        """The manifest's ``encoders[name]`` fields this module knows (the build adds
        ``feature_dtype``, ``cls`` and ``precision``)."""
        return {"timm_id": self.timm_id, "weights_sha256": self.weights_sha256(),
                "token_grid": list(self.token_grid), "dim": self.dim, "input_size": self.input_size,
                "preprocess": self.profile.to_dict()}

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, timm_id={self.timm_id!r}, resolution={self.resolution}, "
                f"input_size={self.input_size}, token_grid={self.token_grid}, dim={self.dim}, "
                f"preprocess={self.profile.profile!r})")


# ------------------------------------------------------------------------------------- loading


def _require_pretrained(spec: EncoderSpec, timm_id: str) -> None:
    """One line, within seconds, when the pretrained weights are neither cached nor downloadable."""
    from .hub import hf_cached, require_available, torch_hub_cached

    files = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    if spec.weights.startswith("hf:"):
        repo, cached = spec.weights[3:], hf_cached(spec.weights[3:], files)
    else:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(timm_id)
        repo = (cfg.hf_hub_id if cfg is not None else None) or timm_id
        cached = bool(cfg is not None and ((cfg.hf_hub_id and hf_cached(cfg.hf_hub_id, files))
                                           or (cfg.url and torch_hub_cached(cfg.url))))
    require_available(f"encoder {spec.name} ({repo})", cached,
                      f"pass --weights {spec.name}=PATH (a local safetensors / state-dict file, see docs/ENCODERS.md)")


def _hf_state_dict(repo: str) -> dict[str, torch.Tensor]:
    """A Hugging Face repo's weights (model.safetensors, or its sharded index) from the hub cache."""
    import json

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return read_checkpoint(hf_hub_download(repo, "model.safetensors"))
    except EntryNotFoundError:
        index = json.loads(open(hf_hub_download(repo, "model.safetensors.index.json")).read())
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(read_checkpoint(hf_hub_download(repo, shard)))
        return sd


def _check_timm_has(spec: EncoderSpec) -> None:
    import timm

    for tid in {spec.timm_id, spec.irepa_timm_id} - {None}:
        if not timm.is_model(tid):
            raise ValueError(f"encoder {spec.name}: this timm ({timm.__version__}) has no model {tid!r}; "
                             "irepa's registry is tested with timm 1.0.31: pip install -U 'timm>=1.0.31'")


def _file_pos_grid(sd: Mapping[str, torch.Tensor]) -> int | None:
    """Side of the square position-embedding grid stored in a checkpoint (any layout), or None."""
    for k, v in sd.items():
        if k.rsplit(".", 1)[-1] in ("pos_embed", "positional_embedding", "position_embeddings") and v.ndim >= 2:
            n = int(v.shape[-2])
            for prefix in (0, 1, 5, 8):
                g = math.isqrt(max(n - prefix, 0))
                if g > 0 and g * g == n - prefix:
                    return g
    return None


def _integer_rope(model: nn.Module) -> None:
    """PE's Rope2D: positions are the integer grid indices (+1 with a CLS token), never rescaled to
    the pretraining grid as timm's ``ref_feat_shape`` does. (timm.create_model drops a None kwarg,
    so the reference shape is cleared on the built module.)"""
    rope = getattr(model, "rope", None)
    if rope is None or not hasattr(rope, "update_feat_shape"):
        raise ValueError(f"{type(model).__name__}: expected a timm axial RoPE module for PE")
    rope.ref_feat_shape = None
    rope.feat_shape = (0, 0)  # update_feat_shape rebuilds only on a change of shape
    rope.update_feat_shape(tuple(model.patch_embed.grid_size))


def _resize_model(model: nn.Module, input_size: int, grid: int, rule: PosEmbedRule) -> None:
    """Move a model loaded at its checkpoint size to ``input_size``: the absolute position
    embedding is resampled with the profile's formula (timm's ``set_input_size`` updates the
    patch grid and RoPE, its own resampling is replaced)."""
    pe = getattr(model, "pos_embed", None)
    new = None
    if pe is not None:
        npt = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
        new = resample_pos_embed(pe.data, (grid, grid), npt, rule.mode, rule.antialias, rule.align_corners,
                                 rule.scale_offset)
    model.set_input_size(img_size=(input_size, input_size))
    if new is not None:
        model.pos_embed = nn.Parameter(new, requires_grad=False)


def load_encoder(name: str, resolution: int = 256, pretrained: bool = True,
                 weights: str | os.PathLike | None = None,
                 config: str | Mapping[str, Any] | None = None, *, seed: int = 0,
                 device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, preprocess: str = "irepa") -> Encoder:
    """Build an :class:`Encoder` for images of ``resolution`` px.

    * ``pretrained=True``: timm downloads / reads its hub cache (``timm.create_model(...,
      pretrained=True)``); WebSSL reads its Hugging Face repo; MoCo v3 has no hub weights and
      needs ``weights``.
    * ``weights=PATH``: random init, then the local checkpoint (official layouts converted, see
      :mod:`irepa.pipeline.encoder_weights`; no network).
    * ``config="tiny"``: the same timm class with depth 2, width 64, 2 heads (Hiera: 4 one-block
      stages, 64 channels at the end), randomly initialised from ``seed`` (never downloads;
      ``pretrained`` is ignored). Token grids are the real ones. ``config`` may also be a dict of
      extra ``timm.create_model`` keyword arguments.
    * ``preprocess``: ``"irepa"`` (the official release's profile, default) or ``"native"``.

    With ``preprocess="irepa"`` the weights are loaded at the checkpoint's own size and the
    position embedding is then resampled as the official code resamples it (mode, antialias,
    the two steps of MoCo v3 / MAE); ``native`` lets timm resample at load.
    """
    if preprocess not in PROFILES:
        raise ValueError(f"encoder {name}: unknown preprocess profile {preprocess!r} "
                         f"(expected {' or '.join(PROFILES)})")
    spec = resolve_encoder(name)
    _check_timm_has(spec)
    rule = FAMILY_RULES.get(spec.family) if preprocess == "irepa" else None
    grid = token_grid_for(resolution)
    input_size = spec.input_size(resolution)
    timm_id = (spec.irepa_timm_id or spec.timm_id) if rule else spec.timm_id
    kwargs: dict[str, Any] = dict(num_classes=0, **dict(spec.arch))
    tiny = isinstance(config, str)
    if tiny:
        if config != "tiny":
            raise ValueError(f"encoder {name}: unknown config {config!r} (expected 'tiny' or a dict)")
        kwargs.update(TINY_HIERA if spec.hierarchical else TINY_CONFIG)
        kwargs.update(dict(spec.tiny_overrides))
    elif config is not None:
        kwargs.update(dict(config))
    build_size = _irepa_load_size(spec, rule, input_size) if rule is not None else input_size
    sd = source = None
    if weights is not None:
        wpath = Path(weights).expanduser().resolve()
        if not wpath.is_file():
            raise FileNotFoundError(f"encoder weights {wpath}: file not found")
        source = str(wpath)
        sd = read_checkpoint(wpath, prefer=PREFERRED_KEYS.get(spec.family, ()))
        file_grid = _file_pos_grid(sd)
        if rule is not None and rule.pos_embed.at == "load" and not rule.pos_embed.via_load_grid and file_grid:
            build_size = file_grid * spec.patch_size  # resample from the file's own grid, as the official code
    if not spec.hierarchical:
        kwargs["img_size"] = build_size
    filter_kwargs = None
    if rule is not None and rule.pos_embed.at == "load_filter":
        pe = rule.pos_embed
        filter_kwargs = dict(interpolation=pe.mode, antialias=pe.antialias, align_corners=pe.align_corners)
    use_pretrained = bool(pretrained) and weights is None and not tiny
    if use_pretrained and spec.weights == "local":
        raise ValueError(f"encoder {spec.name} has no downloadable weights: pass --weights {spec.name}=PATH "
                         f"(the {spec.family} release checkpoint; see docs/ENCODERS.md)")
    if use_pretrained:
        _require_pretrained(spec, timm_id)
        try:
            if spec.weights.startswith("hf:"):
                model = _create(timm_id, pretrained=False, **kwargs)
                load_state_dict_strict(model, _hf_state_dict(spec.weights[3:]), spec.weights, spec.family,
                                       filter_kwargs)
            elif filter_kwargs is not None:
                from functools import partial

                from timm.models import load_pretrained

                model = _create(timm_id, pretrained=False, **kwargs)
                filt = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"]).checkpoint_filter_fn
                load_pretrained(model, num_classes=0, filter_fn=partial(filt, **filter_kwargs))
            else:
                model = _create(timm_id, pretrained=True, **kwargs)
        except ValueError:
            raise
        except Exception as exc:
            raise RuntimeError(
                f"could not load pretrained encoder {spec.name!r} ({timm_id}"
                f"{', ' + spec.weights if spec.weights != 'timm' else ''}): {type(exc).__name__}: {exc}. "
                f"Offline? Fill the hub cache on a connected machine or pass --weights {spec.name}=PATH "
                "(safetensors / state dict)."
            ) from exc
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(timm_id, pretrained=False, **kwargs)
        if sd is not None:
            load_state_dict_strict(model, sd, source, spec.family, filter_kwargs)
    if rule is not None and rule.rope == "integer":
        _integer_rope(model)
    if build_size != input_size:
        _resize_model(model, input_size, grid, rule.pos_embed)
    if not spec.hierarchical:
        patch = model.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        if (int(patch), prefix) != (spec.patch_size, spec.num_prefix_tokens):
            raise ValueError(f"encoder {spec.name}: registry says patch {spec.patch_size} / "
                             f"{spec.num_prefix_tokens} prefix tokens, timm built patch {patch} / {prefix}")
    profile = resolve_profile(spec, resolution, preprocess, model=model)
    if rule is not None and profile.pos_embed.get("from_grid") is not None:
        profile.pos_embed["from_grid"] = [build_size // spec.patch_size] * 2
    enc = Encoder(model, spec, resolution, profile)
    if dtype is not None or device is not None:
        enc = enc.to(device=device, dtype=dtype)
    return enc
