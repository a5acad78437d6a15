"""Encoders as the official iREPA release runs them (issue 14).

Each reference below is a direct transcription, written here, of the official code
(End2End-Diffusion/iREPA ``ldm/vision_encoder.py`` and ``ldm/models/*``; RADIO's torch.hub code;
HF Dinov2 for WebSSL), compared with what the ``irepa`` profile computes on tiny random models of
the same timm classes. The ``native`` profile is compared with timm's own data config.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import Normalize

from irepa.pipeline.encoder_profiles import preprocess_images
from irepa.pipeline.encoders import (
    ALIASES, ENCODERS, canonical_encoder_name, feature_transform, feature_transform_name, load_encoder,
    resolve_encoder, resolve_profile,
)

torch.set_num_threads(min(2, torch.get_num_threads()))

IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _batch(res: int, n: int = 2) -> torch.Tensor:
    """A fixed uint8 batch with edges and flat areas (all 256 levels occur)."""
    g = torch.Generator().manual_seed(res)
    x = torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g)
    x[:, :, : res // 4] = 255
    x[:, :, res // 4 : res // 2, : res // 2] = 0
    return x


# ------------------------------------------------------------------ official preprocessing


def official_preprocess(name: str, raw: torch.Tensor) -> torch.Tensor:
    """The official ``VisionEncoder.preprocess`` of this entry's family, transcribed.

    ``clip-vit-B``, ``mae-vit-b/h`` and ``spatialpe-vit-s`` are not run by the official code; they
    get their family's formula with the resize size generalised to (res // 16) * patch."""
    spec = ENCODERS[name]
    fam, res = spec.family, raw.shape[-1]
    x = raw / 255.0
    bicubic = dict(mode="bicubic")
    if fam == "dino":
        return F.interpolate(Normalize(*IMNET)(x), res, **bicubic)
    if fam == "dinov2":
        return F.interpolate(Normalize(*IMNET)(x), 224 * (res // 256), **bicubic)
    if fam == "dinov3":  # make_dinov3_transform: Lambda(/255), Resize((res, res), antialias=True), Normalize
        return Normalize(*IMNET)(transforms.Resize((res, res), antialias=True)(x))
    if fam == "siglip":
        return F.interpolate(Normalize(*IMNET)(x), spec.patch_size * (res // 16), **bicubic)
    if fam == "siglip2":
        return F.interpolate(Normalize(*IMNET)(x), res, **bicubic)
    if fam == "clip":
        size = 224 * (res // 256) if name == "clip-vit-L" else spec.patch_size * (res // 16)
        return Normalize(*CLIP)(F.interpolate(x, size, **bicubic))
    if fam in ("mocov3", "mae"):
        x = Normalize(*IMNET)(x)
        return x if spec.patch_size == 16 else F.interpolate(x, spec.patch_size * (res // 16), **bicubic)
    if fam in ("jepa", "webssl"):
        return F.interpolate(Normalize(*IMNET)(x), 224 * (res // 256), **bicubic)
    if fam in ("pe", "spatialpe", "langpe"):
        x = F.interpolate(x, spec.patch_size * (res // 16), mode="bilinear")
        return Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])(x)
    if fam == "cradio":  # CRadioEncoder.preprocess, then RADIO's InputConditioner (x - mean) / std
        x = F.interpolate(x, 16 * (res // 16), mode="bilinear", align_corners=False)
        mean = torch.tensor(CLIP[0]).view(-1, 1, 1)
        std = torch.tensor(CLIP[1]).view(-1, 1, 1)
        return (x - mean) / std
    if fam == "sam2":
        return Normalize(*IMNET)(F.interpolate(x, res * 2, **bicubic))
    raise AssertionError(f"no official formula transcribed for {name}")


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_irepa_preprocessing_equals_official_formula(name):
    spec = ENCODERS[name]
    for res in (256, 512):
        raw = _batch(res, 1)
        p = resolve_profile(spec, res, "irepa")
        ours = preprocess_images(raw, p)
        ref = official_preprocess(name, raw)
        assert ours.shape == ref.shape == (1, 3, spec.input_size(res), spec.input_size(res)), name
        assert (ours - ref).abs().max().item() <= 1e-6, (name, res, (ours - ref).abs().max().item())


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_native_preprocessing_equals_timm_data_config(name):
    """native: timm's resolve_data_config (mean, std, interpolation) applied as tensor ops at the
    encoder's input size, normalise then resize (REPA's order); non-timm weights keep their own
    mean/std (MoCo v3, WebSSL: ImageNet)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    spec = ENCODERS[name]
    cfg = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(spec.timm_id).to_dict())
    mean, std = cfg["mean"], cfg["std"]
    if spec.weights != "timm":
        assert (spec.family, tuple(spec.native_mean), tuple(spec.native_std)) in (
            ("mocov3", *IMNET), ("webssl", *IMNET))
        mean, std = spec.native_mean, spec.native_std
    for res in (256, 512):
        raw = _batch(res, 1)
        ours = preprocess_images(raw, resolve_profile(spec, res, "native"))
        size = spec.input_size(res)
        ref = (raw.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        if size != res:
            ref = F.interpolate(ref, size=(size, size), mode=cfg["interpolation"], align_corners=False)
        assert (ours - ref).abs().max().item() <= 1e-6, (name, res)


def test_profiles_differ_where_the_issue_found_differences():
    x = _batch(256)
    sig_i = preprocess_images(x, resolve_profile(ENCODERS["siglip-vit-b"], 256, "irepa"))
    sig_n = preprocess_images(x, resolve_profile(ENCODERS["siglip-vit-b"], 256, "native"))
    gap = (sig_i - sig_n).abs().max().item()
    assert 1.5 < gap < 2.2  # ImageNet vs 0.5/0.5 normalisation, as the issue measured
    for name in ("dinov2-vit-b", "dinov2-vit-b-reg", "dino-vit-b", "jepa-vit-h", "dinov3-vit-b16"):
        a = preprocess_images(x, resolve_profile(ENCODERS[name], 256, "irepa"))
        b = preprocess_images(x, resolve_profile(ENCODERS[name], 256, "native"))
        assert (a - b).abs().max().item() <= 1e-6, name  # the issue's "equal" rows
    pe_i = resolve_profile(ENCODERS["pe-vit-b"], 256, "irepa")
    assert (pe_i.interpolation, pe_i.order, pe_i.final_norm) == ("bilinear", "resize_then_normalize", False)
    assert resolve_profile(ENCODERS["pe-vit-bnorm"], 256, "irepa").final_norm is True
    d = resolve_profile(ENCODERS["clip-vit-L"], 512, "irepa").to_dict()
    assert json.loads(json.dumps(d)) == d and d["profile"] == "irepa" and d["input_size"] == 448
    assert d["timm_id"] == "vit_large_patch14_clip_quickgelu_224.openai" and d["final_norm"] is False
    with pytest.raises(ValueError, match="unknown preprocessing profile 'repa'"):
        resolve_profile(ENCODERS["clip-vit-L"], 256, "repa")


# ------------------------------------------------------------------------- token selection

# What the official forward_features returns, per family: final norm applied? prefix tokens
# before the patches, and does it return the CLS token (x_norm_clstoken / out[:, 0])?
OFFICIAL_TOKENS = {
    "dino": (True, 1, True), "dinov2": (True, None, True), "dinov3": (True, 5, True),
    "siglip": (True, 0, False), "siglip2": (True, 0, False), "clip": (False, 1, True),
    "mocov3": (True, 1, True), "mae": (False, 1, True), "jepa": (True, 0, False), "webssl": (True, 1, True),
    "pe": (False, None, True), "spatialpe": (False, None, True), "langpe": (False, None, True),
    "cradio": (False, 8, False), "sam2": (False, 0, False),
}


def _official_prefix(name: str) -> int:
    fam = ENCODERS[name].family
    n = OFFICIAL_TOKENS[fam][1]
    if n is not None:
        return n
    if fam == "dinov2":
        return 5 if name.endswith("-reg") else 1  # x_norm[:, num_register_tokens + 1:]
    return 0 if name.startswith(("pe-vit-g", "spatialpe-vit-g", "langpe-vit-g")) else 1  # use_cls_token


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_tokens_are_taken_as_the_official_code_takes_them(name):
    """The cached tokens equal the last block's output, through the final norm only where the
    official code applies it, with the official prefix tokens dropped."""
    spec = ENCODERS[name]
    enc = load_encoder(name, 256, config="tiny")
    norm_applied, _, returns_cls = OFFICIAL_TOKENS[spec.family]
    if name.startswith("pe-vit-") and name.endswith("norm"):
        norm_applied = True  # the '...norm' names: forward_features(norm=True)
    prefix = _official_prefix(name)
    seen = {}
    h = enc.model.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    x = _batch(256, 1)
    patches, cls = enc(x)
    h.remove()
    out = seen["out"]
    if spec.family == "sam2":
        assert out.shape[1:3] == (16, 16)  # Hiera's last stage, NHWC
        out = out.reshape(1, -1, out.shape[-1])
    norm = getattr(enc.model, "norm", None)
    ref = norm(out) if norm_applied else out
    torch.testing.assert_close(patches, ref[:, prefix:].float(), rtol=0, atol=1e-6)
    if returns_cls and prefix:
        torch.testing.assert_close(cls, ref[:, 0].float(), rtol=0, atol=1e-6)
    else:
        assert cls is None
    if name in ("clip-vit-L", "mae-vit-l", "pe-vit-b"):
        # the native profile takes timm's forward_features, after the norm: a different feature
        assert not norm_applied and not isinstance(norm, torch.nn.Identity)
        native = load_encoder(name, 256, config="tiny", preprocess="native")
        native.model.load_state_dict(enc.model.state_dict())
        assert (native(x)[0] - patches).abs().max() > 1e-3


def test_clip_irepa_uses_quickgelu_and_native_keeps_timm_gelu():
    a = load_encoder("clip-vit-L", 256, config="tiny")
    b = load_encoder("clip-vit-L", 256, config="tiny", preprocess="native")
    assert a.profile.activation == "quick_gelu" and b.profile.activation == "gelu"
    assert type(a.model.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert a.timm_id == "vit_large_patch14_clip_quickgelu_224.openai"
    assert b.timm_id == "vit_large_patch14_clip_224.openai"


# ------------------------------------------------------------------------------- PE: RoPE


def official_pe_rope(head_dim: int, grid: int, use_cls: bool) -> torch.Tensor:
    """models/rope.py Rope2D.update_grid + RotaryEmbedding(head_dim // 2): the per-token angles."""
    d = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))

    def rope(t: torch.Tensor) -> torch.Tensor:
        f = torch.einsum("..., f -> ... f", t.float(), freqs)
        return f.repeat_interleave(2, dim=-1)  # "... n -> ... (n r)", r=2

    pos = torch.arange(grid) + (1 if use_cls else 0)
    fy = rope(pos)[:, None].expand(grid, grid, -1)
    fx = rope(pos)[None, :].expand(grid, grid, -1)
    return torch.cat([fx, fy], dim=-1).reshape(grid * grid, -1)


def official_apply_rotary(freqs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x = t.reshape(*t.shape[:-1], -1, 2)
    x1, x2 = x.unbind(-1)
    rot = torch.stack((-x2, x1), dim=-1).reshape(t.shape)
    return t * freqs.cos() + rot * freqs.sin()


@pytest.mark.parametrize("name", ["pe-vit-b", "pe-vit-g", "spatialpe-vit-b", "langpe-vit-l"])
def test_pe_rope_positions_equal_official_at_256_and_512(name):
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    use_cls = ENCODERS[name].num_prefix_tokens == 1
    q = torch.randn(1, 2, 32 * 32, 32, generator=torch.Generator().manual_seed(0))
    for res in (256, 512):
        g = res // 16
        enc = load_encoder(name, res, config="tiny")
        rot = apply_rot_embed_cat(q[:, :, : g * g], enc.model.rope.get_embed())
        ref = official_apply_rotary(official_pe_rope(32, g, use_cls), q[:, :, : g * g])
        torch.testing.assert_close(rot, ref, rtol=0, atol=1e-5)
        assert enc.profile.rope["positions"] == (f"integer 1..{g}" if use_cls else f"integer 0..{g - 1}")
    # timm's own (native) rescales positions to the pretraining grid: not the official rotation at 256 px
    nat = load_encoder(name, 256, config="tiny", preprocess="native")
    rot = apply_rot_embed_cat(q[:, :, :256], nat.model.rope.get_embed())
    assert (rot - official_apply_rotary(official_pe_rope(32, 16, use_cls), q[:, :, :256])).abs().max() > 1e-2


# ----------------------------------------------------- checkpoints in the official layouts


def _pe_official_state_dict(timm_sd: dict, prefix: str = "visual.") -> dict:
    """A PE checkpoint as ``models/pe.py`` names its VisionTransformer (conv1, class_embedding,
    positional_embedding [N, D], ln_pre, transformer.resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj,
    ln_2, mlp.c_fc, mlp.c_proj}, ln_post, attn_pool.{probe, attn, layernorm, mlp}, proj), with the
    CLIP checkpoint's 'visual.' prefix and a text-tower key."""
    out = {}
    for k, v in timm_sd.items():
        if k == "patch_embed.proj.weight":
            out["conv1.weight"] = v
        elif k == "cls_token":
            out["class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["positional_embedding"] = v[0]
        elif k.startswith("norm_pre."):
            out["ln_pre." + k.split(".")[-1]] = v
        elif k.startswith("norm."):
            out["ln_post." + k.split(".")[-1]] = v
        elif k.startswith("blocks."):
            i, rest = k.split(".")[1], ".".join(k.split(".")[2:])
            rest = {"norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias", "norm2.weight": "ln_2.weight",
                    "norm2.bias": "ln_2.bias", "attn.qkv.weight": "attn.in_proj_weight",
                    "attn.qkv.bias": "attn.in_proj_bias", "attn.proj.weight": "attn.out_proj.weight",
                    "attn.proj.bias": "attn.out_proj.bias", "mlp.fc1.weight": "mlp.c_fc.weight",
                    "mlp.fc1.bias": "mlp.c_fc.bias", "mlp.fc2.weight": "mlp.c_proj.weight",
                    "mlp.fc2.bias": "mlp.c_proj.bias", "gamma_1": "ls_1.gamma", "gamma_2": "ls_2.gamma"}[rest]
            out[f"transformer.resblocks.{i}.{rest}"] = v
        elif k == "attn_pool.latent":
            out["attn_pool.probe"] = v
        elif k in ("attn_pool.q.weight", "attn_pool.q.bias"):
            kind = k.rsplit(".", 1)[1]
            out[f"attn_pool.attn.in_proj_{kind}"] = torch.cat([v, timm_sd[f"attn_pool.kv.{kind}"]], 0)
        elif k.startswith("attn_pool.kv."):
            continue
        elif k.startswith("attn_pool.proj."):
            out["attn_pool.attn.out_proj." + k.split(".")[-1]] = v
        elif k.startswith("attn_pool.norm."):
            out["attn_pool.layernorm." + k.split(".")[-1]] = v
        elif k.startswith("attn_pool.mlp.fc"):
            out["attn_pool.mlp." + {"fc1": "c_fc", "fc2": "c_proj"}[k.split(".")[2]] + "." + k.split(".")[-1]] = v
        else:
            raise AssertionError(f"unmapped timm key {k}")
    out["proj"] = torch.randn(timm_sd["pos_embed"].shape[-1], 16)
    out = {prefix + k: v for k, v in out.items()}
    out["text.positional_embedding"] = torch.zeros(4, 8)  # the CLIP text tower is ignored
    return out


def official_pe_sample_abs_posemb(positional_embedding: torch.Tensor, grid: int, use_cls: bool) -> torch.Tensor:
    """models/pe.py VisionTransformer._sample_abs_posemb."""
    g0 = int(math.isqrt(positional_embedding.shape[0] - int(use_cls)))
    if g0 == grid:
        return positional_embedding[None]
    pe = positional_embedding
    if use_cls:
        cls_pe, pe = pe[:1], pe[1:]
    pe = pe.reshape(1, g0, g0, -1).permute(0, 3, 1, 2).contiguous()
    pe = F.interpolate(pe, size=(grid, grid), mode="bilinear", align_corners=False)
    pe = pe.permute(0, 2, 3, 1).reshape(-1, positional_embedding.shape[-1]).contiguous()
    if use_cls:
        pe = torch.cat([cls_pe, pe], dim=0)
    return pe[None]


@pytest.mark.parametrize("name", ["pe-vit-b", "pe-vit-g"])
def test_pe_official_checkpoint_loads_and_pos_embed_is_resampled_as_official(name, tmp_path):
    import timm

    spec = ENCODERS[name]
    use_cls = spec.num_prefix_tokens == 1
    src = timm.create_model(spec.timm_id, pretrained=False, num_classes=0, depth=2, embed_dim=64, num_heads=2)
    sd = _pe_official_state_dict(src.state_dict())
    torch.save({"state_dict": sd}, tmp_path / "pe.pt")
    for res in (256, 512):
        enc = load_encoder(name, res, pretrained=False, weights=tmp_path / "pe.pt",
                           config=dict(depth=2, embed_dim=64, num_heads=2))
        ref = official_pe_sample_abs_posemb(sd["visual.positional_embedding"], res // 16, use_cls)
        torch.testing.assert_close(enc.model.pos_embed.data, ref, rtol=0, atol=1e-6)
        assert enc.profile.pos_embed["mode"] == "bilinear" and enc.profile.pos_embed["antialias"] is False
        torch.testing.assert_close(enc.model.blocks[1].attn.qkv.weight,
                                   sd["visual.transformer.resblocks.1.attn.in_proj_weight"], rtol=0, atol=0)


def test_mocov3_release_checkpoint_converts_and_resamples_in_two_steps(tmp_path):
    """fix_mocov3_state_dict: 'module.base_encoder.' prefix, the blocks.13/14 naming bug, head / fc
    and the momentum encoder dropped; pos_embed 14x14 -> 16x16 at load, then 16x16 -> 32x32."""
    import timm
    from timm.layers import resample_abs_pos_embed

    arch = dict(depth=15, embed_dim=64, num_heads=2)
    src = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **arch)  # 14x14 grid
    base = {f"module.base_encoder.{k}": v for k, v in src.state_dict().items()}
    for a, b in (("blocks.13.norm1", "blocks.13.norm13"), ("blocks.13.mlp.fc1", "blocks.13.mlp.fc13"),
                 ("blocks.14.norm2", "blocks.14.norm14"), ("blocks.14.mlp.fc2", "blocks.14.mlp.fc14")):
        for kind in ("weight", "bias"):
            base[f"module.base_encoder.{b}.{kind}"] = base.pop(f"module.base_encoder.{a}.{kind}")
    base["module.base_encoder.head.0.weight"] = torch.randn(32, 64)  # MoCo's projection MLP
    base["module.momentum_encoder.cls_token"] = torch.randn(1, 1, 64)
    base["module.predictor.0.weight"] = torch.randn(32, 32)
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": base}, tmp_path / "mocov3.pth.tar")
    pe14 = src.state_dict()["pos_embed"]
    for res, ref in ((256, resample_abs_pos_embed(pe14, [16, 16])),
                     (512, resample_abs_pos_embed(resample_abs_pos_embed(pe14, [16, 16]), [32, 32]))):
        enc = load_encoder("mocov3-vit-s", res, pretrained=False, weights=tmp_path / "mocov3.pth.tar", config=arch)
        torch.testing.assert_close(enc.model.pos_embed.data, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(enc.model.blocks[13].norm1.weight, src.blocks[13].norm1.weight, rtol=0, atol=0)
        torch.testing.assert_close(enc.model.blocks[14].mlp.fc2.bias, src.blocks[14].mlp.fc2.bias, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"has no downloadable weights: pass --weights mocov3-vit-b=PATH"):
        load_encoder("mocov3-vit-b", 256)
    assert ENCODERS["mocov3-vit-s"].arch == (("num_heads", 12),)  # MoCo v3's ViT-S: 12 heads


def test_ijepa_release_checkpoint_loads_the_context_encoder(tmp_path):
    import timm

    mk = dict(pretrained=False, num_classes=0, depth=2, embed_dim=64, num_heads=2)
    enc_w = timm.create_model("vit_huge_patch14_gap_224", **mk).state_dict()
    tgt_w = timm.create_model("vit_huge_patch14_gap_224", **mk).state_dict()
    ckpt = {"encoder": {f"module.{k}": v for k, v in enc_w.items()},
            "target_encoder": {f"module.{k}": v for k, v in tgt_w.items()},
            "predictor": {"module.predictor_embed.weight": torch.zeros(2, 2)}, "epoch": 300}
    torch.save(ckpt, tmp_path / "ijepa.pth.tar")
    enc = load_encoder("jepa-vit-h", 256, pretrained=False, weights=tmp_path / "ijepa.pth.tar",
                       config=dict(depth=2, embed_dim=64, num_heads=2))
    torch.testing.assert_close(enc.model.blocks[0].attn.qkv.weight, enc_w["blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    assert enc.profile.checkpoint.startswith("checkpoint['encoder']")


def _webssl_hf_layout(timm_sd: dict) -> dict:
    """HF Dinov2Model names (embeddings.*, encoder.layer.i.{norm1, attention.attention.{query,key,value},
    attention.output.dense, layer_scale1.lambda1, norm2, mlp.weights_in, mlp.weights_out,
    layer_scale2.lambda1}, layernorm)."""
    out = {"embeddings.cls_token": timm_sd["cls_token"], "embeddings.mask_token": torch.zeros(1, 64),
           "embeddings.position_embeddings": timm_sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": timm_sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": timm_sd["patch_embed.proj.bias"],
           "layernorm.weight": timm_sd["norm.weight"], "layernorm.bias": timm_sd["norm.bias"]}
    for i in range(2):
        b, L = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = timm_sd[b + f"attn.qkv.{kind}"].chunk(3, 0)
            out[L + f"attention.attention.query.{kind}"] = q
            out[L + f"attention.attention.key.{kind}"] = k
            out[L + f"attention.attention.value.{kind}"] = v
            out[L + f"attention.output.dense.{kind}"] = timm_sd[b + f"attn.proj.{kind}"]
            out[L + f"norm1.{kind}"] = timm_sd[b + f"norm1.{kind}"]
            out[L + f"norm2.{kind}"] = timm_sd[b + f"norm2.{kind}"]
            out[L + f"mlp.weights_in.{kind}"] = timm_sd[b + f"mlp.fc1.{kind}"]
            out[L + f"mlp.weights_out.{kind}"] = timm_sd[b + f"mlp.fc2.{kind}"]
        out[L + "layer_scale1.lambda1"] = timm_sd[b + "ls1.gamma"]
        out[L + "layer_scale2.lambda1"] = timm_sd[b + "ls2.gamma"]
    return out


def test_webssl_hf_and_release_checkpoints_load_and_agree(tmp_path):
    """WebSSL weights in the HF Dinov2Model layout and in the released .pth (original DINOv2 code,
    block_chunks=4: 'blocks.<chunk>.<i>.*', SwiGLU 'mlp.w12' / 'mlp.w3', 'ls1.gamma') give the same
    encoder; SwiGLU hidden width as DINOv2's SwiGLUFFNFused: (int(4 D * 2/3) + 7) // 8 * 8."""
    from safetensors.torch import save_file

    src = load_encoder("webssl-vit-dino300m_full2b_224", 256, config="tiny", seed=3)
    sd = src.model.state_dict()
    assert sd["blocks.0.mlp.fc1.weight"].shape == (2 * ((int(4 * 64 * 2 / 3) + 7) // 8 * 8), 64)
    save_file({k: v.contiguous() for k, v in _webssl_hf_layout(sd).items()}, str(tmp_path / "model.safetensors"))
    orig = {"mask_token": torch.zeros(1, 64)}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            rest = rest.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
            k = f"blocks.0.{i}.{rest}"  # chunk index (all in chunk 0 at depth 2) before the block index
        orig[k] = v
    torch.save(orig, tmp_path / "webssl_dino300m_full2b_224.pth")
    x = _batch(256, 1)
    ref = src(x)[0]
    for f in ("model.safetensors", "webssl_dino300m_full2b_224.pth"):
        enc = load_encoder("webssl-vit-dino300m_full2b_224", 256, config="tiny", seed=9, weights=tmp_path / f)
        assert enc.weights_sha256() == src.weights_sha256(), f
        torch.testing.assert_close(enc(x)[0], ref, rtol=0, atol=0)


def test_webssl_pos_embed_at_512_follows_hf_runtime_interpolation(tmp_path):
    """HF Dinov2Embeddings.interpolate_pos_encoding: bicubic, scale_factor (g + 0.1) / 16."""
    from safetensors.torch import save_file

    src = load_encoder("webssl-vit-dino300m_full2b_224", 256, config="tiny", seed=3)
    sd = src.model.state_dict()
    save_file({k: v.contiguous() for k, v in _webssl_hf_layout(sd).items()}, str(tmp_path / "m.safetensors"))
    big = load_encoder("webssl-vit-dino300m_full2b_224", 512, config="tiny", weights=tmp_path / "m.safetensors")
    pe = sd["pos_embed"]
    patch = pe[:, 1:].reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), scale_factor=(32.1 / 16, 32.1 / 16), mode="bicubic", align_corners=False)
    ref = torch.cat([pe[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, 64)], 1)
    torch.testing.assert_close(big.model.pos_embed.data, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(src.model.pos_embed.data, pe)  # 224 px: the native 16x16, untouched


def test_cradio_hf_checkpoint_converts_and_resamples_as_radio(tmp_path):
    """nvidia/C-RADIOv3 model.safetensors ('radio_model.model.*'; patch embedder as a bias-free linear
    layer; one token tensor for CLS + registers; input conditioner and summary indices beside):
    strict load; the CPE grid resampled as RADIO's ViTPatchGenerator does at inference."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    src = load_encoder("cradio-vit-b", 256, config="tiny")
    sd = src.model.state_dict()
    cpe = torch.randn(1, 8 * 8, 64, generator=g)  # a small CPE grid stands in for RADIO's 128x128
    radio = {"radio_model.model.patch_generator.embedder.weight": sd["patch_embed.proj.weight"].reshape(64, -1),
             "radio_model.model.patch_generator.pos_embed": cpe,
             "radio_model.model.patch_generator.cls_token.token": torch.cat([sd["cls_token"][0], sd["reg_token"][0]]),
             "radio_model.input_conditioner.norm_mean": torch.tensor(CLIP[0]).view(3, 1, 1),
             "radio_model.input_conditioner.norm_std": torch.tensor(CLIP[1]).view(3, 1, 1),
             "radio_model.summary_idxs": torch.tensor([0, 1])}
    radio.update({f"radio_model.model.{k}": v for k, v in sd.items() if k.startswith("blocks.")})
    save_file({k: v.contiguous() for k, v in radio.items()}, str(tmp_path / "model.safetensors"))
    for res in (256, 512):
        enc = load_encoder("cradio-vit-b", res, config="tiny", weights=tmp_path / "model.safetensors")
        grid = res // 16
        # RADIO _get_pos_embeddings (eval, CPE): interpolate to (max_dim, max_dim), bilinear,
        # align_corners=False, then window-select the top-left input_dims
        ref = F.interpolate(cpe.reshape(1, 8, 8, 64).permute(0, 3, 1, 2).float(), size=(grid, grid),
                            align_corners=False, mode="bilinear")[..., :grid, :grid]
        ref = ref.flatten(2).permute(0, 2, 1)
        torch.testing.assert_close(enc.model.pos_embed.data, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(enc.model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"], rtol=0, atol=0)


def test_sam2_release_checkpoint_loads_trunk_only(tmp_path):
    src = load_encoder("sam2-vit-s", 256, config="tiny")
    sd = {}
    for k, v in src.model.state_dict().items():
        sd["image_encoder.trunk." + k.replace("mlp.fc1", "mlp.layers.0").replace("mlp.fc2", "mlp.layers.1")] = v
    sd["image_encoder.neck.convs.0.conv.weight"] = torch.zeros(4, 4, 1, 1)
    sd["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 4)
    torch.save({"model": sd}, tmp_path / "sam2_hiera_small.pt")
    enc = load_encoder("sam2-vit-s", 256, config="tiny", seed=5, weights=tmp_path / "sam2_hiera_small.pt")
    assert enc.weights_sha256() == src.weights_sha256()


def test_clip_openai_layout_loads_into_the_quickgelu_model(tmp_path):
    src = load_encoder("clip-vit-L", 256, config="tiny")
    sd = src.model.state_dict()
    D = 64
    oa = {"visual.conv1.weight": sd["patch_embed.proj.weight"], "visual.class_embedding": sd["cls_token"].reshape(D),
          "visual.positional_embedding": sd["pos_embed"][0], "visual.ln_pre.weight": sd["norm_pre.weight"],
          "visual.ln_pre.bias": sd["norm_pre.bias"], "visual.ln_post.weight": sd["norm.weight"],
          "visual.ln_post.bias": sd["norm.bias"], "visual.proj": torch.randn(D, 8)}
    for i in range(2):
        b, r = f"blocks.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            oa[r + f"ln_1.{kind}"] = sd[b + f"norm1.{kind}"]
            oa[r + f"ln_2.{kind}"] = sd[b + f"norm2.{kind}"]
            oa[r + f"attn.out_proj.{kind}"] = sd[b + f"attn.proj.{kind}"]
            oa[r + f"mlp.c_fc.{kind}"] = sd[b + f"mlp.fc1.{kind}"]
            oa[r + f"mlp.c_proj.{kind}"] = sd[b + f"mlp.fc2.{kind}"]
        oa[r + "attn.in_proj_weight"] = sd[b + "attn.qkv.weight"]
        oa[r + "attn.in_proj_bias"] = sd[b + "attn.qkv.bias"]
    torch.save(oa, tmp_path / "ViT-L-14.pt")
    enc = load_encoder("clip-vit-L", 256, config="tiny", seed=4, weights=tmp_path / "ViT-L-14.pt")
    assert enc.weights_sha256() == src.weights_sha256()


def test_mae_release_checkpoint_resampled_at_load_as_official(tmp_path):
    import timm
    from timm.layers import resample_abs_pos_embed

    src = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0,
                            depth=2, embed_dim=64, num_heads=2)
    torch.save({"model": src.state_dict()}, tmp_path / "mae_pretrain_vit_large.pth")
    enc = load_encoder("mae-vit-l", 256, pretrained=False, weights=tmp_path / "mae_pretrain_vit_large.pth",
                       config=dict(depth=2, embed_dim=64, num_heads=2))
    ref = resample_abs_pos_embed(src.state_dict()["pos_embed"], [16, 16])  # MAEEncoder.load_model
    torch.testing.assert_close(enc.model.pos_embed.data, ref, rtol=0, atol=1e-6)


def test_dinov2_pos_embed_resampled_once_from_the_checkpoint_grid():
    """DINOv2Encoder: resample_abs_pos_embed(pos_embed 37x37, [16 * (res // 256)] * 2) on the hub model."""
    from timm.layers import resample_abs_pos_embed

    import timm

    for res in (256, 512):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            src = timm.create_model("vit_base_patch14_dinov2.lvd142m", pretrained=False, num_classes=0,
                                    img_size=518, depth=2, embed_dim=64, num_heads=2)
        enc = load_encoder("dinov2-vit-b", res, config="tiny", seed=0)
        ref = resample_abs_pos_embed(src.pos_embed.data, [16 * (res // 256)] * 2)
        torch.testing.assert_close(enc.model.pos_embed.data, ref, rtol=0, atol=1e-6)


# --------------------------------------------------------------------- real architectures


REAL = {  # name: (embed dim, token grid at 256, at 512) of the full-size model
    "mocov3-vit-s": 384, "mocov3-vit-b": 768, "mocov3-vit-l": 1024,
    "webssl-vit-dino300m_full2b_224": 1024, "webssl-vit-dino1b_full2b_224": 1536,
    "webssl-vit-dino2b_full2b_224": 2688, "webssl-vit-dino3b_full2b_224": 3072,
    "webssl-vit-dino5b_full2b_224": 3584, "webssl-vit-dino7b_full8b_224": 4096,
    "cradio-vit-b": 768, "cradio-vit-l": 1024, "cradio-vit-h": 1280, "cradio-vit-g": 1536,
    "sam2-vit-s": 768, "sam2-vit-b": 896, "sam2-vit-l": 1152, "pe-vit-t": 192, "pe-vit-tnorm": 192,
    "pe-vit-bnorm": 768, "pe-vit-gnorm": 1536,
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_new_entries_report_the_real_token_grid(name):
    """Full-size architectures on the meta device: width, and the token grid at 256 / 512 px."""
    import timm

    spec = ENCODERS[name]
    for res in (256, 512):
        kw = dict(spec.arch)
        if not spec.hierarchical:
            kw["img_size"] = spec.input_size(res)
        with torch.device("meta"):
            m = timm.create_model(spec.timm_id, pretrained=False, num_classes=0, **kw)
        if spec.hierarchical:
            dim = m.num_features
            out = m.forward_features(torch.empty(1, 3, spec.input_size(res), spec.input_size(res), device="meta"))
            grid = tuple(out.shape[1:3])
        else:
            dim, grid = m.embed_dim, tuple(m.patch_embed.grid_size)
            assert m.num_prefix_tokens == spec.num_prefix_tokens
        assert dim == REAL[name] and grid == (res // 16, res // 16), (name, res, dim, grid)
    if spec.family == "mocov3":
        assert m.blocks[0].attn.num_heads == 12 if name.endswith("-s") else True


# -------------------------------------------------------------------- names and transforms


def test_official_names_are_aliases():
    assert canonical_encoder_name("dinov2reg-vit-b") == "dinov2-vit-b-reg"
    assert canonical_encoder_name("dinov2mixed-vit-l") == "dinov2-vit-l"
    assert canonical_encoder_name("dinov2mixedreg-vit-g") == "dinov2-vit-g-reg"
    assert canonical_encoder_name("spatialpe-vit-bnorm") == "spatialpe-vit-b"
    assert canonical_encoder_name("pe-vit-bnorm") == "pe-vit-bnorm"
    assert canonical_encoder_name("siglip") == "siglip-vit-b"
    assert canonical_encoder_name("CLIP-ViT-L") == "clip-vit-L"
    assert canonical_encoder_name("vit_small_patch16_224.augreg_in21k") == "vit_small_patch16_224.augreg_in21k"
    assert resolve_encoder("dinov2reg-vit-s") is ENCODERS["dinov2-vit-s-reg"]
    # every official README name resolves
    for n in ("dino-vit-b", "dinov2-vit-g", "dinov3-vit-7b16", "webssl-vit-dino7b_full8b_224", "mocov3-vit-l",
              "clip-vit-L", "jepa-vit-h", "mae-vit-l", "siglip-vit-so400m", "siglip2-vit-g", "pe-vit-g",
              "langpe-vit-g", "spatialpe-vit-g", "sam2-vit-s", "cradio-vit-l", "pe-vit-t"):
        assert canonical_encoder_name(n) in ENCODERS, n
    assert all(v in ENCODERS for v in ALIASES.values())


def test_unknown_name_says_did_you_mean_in_one_line():
    with pytest.raises(ValueError) as err:
        canonical_encoder_name("dinov2-vit-bb")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("unknown encoder 'dinov2-vit-bb': did you mean dinov2-vit-b")
    with pytest.raises(ValueError, match=r"did you mean .*dinov2reg-vit-b"):
        canonical_encoder_name("dinov2reg-vit-bb")  # aliases are suggested too
    with pytest.raises(ValueError, match="unknown encoder 'sigclip'"):
        load_encoder("sigclip", 256, config="tiny")


def test_dinov2mixed_transform_equals_official_mixing():
    g = torch.Generator().manual_seed(0)
    patches, cls = torch.randn(2, 256, 64, generator=g), torch.randn(2, 64, generator=g)
    f = feature_transform("dinov2mixed-vit-b")
    # DINOv2MixedEncoder.forward_features, alpha = 0.1
    ref = cls[:, None, :] * 0.1 + patches * (1 - 0.1)
    torch.testing.assert_close(f(patches, cls), ref, rtol=0, atol=0)
    assert feature_transform("dinov2mixed") is f and feature_transform_name("dinov2mixedreg-vit-l") == "dinov2mixed"
    assert feature_transform("dinov2-vit-b")(patches, cls) is patches
    with pytest.raises(ValueError, match="needs the CLS token: build the store with --cls"):
        f(patches, None)
    with pytest.raises(ValueError, match="unknown encoder"):
        feature_transform("dinov9")
    # with a tiny cached encoder: the transform over (patches, cls) from the dinov2 cache
    enc = load_encoder("dinov2-vit-s-reg", 256, config="tiny")
    p, c = enc(_batch(256, 1))
    torch.testing.assert_close(feature_transform("dinov2mixedreg-vit-s")(p, c), c[:, None] * 0.1 + p * 0.9)


def test_profile_dict_is_recorded_in_describe():
    enc = load_encoder("siglip-vit-b", 256, config="tiny")
    d = enc.describe()
    assert d["preprocess"]["profile"] == "irepa" and d["preprocess"]["mean"] == list(IMNET[0])
    assert json.loads(json.dumps(d["preprocess"])) == d["preprocess"]
    nat = load_encoder("siglip-vit-b", 256, config="tiny", preprocess="native")
    assert nat.describe()["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="unknown preprocess profile 'official'"):
        load_encoder("siglip-vit-b", 256, config="tiny", preprocess="official")
    np.testing.assert_allclose(enc.mean, IMNET[0])


def test_dinov2_reg_hub_checkpoint_loads_and_resamples_as_official(tmp_path):
    """The torch.hub DINOv2-with-registers layout (cls_token, register_tokens, pos_embed with a CLS
    entry, mask_token, blocks.i.ls1.gamma): DINOv2Encoder adds pos_embed[:, 0] to the CLS token and
    resamples the 37x37 grid with resample_abs_pos_embed; timm folds the CLS entry into cls_token."""
    from timm.layers import resample_abs_pos_embed

    src = load_encoder("dinov2-vit-s-reg", 256, config="tiny").model.state_dict()
    g = torch.Generator().manual_seed(1)
    hub = {k: v for k, v in src.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    pos = torch.randn(1, 1 + 37 * 37, 64, generator=g)  # the hub model's 518-px grid, CLS entry first
    hub.update(pos_embed=pos, cls_token=torch.randn(1, 1, 64, generator=g), register_tokens=src["reg_token"],
               mask_token=torch.zeros(1, 64))
    torch.save(hub, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    for res in (256, 512):
        enc = load_encoder("dinov2-vit-s-reg", res, config="tiny", weights=tmp_path / "dinov2_vits14_reg4_pretrain.pth")
        official = resample_abs_pos_embed(pos, [16 * (res // 256)] * 2)  # DINOv2Encoder.load_model
        torch.testing.assert_close(enc.model.pos_embed.data, official[:, 1:], rtol=0, atol=1e-6)
        torch.testing.assert_close(enc.model.cls_token.data, hub["cls_token"] + official[:, :1], rtol=0, atol=1e-6)
        assert enc.profile.pos_embed["from_grid"] == [37, 37]
