"""Tiny VAE and the encoder registry: numerics against direct calls, shapes, weight loading."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from irepa.pipeline.encoders import ENCODERS, EncoderSpec, load_encoder, resolve_encoder
from irepa.pipeline.transforms import center_crop_adm
from irepa.pipeline.vae import load_vae

skdata = pytest.importorskip("skimage.data")
torch.set_num_threads(min(2, torch.get_num_threads()))


def _photos(size: int, n: int = 2) -> torch.Tensor:
    """Real photos, ADM-cropped, as uint8 [n, 3, size, size]."""
    ims = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()][:n]
    arrs = [torch.from_numpy(np.array(center_crop_adm(Image.fromarray(a), size))) for a in ims]
    return torch.stack(arrs).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------- VAE


def test_tiny_vae_encode_matches_direct_diffusers_call():
    vae = load_vae("tiny")
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor, vae.shift_factor) == (4, 8, 0.18215, 0.0)
    assert vae.id == "tiny"
    x = _photos(64)
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == torch.float32
    # reference: the raw encoder + quant_conv moments, split and exponentiated by hand
    ae = vae.vae
    with torch.no_grad():
        moments = ae.quant_conv(ae.encoder(x.float() / 127.5 - 1.0))
    ref_mean, ref_logvar = moments[:, :4], moments[:, 4:]
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(std, torch.exp(0.5 * ref_logvar.clamp(-30.0, 20.0)), rtol=1e-6, atol=1e-7)
    # and the public diffusers call
    with torch.no_grad():
        dist = ae.encode(x.float() / 127.5 - 1.0).latent_dist
    torch.testing.assert_close(mean, dist.mean, rtol=0, atol=0)
    torch.testing.assert_close(std, dist.std, rtol=0, atol=0)


def test_tiny_vae_is_deterministic_and_seeded():
    a, b, c = load_vae("tiny"), load_vae("tiny"), load_vae("tiny:3")
    assert a.weights_sha256() == b.weights_sha256() != c.weights_sha256()
    assert c.id == "tiny:3" and len(a.weights_sha256()) == 64
    with pytest.raises(ValueError, match="tiny:<integer seed>"):
        load_vae("tiny:abc")


def test_vae_decode_and_input_checks():
    vae = load_vae("tiny")
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    xf = vae.decode(z, to_uint8=False)
    xu = vae.decode(z)
    assert xf.shape == (1, 3, 32, 32) and xu.dtype == torch.uint8
    # REPA's generate.py: clamp(255 * (x + 1) / 2) truncated (not DiT's 127.5 x + 128)
    ref = np.clip(255.0 * (xf.numpy().astype(np.float64) + 1.0) / 2.0, 0, 255).astype(np.uint8)
    assert np.abs(xu.numpy().astype(int) - ref.astype(int)).max() <= 1  # float32 vs float64 at .0 edges
    assert (xu.numpy() == ref).mean() > 0.99
    edge = vae.decode(torch.zeros(1, 4, 4, 4), to_uint8=False)
    assert edge.shape == (1, 3, 32, 32)


def test_vae_runs_fp32_inside_autocast():
    """REPA encodes with the VAE in fp32: an autocast region around it must not change a bit."""
    vae = load_vae("tiny")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = vae.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean_ac, std_ac = vae.encode(images)
        z_ac = vae.decode(mean_ac, to_uint8=False)
    assert mean_ac.dtype == torch.float32
    assert torch.equal(mean, mean_ac) and torch.equal(std, std_ac)
    assert torch.equal(z_ac, vae.decode(mean, to_uint8=False))
    with pytest.raises(ValueError, match="expected uint8 images"):
        vae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by 8"):
        vae.encode(torch.zeros(1, 3, 36, 36, dtype=torch.uint8))


def test_vae_local_folder_round_trip(tmp_path):
    vae = load_vae("tiny:5")
    vae.vae.save_pretrained(tmp_path / "vae")
    again = load_vae(tmp_path / "vae")
    assert again.id == str((tmp_path / "vae").resolve())
    assert again.weights_sha256() == vae.weights_sha256()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_vae(tmp_path / "empty")


# ------------------------------------------------------------------------------ encoders


def test_registry_matches_timm_architectures():
    """Patch size, prefix tokens and mean/std in the registry are what timm builds (meta device:
    full-size architectures, no memory, no download)."""
    import timm

    pretrained = set(timm.list_models(pretrained=True))
    for name, spec in ENCODERS.items():
        if spec.weights == "timm":
            assert spec.timm_id in pretrained, name
            if spec.irepa_timm_id:
                assert spec.irepa_timm_id in pretrained, name
            cfg = timm.models.get_pretrained_cfg(spec.timm_id)
            assert spec.mean == tuple(cfg.mean) and spec.std == tuple(cfg.std), name
        else:  # MoCo v3 (--weights), WebSSL (Hugging Face): timm has the architecture, not the weights
            assert timm.is_model(spec.timm_id) and spec.family in ("mocov3", "webssl"), name
        with torch.device("meta"):
            m = timm.create_model(spec.timm_id, pretrained=False, num_classes=0, **dict(spec.arch))
        if spec.hierarchical:  # SAM2 Hiera: 4x4 stem, three 2x poolings = stride 32, no prefix tokens
            assert tuple(m.patch_embed.proj.stride) == (4, 4) and len(m.stage_ends) == 4, name
            assert spec.patch_size == 32 and spec.num_prefix_tokens == 0, name
            continue
        assert tuple(m.patch_embed.patch_size) == (spec.patch_size,) * 2, name
        assert m.num_prefix_tokens == spec.num_prefix_tokens, name
    # spot checks of the expected values
    assert ENCODERS["dinov2-vit-b-reg"].num_prefix_tokens == 5 and ENCODERS["siglip-vit-b"].num_prefix_tokens == 0
    assert ENCODERS["clip-vit-L"].mean == (0.48145466, 0.4578275, 0.40821073)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_registry_entry_builds_tiny(name):
    spec = ENCODERS[name]
    for res, tokens in ((256, 256), (512, 1024)):
        enc = load_encoder(name, resolution=res, pretrained=True, config="tiny")  # tiny never downloads
        x = torch.randint(0, 256, (1, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(res))
        patches, cls = enc(x)
        assert patches.shape == (1, tokens, 64) and patches.dtype == torch.float32
        assert torch.isfinite(patches).all()
        assert enc.token_grid == (res // 16, res // 16) and enc.dim == 64
        assert enc.input_size == (res // 16) * spec.patch_size
        assert enc.name == name and enc.timm_id == (spec.irepa_timm_id or spec.timm_id)
        if spec.num_prefix_tokens and enc.has_cls:
            assert cls is not None and cls.shape == (1, 64)
        else:
            assert cls is None
    if spec.family == "dinov2":
        assert (load_encoder(name, 256, config="tiny").input_size, enc.input_size) == (224, 448)


def test_preprocess_and_tokens_match_repa_recipe():
    """REPA: x / 255, Normalize(mean, std), F.interpolate(x, 224, mode='bicubic'); patch tokens are
    forward_features without CLS + registers (DINOv2: the same under both profiles)."""
    from torchvision.transforms import Normalize

    enc = load_encoder("dinov2-vit-b-reg", 256, config="tiny")
    x = _photos(256)
    ref_in = F.interpolate(Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x.float() / 255.0),
                           224, mode="bicubic")
    torch.testing.assert_close(enc.preprocess(x), ref_in, rtol=0, atol=1e-5)
    with torch.no_grad():
        feats = enc.model.forward_features(ref_in)
    patches, cls = enc(x)
    assert feats.shape[1] == 5 + 256
    torch.testing.assert_close(patches, feats[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls, feats[:, 0], rtol=1e-5, atol=1e-5)
    # /16 encoder at 256 px: no resize at all, only the normalisation (native: SigLIP's own 0.5 / 0.5;
    # irepa: the official release normalises SigLIP with ImageNet's mean / std)
    sig = load_encoder("siglip-vit-b", 256, config="tiny", preprocess="native")
    torch.testing.assert_close(sig.preprocess(x), (x.float() / 255.0 - 0.5) / 0.5, rtol=0, atol=1e-6)
    sig = load_encoder("siglip-vit-b", 256, config="tiny")
    torch.testing.assert_close(sig.preprocess(x), Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        x.float() / 255.0), rtol=0, atol=1e-6)
    # a bf16 model keeps float32 preprocessing and returns float32 tokens close to fp32
    half = load_encoder("dinov2-vit-b-reg", 256, config="tiny", dtype=torch.bfloat16)
    torch.testing.assert_close(half.preprocess(x), ref_in, rtol=0, atol=1e-5)
    hp, hc = half(x)
    assert hp.dtype == torch.float32 and (hp - patches).abs().mean() < 0.05 * patches.abs().mean()
    assert set(enc.describe()) == {"timm_id", "weights_sha256", "token_grid", "dim", "input_size", "preprocess"}
    assert enc.describe()["token_grid"] == [16, 16] and enc.describe()["input_size"] == 224
    with pytest.raises(ValueError, match="built for 256 px"):
        enc(torch.zeros(1, 3, 512, 512, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected uint8"):
        enc(x.float())


@pytest.mark.parametrize("name", ["dinov2-vit-b-reg", "dinov3-vit-b16", "siglip2-vit-b", "pe-vit-b"])
def test_weights_round_trip_safetensors(name, tmp_path):
    from safetensors.torch import save_file

    src = load_encoder(name, 256, config="tiny", seed=0)
    other = load_encoder(name, 256, config="tiny", seed=1)
    assert src.weights_sha256() != other.weights_sha256()
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    loaded = load_encoder(name, 256, config="tiny", seed=1, weights=path)
    assert loaded.weights_sha256() == src.weights_sha256()
    x = _photos(256, 1)
    torch.testing.assert_close(loaded(x)[0], src(x)[0], rtol=0, atol=0)


def test_weights_torch_file_wrapped_and_resampled(tmp_path):
    from timm.layers import resample_abs_pos_embed

    src = load_encoder("dinov2-vit-s", 256, config="tiny")  # 16x16 grid at 224 px
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    sd["head.weight"] = torch.zeros(10, 64)  # a classifier head is ignored
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    again = load_encoder("dinov2-vit-s", 256, config="tiny", seed=7, weights=tmp_path / "ckpt.pth")
    assert again.weights_sha256() == src.weights_sha256()
    # loaded at 512 px: the position embedding is resampled from the file's 16x16 grid to 32x32 as
    # REPA / iREPA do for DINOv2 (resample_abs_pos_embed: bicubic + antialias), under both profiles
    expect = resample_abs_pos_embed(sd["pos_embed"], [32, 32], num_prefix_tokens=1)
    for prof in ("irepa", "native"):
        big = load_encoder("dinov2-vit-s", 512, config="tiny", seed=7, weights=tmp_path / "ckpt.pth", preprocess=prof)
        torch.testing.assert_close(big.model.pos_embed.data, expect, rtol=0, atol=1e-6)
        torch.testing.assert_close(big.model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"], rtol=0, atol=0)


def test_weights_strict_errors(tmp_path):
    from safetensors.torch import save_file

    src = load_encoder("mae-vit-b", 256, config="tiny")
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    missing = dict(sd)
    del missing["blocks.1.mlp.fc2.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias"):
        load_encoder("mae-vit-b", 256, config="tiny", weights=tmp_path / "missing.safetensors")
    extra = dict(sd, **{"blocks.9.extra": torch.zeros(3)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.9\.extra"):
        load_encoder("mae-vit-b", 256, config="tiny", weights=tmp_path / "extra.safetensors")
    wrong = dict(sd, **{"blocks.0.norm1.weight": torch.zeros(32)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatches: blocks\.0\.norm1\.weight"):
        load_encoder("mae-vit-b", 256, config="tiny", weights=tmp_path / "wrong.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder("mae-vit-b", 256, config="tiny", weights=tmp_path / "nope.pt")


def test_raw_timm_id_and_bad_names():
    spec = resolve_encoder("vit_small_patch16_224.augreg_in21k")
    assert isinstance(spec, EncoderSpec) and (spec.patch_size, spec.num_prefix_tokens) == (16, 1)
    enc = load_encoder("vit_small_patch16_224.augreg_in21k", 256, config="tiny")
    patches, cls = enc(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))
    assert patches.shape == (1, 256, 64) and cls.shape == (1, 64)
    # no official formula for a raw timm id: its own (native) profile, and the manifest says why
    assert enc.profile.profile == "native" and "raw timm id" in enc.profile.notes[0]
    assert resolve_encoder("siglip") is ENCODERS["siglip-vit-b"]
    with pytest.raises(ValueError, match="unknown encoder 'dinov9'"):
        load_encoder("dinov9", 256, config="tiny")
    with pytest.raises(ValueError, match="only ViT-style"):
        resolve_encoder("resnet18.a1_in1k")
    with pytest.raises(ValueError, match="multiple of 16"):
        load_encoder("dinov2-vit-s", 250, config="tiny")
    with pytest.raises(ValueError, match="unknown config"):
        load_encoder("dinov2-vit-s", 256, config="small")
