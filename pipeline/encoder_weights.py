"""Local encoder checkpoints: read them safely and convert the official layouts to timm keys.

Every file is read as safetensors or with ``torch.load(weights_only=True)``. Layouts converted
here (timm converts the rest in its own ``checkpoint_filter_fn``: original DINOv2 / DINOv3,
OpenAI CLIP, Meta PE, NVIDIA RADIO, SAM2 trunk renames):

* MoCo v3 (``checkpoint['state_dict']``, ``module.base_encoder.*``, the ``blocks.13/14`` naming bug),
  as the official ``fix_mocov3_state_dict`` does;
* I-JEPA (``checkpoint['encoder']``, the context encoder the official code loads);
* WebSSL: the HF ``Dinov2Model`` layout and the released ``.pth`` (DINOv2 layout with block chunks);
* SAM2 release checkpoints (``model`` -> ``image_encoder.trunk.*``).
"""
from __future__ import annotations

import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

__all__ = ["read_checkpoint", "convert_checkpoint", "load_encoder_weights", "load_state_dict_strict", "CONVERTERS",
           "convert_mocov3", "convert_hf_dinov2", "convert_dinov2_chunks", "convert_sam2"]

# wrapper keys unwrapped in this order when a family does not name its own
_WRAPPER_KEYS = ("state_dict", "model", "module", "teacher", "target_encoder")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "teacher.")


def read_checkpoint(path: str | os.PathLike, prefer: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """safetensors or a torch file (``weights_only=True``) -> flat {key: tensor}.

    Nested ``{"model"|"state_dict"|...: {...}}`` wrappers are unwrapped; keys in ``prefer`` are
    tried first (I-JEPA: ``encoder``, not ``target_encoder``).
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"encoder weights {p}: cannot read as safetensors or a torch state dict "
                         f"with weights_only=True: {type(exc).__name__}: {exc}") from exc
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in (*prefer, *_WRAPPER_KEYS) if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"encoder weights {p}: no state dict found (top-level type {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_common_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for pre in _STRIP_PREFIXES:
            if all(k.startswith(pre) for k in sd):
                sd = {k[len(pre):]: v for k, v in sd.items()}
                changed = True
    return sd


def convert_mocov3(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MoCo v3 release -> timm ViT keys: keep ``module.base_encoder.*`` minus the projection head
    (``head*``) and ``fc*``, and repair the ``blocks.13.norm13`` / ``mlp.fc13`` / ``blocks.14.norm14`` /
    ``mlp.fc14`` names, as the official ``fix_mocov3_state_dict`` does. Other layouts pass through."""
    pre = "module.base_encoder."
    if not any(k.startswith(pre) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if not k.startswith(pre):
            continue  # momentum encoder, predictor
        nk = k[len(pre):]
        nk = nk.replace("blocks.13.norm13", "blocks.13.norm1").replace("blocks.13.mlp.fc13", "blocks.13.mlp.fc1")
        nk = nk.replace("blocks.14.norm14", "blocks.14.norm2").replace("blocks.14.mlp.fc14", "blocks.14.mlp.fc2")
        if "head" in nk or nk.split(".")[0] == "fc":
            continue
        out[nk] = v
    return out


_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_RENAMES = (
    ("norm1.", "norm1."), ("norm2.", "norm2."),
    ("attention.output.dense.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in.", "mlp.fc1."), ("mlp.weights_out.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
)


def convert_hf_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``Dinov2Model`` layout (``embeddings.*``, ``encoder.layer.N.*``, ``layernorm.*``) -> timm
    ViT keys; q/k/v are concatenated into ``attn.qkv``. Other layouts pass through."""
    if "embeddings.cls_token" not in sd and "dinov2.embeddings.cls_token" not in sd:
        return sd
    if "dinov2.embeddings.cls_token" in sd:
        sd = {k[len("dinov2."):]: v for k, v in sd.items() if k.startswith("dinov2.")}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.mask_token":
            continue
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif (m := _HF_LAYER.match(k)) is not None:
            i, rest = int(m.group(1)), m.group(2)
            qm = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
            if qm is not None:
                qkv.setdefault((i, qm.group(2)), {})[qm.group(1)] = v
                continue
            for a, b in _HF_RENAMES:
                if rest.startswith(a):
                    out[f"blocks.{i}.{b}{rest[len(a):]}"] = v
                    break
            else:
                out[f"blocks.{i}.{rest}"] = v  # unknown: left for the strict load to report
        else:
            out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"HF Dinov2 checkpoint: layer {i} has {sorted(parts)} of query/key/value {kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


_CHUNK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")


def convert_dinov2_chunks(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original DINOv2 code with ``block_chunks`` > 0 saves ``blocks.<chunk>.<i>.*``; timm (and the
    unchunked model) wants ``blocks.<i>.*``. Other layouts pass through."""
    if not any(_CHUNK.match(k) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        m = _CHUNK.match(k)
        out[f"blocks.{m.group(2)}.{m.group(3)}" if m else k] = v
    return out


def convert_sam2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM2 release checkpoint (``image_encoder.trunk.*`` beside the neck and decoders) -> the trunk
    alone (timm's filter renames its MLP layers). Other layouts pass through."""
    pre = "image_encoder.trunk."
    if not any(k.startswith(pre) for k in sd):
        return sd
    return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}


def _webssl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert_dinov2_chunks(convert_hf_dinov2(sd))


CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "mocov3": convert_mocov3,
    "webssl": _webssl,
    "dinov2": convert_dinov2_chunks,
    "sam2": convert_sam2,
}
# checkpoint wrapper keys a family's official loader reads first
PREFERRED_KEYS: dict[str, tuple[str, ...]] = {"jepa": ("encoder",)}


def convert_checkpoint(sd: dict[str, torch.Tensor], model: nn.Module, family: str = "",
                       filter_kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Family conversion, shared-prefix stripping, then timm's own ``checkpoint_filter_fn`` for the
    model class (``filter_kwargs``: its interpolation / antialias / align_corners)."""
    conv = CONVERTERS.get(family)
    if conv is not None:
        sd = conv(sd)
    sd = _strip_common_prefixes(sd)
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        if filter_kwargs:
            filt = partial(filt, **filter_kwargs)
        sd = filt(sd, model)
    return sd


def _fmt(items: list[str]) -> str:
    return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")


def load_encoder_weights(model: nn.Module, path: str | os.PathLike, family: str = "",
                         filter_kwargs: Mapping[str, Any] | None = None) -> None:
    """Load a local checkpoint into a timm model, strictly.

    Accepts safetensors or a torch state dict (read with ``weights_only=True``), unwraps
    ``{"model"|"state_dict"|...: {...}}``, converts the family's official layout (see the module
    docstring), strips a prefix shared by all keys (``module.``, ``_orig_mod.``, ``model.``,
    ``backbone.``, ``encoder.``, ``teacher.``), runs timm's own ``checkpoint_filter_fn`` for the model
    class (original DINOv2 / OpenAI CLIP / PE / RADIO layouts, position embeddings resampled to
    the model's grid), drops classifier ``head.*`` keys the feature model does not have, then
    ``load_state_dict(strict=True)``; a mismatch names the missing, unexpected and misshapen keys.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"encoder weights {p}: file not found")
    sd = read_checkpoint(p, prefer=PREFERRED_KEYS.get(family, ()))
    load_state_dict_strict(model, sd, str(p), family, filter_kwargs)


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, family: str = "",
                           filter_kwargs: Mapping[str, Any] | None = None) -> None:
    """Convert ``sd`` (:func:`convert_checkpoint`) and load it with ``strict=True``; classifier
    ``head.*`` keys the feature model lacks are dropped. A mismatch is one ValueError naming the
    missing, unexpected and misshapen keys of ``source``."""
    sd = convert_checkpoint(sd, model, family, filter_kwargs)
    own = model.state_dict()
    if not any(k.startswith("head.") for k in own):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(sd) & set(own)) if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        if shape_bad:
            parts.append(f"shape mismatches: {_fmt(shape_bad)}")
        raise ValueError(f"encoder weights {source} do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
