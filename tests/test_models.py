"""SiT: config table, parameter names (REPA layout), checkpoint loading, conditioning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from irepa.trainer.models import (
    SIT_CONFIGS,
    SiT,
    build_sit,
    get_2d_sincos_pos_embed,
    load_reference_state_dict,
    sit_param_count,
    timestep_embedding,
)

torch.set_num_threads(1)

TINY = dict(hidden_size=64, depth=3, num_heads=4)


def tiny(**kw) -> SiT:
    args = dict(input_size=8, num_classes=10, z_dims=(32,), projector_dim=48, encoder_depth=2)
    args.update(kw)
    torch.manual_seed(args.pop("seed", 0))
    overrides = {k: args.pop(k) for k in list(args) if k in ("hidden_size", "depth", "num_heads", "patch_size")}
    return build_sit(args.pop("name", "SiT-B/2"), **args, **{**TINY, **overrides})


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Give the zero-initialised layers non-zero weights so that outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------- config table
def test_config_table_matches_repa():
    expected = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    assert len(SIT_CONFIGS) == 12
    for size, (d, depth, heads) in expected.items():
        for p in (2, 4, 8):
            cfg = SIT_CONFIGS[f"SiT-{size}/{p}"]
            assert cfg == dict(hidden_size=d, depth=depth, num_heads=heads, patch_size=p)


@pytest.mark.parametrize("name", sorted(SIT_CONFIGS))
def test_real_sizes_on_meta_device(name):
    size = name.split("-")[1].split("/")[0]
    p = SIT_CONFIGS[name]["patch_size"]
    with torch.device("meta"):
        model = build_sit(name, z_dims=(768,))
        n_params = sum(q.numel() for q in model.parameters())
        assert n_params == sit_param_count(name, z_dims=(768,))
        x = torch.empty(2, 4, 32, 32)
        v, h = model(x, torch.empty(2), torch.zeros(2, dtype=torch.long))
    T = (32 // p) ** 2
    assert tuple(v.shape) == (2, 4, 32, 32)
    assert tuple(h.shape) == (2, T, SIT_CONFIGS[name]["hidden_size"])
    assert model.encoder_depth == (4 if size in ("S", "B") else 8)


def test_param_counts_match_published_sizes():
    # REPA / SiT papers: S 33M, B 130M, L 458M, XL 675M (patch 2, no projector).
    published = {"SiT-S/2": 33, "SiT-B/2": 130, "SiT-L/2": 458, "SiT-XL/2": 675}
    for name, millions in published.items():
        assert round(sit_param_count(name) / 1e6) == millions, name
    # DiT-XL/2 reports 675,129,632 = sum(p.numel()) with learned sigma (8 output channels) and
    # its frozen pos_embed Parameter (256 x 1152). Here pos_embed is a buffer and there is no
    # sigma, so the final linear loses 1152 * 2 * 2 * 4 weights and 16 biases.
    assert sit_param_count("SiT-XL/2") == 675_129_632 - 256 * 1152 - (1152 * 16 + 16)


def test_build_errors():
    with pytest.raises(ValueError, match="unknown SiT model 'SiT-M/2'"):
        build_sit("SiT-M/2")
    with pytest.raises(TypeError, match="unexpected overrides"):
        build_sit("SiT-B/2", width=3)
    with pytest.raises(ValueError, match="encoder_depth must be in"):
        tiny(encoder_depth=4)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        tiny(input_size=9)
    # defaulted encoder depth is capped at the (overridden) depth
    assert tiny(encoder_depth=None, depth=2).encoder_depth == 2


# ---------------------------------------------------------------- parameter names
def repa_names(depth: int, projector_layers=("0", "2", "4"), n_proj: int = 1, qk_norm=False) -> set[str]:
    names = {
        "pos_embed",
        "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }
    for i in range(depth):
        for mod in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            names |= {f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"}
        if qk_norm:
            for mod in ("attn.q_norm", "attn.k_norm"):
                names |= {f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"}
    for k in range(n_proj):
        for layer in projector_layers:
            prefix = f"projectors.{k}.{layer}." if layer else f"projectors.{k}."
            names |= {prefix + "weight", prefix + "bias"}
    return names


def test_state_dict_names_follow_repa():
    assert set(tiny().state_dict()) == repa_names(3)
    assert set(tiny(z_dims=(32, 16)).state_dict()) == repa_names(3, n_proj=2)
    assert set(tiny(projector="conv").state_dict()) == repa_names(3, projector_layers=("",))
    assert set(tiny(projector="linear", qk_norm=True).state_dict()) == repa_names(3, ("",), qk_norm=True)
    assert set(tiny(z_dims=()).state_dict()) == repa_names(3, n_proj=0)
    # shapes REPA uses: embedding table has a null row, norms carry no parameters
    m = tiny()
    assert m.y_embedder.embedding_table.weight.shape == (11, 64)
    assert m.projectors[0][0].weight.shape == (48, 64) and m.projectors[0][4].weight.shape == (32, 48)
    # pos_embed is a (persistent) buffer, never trained
    assert "pos_embed" not in dict(m.named_parameters())


def test_pos_embed_is_sincos_table():
    D, g = 16, 3
    table = get_2d_sincos_pos_embed(D, g)
    assert table.shape == (g * g, D)
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D // 4))
    for token in range(g * g):
        row, col = divmod(token, g)
        expect = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
        np.testing.assert_allclose(table[token], expect, atol=1e-12)
    m = tiny()
    np.testing.assert_allclose(m.pos_embed[0].numpy(), get_2d_sincos_pos_embed(64, 4), atol=1e-6)


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 0.25, 1.0])
    e = timestep_embedding(t, 8)
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    args = t.numpy()[:, None] * freqs[None]
    np.testing.assert_allclose(e.numpy(), np.concatenate([np.cos(args), np.sin(args)], 1), atol=1e-6)


# ---------------------------------------------------------------- forward
def test_fresh_model_predicts_zero_and_h_is_block_output():
    m = tiny().eval()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.3, 0.9])
    y = torch.tensor([1, 2])
    v, h = m(x, t, y)
    assert torch.equal(v, torch.zeros_like(v))  # adaLN-Zero + zero output layer
    randomize(m)
    v, h = m(x, t, y)
    # recompute by hand: h is the output of block encoder_depth (1-based) = blocks[1]
    tokens = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder.embedding_table(y)
    for blk in m.blocks[:2]:
        tokens = blk(tokens, c)
    torch.testing.assert_close(h, tokens)
    for blk in m.blocks[2:]:
        tokens = blk(tokens, c)
    out = m.final_layer(tokens, c)  # [B, T, p*p*C]; unpatchify by hand
    p, C = 2, 4
    expect = out.reshape(2, 4, 4, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(2, C, 8, 8)
    torch.testing.assert_close(v, expect)
    assert m(x, t, y)[1] is not None and tiny(z_dims=())(x, t, y)[1] is None


def test_attention_backends_agree_and_qk_norm():
    m = tiny(qk_norm=True)
    randomize(m, 3)
    ref = tiny(qk_norm=True, attn="math")
    ref.load_state_dict(m.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 9])
    torch.testing.assert_close(m.eval()(x, t, y)[0], ref.eval()(x, t, y)[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attention backend"):
        tiny(attn="flash9")


def test_input_shape_and_label_errors():
    m = tiny().eval()
    with pytest.raises(ValueError, match=r"SiT expects latents \[B, 4, 8, 8\]"):
        m(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class labels must lie in"):
        m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 11]))


# ---------------------------------------------------------------- label dropout / CFG
def test_label_dropout_rate_and_null_index():
    m = tiny()
    emb = m.y_embedder
    labels = torch.randint(0, 10, (40000,))
    torch.manual_seed(123)
    dropped = emb.token_drop(labels)
    frac = (dropped == 10).float().mean().item()
    assert abs(frac - 0.1) < 0.01  # 40000 draws: sd of the fraction is 0.0015
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    # training mode drops, eval mode never does, force_drop_ids always does
    y = torch.arange(10).repeat(100)
    table = emb.embedding_table.weight
    torch.manual_seed(0)
    train_out = emb(y, train=True)
    null_rows = (train_out == table[10]).all(dim=1)
    assert 50 < null_rows.sum() < 150
    assert not (emb(y, train=False) == table[10]).all(dim=1).any()
    force = torch.zeros_like(y)
    force[::2] = 1
    forced = emb(y, train=False, force_drop_ids=force)
    assert (forced[::2] == table[10]).all() and torch.equal(forced[1::2], table[y[1::2]])
    # the model uses its own training flag
    x = torch.randn(4, 4, 8, 8)
    randomize(m)
    m.eval()
    t4 = torch.rand(4)
    a = m(x, t4, torch.tensor([1, 2, 3, 4]), force_drop_ids=torch.ones(4))[0]
    torch.testing.assert_close(a, m(x, t4, torch.full((4,), 10))[0])
    assert not torch.allclose(a, m(x, t4, torch.tensor([1, 2, 3, 4]))[0])
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape[0] == 10


# ---------------------------------------------------------------- checkpoints
def test_load_repa_and_irepa_checkpoints():
    src = tiny(seed=5)
    randomize(src, 7)
    sd = src.state_dict()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    want = src.eval()(x, t, y)

    # REPA training checkpoint: {"model", "ema", "opt", ...}, DDP prefixes on "model"
    zeroed = {"module." + k: (v if k == "pos_embed" else v * 0) for k, v in sd.items()}
    ckpt = {"model": zeroed, "ema": dict(sd), "steps": 5}
    dst = tiny(seed=6)
    report = load_reference_state_dict(dst, ckpt)
    assert report == {"missing": [], "unexpected": []}
    got = dst.eval()(x, t, y)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(dst.projectors[0](got[1]), src.projectors[0](want[1]))
    load_reference_state_dict(dst, ckpt, prefer="model")
    assert torch.equal(dst.blocks[0].attn.qkv.weight, torch.zeros_like(dst.blocks[0].attn.qkv.weight))

    # iREPA: projector wrapped as projection_layer, compiled-model prefix
    src_conv = tiny(projector="conv", seed=8)
    randomize(src_conv, 9)
    irepa = {"_orig_mod." + k.replace("projectors.0.", "projectors.0.projection_layer."): v
             for k, v in src_conv.state_dict().items()}
    assert "_orig_mod.projectors.0.projection_layer.weight" in irepa
    dst_conv = tiny(projector="conv", seed=10)
    load_reference_state_dict(dst_conv, {"model": irepa})
    torch.testing.assert_close(dst_conv.projectors[0].weight, src_conv.projectors[0].weight)


def test_load_reference_errors_are_specific():
    sd = tiny().state_dict()
    wrong_proj = tiny(projector="conv")
    with pytest.raises(ValueError, match=r"missing from checkpoint: \['projectors.0.bias', 'projectors.0.weight'\]"):
        load_reference_state_dict(wrong_proj, sd)
    bigger = tiny(hidden_size=128)
    with pytest.raises(ValueError, match=r"shape mismatch: blocks.0.adaLN_modulation.1.bias: checkpoint \[384\] vs model \[768\]"):
        load_reference_state_dict(bigger, sd, source="repa.pt")
    extra = dict(sd, **{"blocks.9.mlp.fc1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"not in model: \['blocks.9.mlp.fc1.weight'\]"):
        load_reference_state_dict(tiny(), extra)
    bad_pos = dict(sd, pos_embed=sd["pos_embed"] + 1)
    with pytest.raises(ValueError, match="pos_embed differs"):
        load_reference_state_dict(tiny(), bad_pos)
    with pytest.raises(ValueError, match="'opt' is a dict, not a tensor|entry 'opt'"):
        load_reference_state_dict(tiny(), dict(sd, opt={}))
    # a checkpoint without projectors (e.g. vanilla SiT) loads only when not strict
    no_proj = {k: v for k, v in sd.items() if not k.startswith("projectors.")}
    with pytest.raises(ValueError, match="missing from checkpoint"):
        load_reference_state_dict(tiny(), no_proj)
    report = load_reference_state_dict(tiny(), no_proj, strict=False)
    assert report["missing"] == sorted(k for k in sd if k.startswith("projectors."))
