"""Preprocessing profiles: how each encoder family's images and tokens are prepared.

Two profiles per registry entry:

* ``irepa`` (the default): what the official iREPA release runs (``ldm/vision_encoder.py``; its
  ``jit/vision_encoder.py`` preprocesses the same way), field by field: normalisation constants,
  resize size, order (normalise then resize, or the reverse), interpolation mode and antialias,
  how absolute position embeddings are resampled to the token grid, the RoPE position grid,
  whether the final norm is applied, which tokens are kept, and the MLP activation. A cache built
  with it holds the features that code feeds the alignment loss.
* ``native``: the encoder's own timm configuration (irepa's behaviour before profiles existed):
  timm ``pretrained_cfg`` mean/std and interpolation, normalise then resize without antialias,
  timm's own position-embedding resampling at load (bicubic + antialias; RADIO: bilinear),
  timm's RoPE and ``forward_features`` tokens (after the final norm where timm has one).

A resolved :class:`Profile` is JSON-able (:meth:`Profile.to_dict`) and recorded per encoder in the
store manifest (``encoders[name]["preprocess"]``).

Where the official code does not run an entry (``clip-vit-B``, ``mae-vit-b/h``, ``spatialpe-vit-s``)
or a resolution (SigLIP, SigLIP2, MAE assert 256 px), ``irepa`` applies the family's formula and
says so in ``notes``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD", "HALF_MEAN", "HALF_STD",
    "PROFILES", "FamilyRule", "PosEmbedRule", "FAMILY_RULES", "Profile",
    "preprocess_images", "resample_pos_embed",
]

PROFILES = ("irepa", "native")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

NORMALIZE_THEN_RESIZE = "normalize_then_resize"
RESIZE_THEN_NORMALIZE = "resize_then_normalize"


@dataclass(frozen=True)
class PosEmbedRule:
    """How absolute position embeddings reach the token grid.

    ``at``: ``"load"`` (resampled once when the weights are loaded: the checkpoint is loaded at
    ``load_size`` px, then resampled to the target grid), ``"load_filter"`` (resampled by timm's
    checkpoint filter straight from the checkpoint grid, with these arguments), ``"runtime"``
    (the model interpolates at every forward; nothing to do at load), ``"none"`` (no absolute
    position embedding). ``via_load_grid``: the official code first resamples the checkpoint to
    the 256-px grid and only then to the target (MoCo v3, MAE), i.e. two steps at 512 px.
    ``scale_offset``: HF Dinov2's ``interpolate_pos_encoding`` passes ``scale_factor=(g + 0.1) / G``
    instead of a size.
    """

    at: str = "load"
    mode: str = "bicubic"
    antialias: bool = True
    align_corners: bool | None = None
    scale_offset: float = 0.0
    via_load_grid: bool = False


@dataclass(frozen=True)
class FamilyRule:
    """The official release's formula for one encoder family (ldm/vision_encoder.py)."""

    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    order: str
    interpolation: str
    antialias: bool
    pos_embed: PosEmbedRule
    final_norm: bool
    rope: str | None = None  # "integer" (PE Rope2D), "dinov3" (normalised coords, as timm)
    cls: bool = True  # does the official code return the CLS token
    official_resolutions: tuple[int, ...] = (256, 512)
    checkpoint: str = ""
    notes: tuple[str, ...] = ()


_BICUBIC_AA = PosEmbedRule("load", "bicubic", True)

FAMILY_RULES: dict[str, FamilyRule] = {
    "dino": FamilyRule(
        "ldm/vision_encoder.py DINOEncoder: x/255, Normalize(ImageNet), interpolate(resolution, bicubic); "
        "pos_embed resample_abs_pos_embed (bicubic, antialias) at load; get_intermediate_layers (final norm)",
        IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_THEN_RESIZE, "bicubic", False, _BICUBIC_AA, True),
    "dinov2": FamilyRule(
        "ldm/vision_encoder.py DINOv2Encoder: x/255, Normalize(ImageNet), interpolate(224*(res//256), bicubic); "
        "pos_embed resample_abs_pos_embed (bicubic, antialias) at load; x_norm_patchtokens (final norm, "
        "registers dropped)",
        IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_THEN_RESIZE, "bicubic", False, _BICUBIC_AA, True),
    "dinov3": FamilyRule(
        "ldm/models/dinov3_loader.py make_dinov3_transform: x/255, Resize((res,res), antialias=True) "
        "(bilinear), Normalize(ImageNet); RoPE on normalised coordinates; x_norm_patchtokens",
        IMAGENET_MEAN, IMAGENET_STD, RESIZE_THEN_NORMALIZE, "bilinear", True, PosEmbedRule("none"), True,
        rope="dinov3"),
    "siglip": FamilyRule(
        "ldm/vision_encoder.py SigLIPEncoder: x/255, Normalize(ImageNet) (not SigLIP's 0.5/0.5), "
        "interpolate(patch*(res//16), bicubic); HF last_hidden_state (post_layernorm applied), no CLS",
        IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_THEN_RESIZE, "bicubic", False, _BICUBIC_AA, True, cls=False,
        official_resolutions=(256,),
        notes=("official code asserts 256 px; at other sizes the position embedding is resampled "
               "bicubic + antialias (timm's default)",)),
    "siglip2": FamilyRule(
        "ldm/vision_encoder.py SigLIP2Encoder: x/255, Normalize(ImageNet) (not SigLIP's 0.5/0.5), "
        "interpolate(res, bicubic); HF last_hidden_state (post_layernorm applied), no CLS",
        IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_THEN_RESIZE, "bicubic", False, _BICUBIC_AA, True, cls=False,
        official_resolutions=(256,),
        notes=("official code asserts 256 px; at other sizes the position embedding is resampled "
               "bicubic + antialias (timm's default)",)),
    "clip": FamilyRule(
        "ldm/vision_encoder.py CLIPEncoder + models/clip_vit.py UpdatedVisionTransformer: x/255, "
        "interpolate(224*(res//256), bicubic), then Normalize(CLIP); OpenAI weights (QuickGELU); tokens "
        "after the last block, before ln_post; positional_embedding resampled bicubic + antialias at load",
        CLIP_MEAN, CLIP_STD, RESIZE_THEN_NORMALIZE, "bicubic", False, _BICUBIC_AA, False),
    "mocov3": FamilyRule(
        "ldm/vision_encoder.py MoCoV3Encoder + models/mocov3_vit.py: x/255, Normalize(ImageNet), no resize "
        "(ViT/16 built at img_size 256); checkpoint pos_embed resampled to 16x16 at load, then to the "
        "target grid (bicubic + antialias, both steps); timm forward_features (final norm), CLS dropped",
        IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_THEN_RESIZE, "bicubic", False,
        PosEmbedRule("load", "bicubic", True, via_load_grid=True), True,
        checkpoint="checkpoint['state_dict'], keys 'module.base_encoder.*' (fix_mocov3_state_dict)"),
    "mae": FamilyRule(
        "ldm/vision_encoder.py MAEEncoder + models/mae_vit.py: x/255, Normalize(ImageNet), no resize "
        "(ViT-L/16 built at img_size 256); pos_embed 14x14 -> 16x16 (bicubic + antialias) at load; "
        "forward_features WITHOUT the final LayerNorm, CLS dropped",
        IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_THEN_RESIZE, "bicubic", False,
        PosEmbedRule("load", "bicubic", True, via_load_grid=True), False,
        official_resolutions=(256,), checkpoint="checkpoint['model']",
        notes=("official code asserts 256 px and builds only ViT-L/16",)),
    "jepa": FamilyRule(
        "ldm/vision_encoder.py JEPAEncoder + models/jepa.py: x/255, Normalize(ImageNet), "
        "interpolate(224*(res//256), bicubic); pos_embed resampled (bicubic + antialias, no prefix) at load; "
        "forward (final norm), no CLS",
        IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_THEN_RESIZE, "bicubic", False, _BICUBIC_AA, True, cls=False,
        checkpoint="checkpoint['encoder'] (the context encoder), keys 'module.*'"),
    "webssl": FamilyRule(
        "ldm/vision_encoder.py WebSSLEncoder: x/255, Normalize(ImageNet), interpolate(224*(res//256), bicubic); "
        "HF Dinov2Model last_hidden_state (final layernorm), CLS dropped; HF interpolates the 16x16 "
        "position embedding at runtime (bicubic, scale_factor (g+0.1)/16, no antialias)",
        IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_THEN_RESIZE, "bicubic", False,
        PosEmbedRule("load", "bicubic", False, align_corners=False, scale_offset=0.1), True,
        checkpoint="HF facebook/webssl-* (Dinov2Model layout) or the released .pth (DINOv2 layout)"),
    "pe": FamilyRule(
        "ldm/vision_encoder.py PEEncoder + models/pe.py: x/255, interpolate(patch*(res//16), bilinear), then "
        "Normalize(0.5, 0.5); abs pos-embed interpolated bilinear (no antialias) to the grid; Rope2D at "
        "integer grid positions (1..g, CLS at 0; 0..g-1 without CLS); ln_post only for the '...norm' names",
        HALF_MEAN, HALF_STD, RESIZE_THEN_NORMALIZE, "bilinear", False,
        PosEmbedRule("load", "bilinear", False, align_corners=False), False, rope="integer"),
    "cradio": FamilyRule(
        "ldm/vision_encoder.py CRadioEncoder (torch.hub NVlabs/RADIO c-radio_v3-*): x/255, "
        "interpolate(16*(res//16), bilinear, align_corners=False), the model's input conditioner normalises "
        "(CLIP mean/std); RADIO CPE pos-embed resampled bilinear (align_corners=False, no antialias) from its "
        "128x128 grid; spatial features (CLS + register tokens dropped, no final norm); no CLS returned",
        CLIP_MEAN, CLIP_STD, RESIZE_THEN_NORMALIZE, "bilinear", False,
        PosEmbedRule("load_filter", "bilinear", False, align_corners=False), False, cls=False,
        checkpoint="HF nvidia/C-RADIOv3-* model.safetensors ('radio_model.model.*')",
        notes=("RADIO's torch.hub code resizes the CPE grid with align_corners=False since 2025-06 "
               "(True before; timm's B/H v3 keep True)",)),
    "sam2": FamilyRule(
        "ldm/vision_encoder.py SAM2Encoder (HF Sam2Model.vision_encoder): x/255, "
        "interpolate(2*res, bicubic), then Normalize(ImageNet); last_hidden_state = Hiera trunk's last "
        "stage (stride 32, no neck, no norm), flattened row-major; pos-embed interpolated by the model",
        IMAGENET_MEAN, IMAGENET_STD, RESIZE_THEN_NORMALIZE, "bicubic", False, PosEmbedRule("runtime", "bicubic", False),
        False, cls=False,
        checkpoint="SAM2 release .pt ('model' -> 'image_encoder.trunk.*') or timm's"),
}
for _f in ("spatialpe", "langpe"):
    FAMILY_RULES[_f] = FAMILY_RULES["pe"]


@dataclass(frozen=True)
class Profile:
    """Every resolved preprocessing and token-selection field for one encoder at one resolution."""

    profile: str
    rule: str
    timm_id: str
    resolution: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    order: str
    interpolation: str
    antialias: bool
    align_corners: bool
    pos_embed: dict[str, Any]
    rope: dict[str, Any] | None
    final_norm: bool
    prefix_tokens_dropped: int
    cls: bool
    activation: str
    checkpoint: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists, not tuples) for the store manifest."""
        d = asdict(self)
        d["mean"], d["std"], d["notes"] = list(self.mean), list(self.std), list(self.notes)
        return d


def _check_images(images: torch.Tensor, resolution: int, who: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"encoder {who}: expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != (resolution, resolution):
        raise ValueError(f"encoder {who}: built for {resolution} px images, got {tuple(images.shape[-2:])}")


def preprocess_images(images: torch.Tensor, p: Profile, device: torch.device | str | None = None,
                      who: str = "") -> torch.Tensor:
    """uint8 [B, 3, R, R] -> float32 [B, 3, S, S] as profile ``p`` says (x / 255, mean/std and a
    resize in ``p.order``). A resize to the same size is skipped (it is the identity)."""
    _check_images(images, p.resolution, who or p.timm_id)
    x = images.to(device or images.device, torch.float32) / 255.0
    mean = torch.tensor(p.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(p.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)

    def resize(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] == p.input_size and t.shape[-2] == p.input_size:
            return t
        return F.interpolate(t, size=(p.input_size, p.input_size), mode=p.interpolation,
                             align_corners=p.align_corners, antialias=p.antialias)

    if p.order == NORMALIZE_THEN_RESIZE:
        return resize((x - mean) / std)
    if p.order == RESIZE_THEN_NORMALIZE:
        return (resize(x) - mean) / std
    raise ValueError(f"unknown preprocessing order {p.order!r}")


def resample_pos_embed(posemb: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int,
                       mode: str = "bicubic", antialias: bool = True, align_corners: bool | None = None,
                       scale_offset: float = 0.0) -> torch.Tensor:
    """Resample a [1, prefix + G*G, D] position embedding to ``new_grid`` (prefix entries kept).

    The interpolation runs in float32 and returns the input dtype. ``scale_offset`` > 0 reproduces
    HF Dinov2's ``scale_factor=(g + offset) / G`` call instead of an output size.
    """
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    n = grid.shape[1]
    old = int(math.isqrt(n))
    if old * old != n:
        raise ValueError(f"position embedding with {n} grid entries is not a square grid")
    if (old, old) == tuple(new_grid):
        return posemb
    dim = grid.shape[-1]
    g = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    kw: dict[str, Any] = {"mode": mode, "antialias": antialias}
    if mode in ("bilinear", "bicubic"):
        kw["align_corners"] = align_corners
    if scale_offset:
        kw["scale_factor"] = ((new_grid[0] + scale_offset) / old, (new_grid[1] + scale_offset) / old)
    else:
        kw["size"] = tuple(new_grid)
    g = F.interpolate(g, **kw)
    if tuple(g.shape[-2:]) != tuple(new_grid):
        raise ValueError(f"position embedding resampled to {tuple(g.shape[-2:])}, expected {tuple(new_grid)}")
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(posemb.dtype)
    return torch.cat([prefix, g], dim=1)
