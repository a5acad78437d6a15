"""JiT: the model against a slow reference, the objective against the published formulas, the
official sampler loop, the store checks, and a tiny JiT that memorises a few images."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irepa.trainer.align import PRESETS, resolve_align
from irepa.trainer.jit_model import JIT_CONFIGS, apply_rope, build_jit, rope_tables
from irepa.trainer.models import get_2d_sincos_pos_embed
from irepa.trainer.objectives import DataSpec, get_objective, objective_names
from irepa.trainer.objectives.jit import JiTObjective, JiTOptions, heun_sample
from irepa.trainer.store_checks import StoreMismatchError

torch.set_num_threads(1)

TINY = dict(hidden_size=32, depth=4, num_heads=2, patch_size=4, bottleneck_dim=8, in_context_len=3,
            in_context_start=1)


def tiny(**kw):
    args = dict(input_size=16, num_classes=5, z_dims=(24,), projector_dim=16, encoder_depth=3)
    args.update(kw)
    torch.manual_seed(args.pop("seed", 0))
    over = {k: args.pop(k) for k in list(args) if k in TINY}
    return build_jit(args.pop("name", "JiT-B/16"), **args, **{**TINY, **over})


def randomize(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Non-zero weights everywhere (adaLN-Zero and the output layer start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def cfg_ns(**kw):
    base = dict(model="JiT-B/16", class_dropout=0.1, attn="sdpa", hidden_size=None, depth=None, num_heads=None,
                patch_size=None, fused_align=True)
    base.update(kw)
    return types.SimpleNamespace(**base)


def objective(pixel=(3, 16, 16), grids=((4, 4),), dims=(24,), align="irepa-official-jit", opts=None, **cfg):
    tiny_cfg = dict(hidden_size=32, depth=4, num_heads=2, patch_size=4)
    tiny_cfg.update(cfg)
    data = DataSpec(pixel_shape=pixel, encoders=[f"enc{i}" for i in range(len(dims))], feature_dims=list(dims),
                    token_grids=[tuple(g) for g in grids], num_classes=5, store="stores/test-px")
    opts = opts or JiTOptions(bottleneck_dim=8, in_context_len=3, in_context_start=1)
    return JiTObjective(cfg_ns(**tiny_cfg), opts, data, resolve_align(align) if align else None, torch.device("cpu"))


# ---------------------------------------------------------------------------- config table
def test_config_table_and_published_sizes():
    expect = {"B": (768, 12, 12, 128, 4), "L": (1024, 24, 16, 128, 8), "H": (1280, 32, 16, 256, 10),
              "G": (1664, 40, 16, 256, 10)}
    assert len(JIT_CONFIGS) == 8
    for size, (d, depth, heads, bottleneck, start) in expect.items():
        for p in (16, 32):
            assert JIT_CONFIGS[f"JiT-{size}/{p}"] == dict(hidden_size=d, depth=depth, num_heads=heads, patch_size=p,
                                                          bottleneck_dim=bottleneck, in_context_len=32,
                                                          in_context_start=start)
    # the paper's parameter counts (no projector): B 131M, L 459M, H 953M, G 2B
    published = {"JiT-B/16": (131, 1e6), "JiT-L/16": (459, 1e6), "JiT-H/16": (953, 1e6), "JiT-G/16": (2, 1e9)}
    for name, (count, unit) in published.items():
        with torch.device("meta"):
            m = build_jit(name)
        n = sum(p.numel() for p in m.parameters())
        assert round(n / unit) == count, (name, n)
    # SwiGLU hidden: 2/3 of 4 x 768 = 2048
    with torch.device("meta"):
        b = build_jit("JiT-B/16")
    assert tuple(b.blocks[0].mlp.w12.weight.shape) == (4096, 768)
    assert tuple(b.blocks[0].mlp.w3.weight.shape) == (768, 2048)
    assert tuple(b.x_embedder.proj1.weight.shape) == (128, 3, 16, 16) and b.x_embedder.proj1.bias is None


@pytest.mark.parametrize("name,size", [("JiT-B/16", 256), ("JiT-B/32", 512), ("JiT-L/16", 256)])
def test_real_models_return_patch_grid_tokens(name, size):
    with torch.device("meta"):
        m = build_jit(name, input_size=size, z_dims=(768,))
        out, h = m(torch.empty(2, 3, size, size), torch.empty(2), torch.zeros(2, dtype=torch.long))
    D = JIT_CONFIGS[name]["hidden_size"]
    assert tuple(out.shape) == (2, 3, size, size)
    assert tuple(h.shape) == (2, 256, D)  # 16 x 16 grid, in-context tokens removed
    assert m.encoder_depth == (4 if "-B/" in name else 8)


def test_build_errors():
    with pytest.raises(ValueError, match="unknown JiT model 'JiT-X/16'"):
        build_jit("JiT-X/16")
    with pytest.raises(TypeError, match="unexpected overrides"):
        build_jit("JiT-B/16", width=3)
    with pytest.raises(ValueError, match="in_context_start must be in"):
        tiny(in_context_start=4)
    with pytest.raises(ValueError, match="encoder_depth must be in"):
        tiny(encoder_depth=5)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(hidden_size=36, num_heads=6)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        tiny(input_size=18)
    assert tiny(encoder_depth=None, depth=2, in_context_start=0).encoder_depth == 2


def test_parameter_names_follow_the_official_model():
    names = set(tiny().state_dict())
    assert {"x_embedder.proj1.weight", "x_embedder.proj2.weight", "x_embedder.proj2.bias", "pos_embed",
            "in_context_posemb", "y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.q_norm.weight",
            "blocks.0.attn.k_norm.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.w12.weight",
            "blocks.0.mlp.w3.weight", "blocks.0.adaLN_modulation.1.weight", "final_layer.norm_final.weight",
            "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight", "projectors.0.weight"} <= names
    assert not any("rope" in n for n in names)  # tables are rebuilt, not checkpointed
    m = tiny()
    assert m.y_embedder.embedding_table.weight.shape == (6, 32)  # null row
    np.testing.assert_allclose(m.pos_embed[0].numpy(), get_2d_sincos_pos_embed(32, 4), atol=1e-6)


# ---------------------------------------------------------------------------- RoPE
def rope_reference(x: torch.Tensor, grid: tuple[int, int], prefix: int, theta: float = 10000.0) -> torch.Tensor:
    """Explicit complex rotation per position: pair j of the first half of the head by row * f_j,
    pair j of the second half by col * f_j, f_j = theta^(-2j / (head_dim / 2)); prefix untouched."""
    hd = x.shape[-1]
    quarter = hd // 4
    out = x.clone().double()
    for n in range(prefix, x.shape[-2]):
        r, c = divmod(n - prefix, grid[1])
        for k in range(hd // 2):
            j, pos = (k, r) if k < quarter else (k - quarter, c)
            ang = pos * theta ** (-2 * j / (hd / 2))
            z = torch.complex(x[..., n, 2 * k].double(), x[..., n, 2 * k + 1].double()) * complex(math.cos(ang),
                                                                                                math.sin(ang))
            out[..., n, 2 * k], out[..., n, 2 * k + 1] = z.real, z.imag
    return out


@pytest.mark.parametrize("grid,prefix,hd", [((4, 4), 0, 16), ((3, 5), 2, 8), ((2, 2), 3, 24)])
def test_rope_matches_complex_rotation(grid, prefix, hd):
    x = torch.randn(2, 3, prefix + grid[0] * grid[1], hd)
    cos, sin = rope_tables(hd, grid, num_prefix=prefix)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), rope_reference(x, grid, prefix), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    hd, grid = 16, (6, 6)
    cos, sin = rope_tables(hd, grid)
    q, k = torch.randn(hd), torch.randn(hd)
    rot = lambda v, n: apply_rope(v[None], cos[n:n + 1], sin[n:n + 1])[0]  # noqa: E731
    idx = lambda r, c: r * grid[1] + c  # noqa: E731
    a = rot(q, idx(1, 2)) @ rot(k, idx(3, 1))
    b = rot(q, idx(2, 4)) @ rot(k, idx(4, 3))  # both shifted by (1, 2)
    c = rot(q, idx(1, 2)) @ rot(k, idx(1, 3))  # a different offset
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert abs(float(a - c)) > 1e-3


# ---------------------------------------------------------------------------- forward vs a slow reference
def _rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _mod(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def reference_forward(m, x, t, y):
    """The official forward from the parameters alone: bottleneck patch embed, sin-cos positions,
    RMSNorm / qk-norm / RoPE (explicit complex rotation) / softmax attention / SwiGLU blocks with
    adaLN-Zero, class tokens prepended by hand before block ``in_context_start``."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    x, t = x.double(), t.double()
    p, D, H = m.patch_size, m.hidden_size, m.num_heads
    hd = D // H
    gh, gw = m.grid_size
    L, start = m.in_context_len, m.in_context_start
    tok = F.conv2d(F.conv2d(x, sd["x_embedder.proj1.weight"], stride=p), sd["x_embedder.proj2.weight"],
                   sd["x_embedder.proj2.bias"]).flatten(2).transpose(1, 2)
    tok = tok + torch.from_numpy(get_2d_sincos_pos_embed(D, (gh, gw)))[None]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    yemb = sd["y_embedder.embedding_table.weight"][y]
    c = temb + yemb
    h_ref = None
    for i in range(len(m.blocks)):
        b = f"blocks.{i}."
        prefix = 0
        if L and i == start:
            tok = torch.cat([yemb[:, None, :] + sd["in_context_posemb"], tok], 1)
        if L and i >= start:
            prefix = L
        mod = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"])
        s1, sc1, g1, s2, sc2, g2 = mod.chunk(6, -1)
        a = _mod(_rms(tok, sd[b + "norm1.weight"]), s1, sc1)
        B, T, _ = a.shape
        qkv = F.linear(a, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, T, 3, H, hd)
        q, k, v = [qkv[:, :, j].transpose(1, 2) for j in range(3)]
        q = rope_reference(_rms(q, sd[b + "attn.q_norm.weight"]), (gh, gw), prefix)
        k = rope_reference(_rms(k, sd[b + "attn.k_norm.weight"]), (gh, gw), prefix)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        tok = tok + g1[:, None] * F.linear(att.transpose(1, 2).reshape(B, T, D), sd[b + "attn.proj.weight"],
                                           sd[b + "attn.proj.bias"])
        f = _mod(_rms(tok, sd[b + "norm2.weight"]), s2, sc2)
        u, gate = F.linear(f, sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]).chunk(2, -1)
        tok = tok + g2[:, None] * F.linear(F.silu(u) * gate, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        if i + 1 == m.encoder_depth:
            h_ref = tok[:, prefix:]
    tok = tok[:, L:] if L else tok
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, -1)
    out = F.linear(_mod(_rms(tok, sd["final_layer.norm_final.weight"]), shift, scale), sd["final_layer.linear.weight"],
                   sd["final_layer.linear.bias"])
    img = torch.zeros(x.shape[0], 3, gh * p, gw * p, dtype=torch.float64)
    for n in range(gh * gw):  # unpatchify token by token: values ordered (row in patch, col in patch, channel)
        r, cc = divmod(n, gw)
        img[:, :, r * p:(r + 1) * p, cc * p:(cc + 1) * p] = out[:, n].reshape(-1, p, p, 3).permute(0, 3, 1, 2)
    return img, h_ref


@pytest.mark.parametrize("encoder_depth,ic_len,ic_start", [(1, 3, 1), (2, 3, 1), (3, 3, 1), (4, 3, 0), (2, 0, 0)])
def test_forward_matches_slow_reference(encoder_depth, ic_len, ic_start):
    m = tiny(encoder_depth=encoder_depth, in_context_len=ic_len, in_context_start=ic_start, input_size=(16, 12))
    randomize(m, 2)
    with torch.no_grad():
        for n, prm in m.named_parameters():  # RMSNorm gains near 1, so that activations stay O(1)
            if "norm" in n:
                prm.add_(1.0)
    m.eval()
    x, t, y = torch.randn(2, 3, 16, 12), torch.tensor([0.2, 0.9]), torch.tensor([1, 5])
    out, h = m(x, t, y)
    ref_out, ref_h = reference_forward(m, x, t, y)
    assert tuple(h.shape) == (2, 12, 32)  # 4 x 3 patch grid; in-context tokens never reach h
    torch.testing.assert_close(h.double(), ref_h, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-4, rtol=2e-4)


def test_fresh_model_predicts_zero_and_backends_agree():
    m = tiny().eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 5])
    assert torch.equal(m(x, t, y)[0], torch.zeros_like(x))
    randomize(m, 3)
    ref = tiny(attn="math").eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x, t, y)[0], ref(x, t, y)[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attention backend"):
        tiny(attn="flash9")
    with pytest.raises(ValueError, match=r"JiT expects images \[B, 3, 16, 16\]"):
        m(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="class labels must lie in"):
        m(x, t, torch.tensor([0, 6]))


# ---------------------------------------------------------------------------- the objective
def release_loss(model, pixels, labels, drop, t, e, feats, t_eps=0.05, coeff=0.5, gamma=0.8, num_classes=5):
    """The release's Denoiser.forward (jit/denoiser.py) with its cosine projection loss, transcribed."""
    x = pixels.to(torch.float32) / 255
    x = x * 2.0 - 1.0
    labels_dropped = torch.where(drop, torch.full_like(labels, num_classes), labels)
    t = t.view(-1, 1, 1, 1)
    z = t * x + (1 - t) * e
    v = (x - z) / (1 - t).clamp_min(t_eps)
    x_pred, h = model(z, t.flatten(), labels_dropped)
    v_pred = (x_pred - z) / (1 - t).clamp_min(t_eps)
    loss = ((v - v_pred) ** 2).mean(dim=(1, 2, 3)).mean()
    proj = 0.0
    for proj_layer, f in zip(model.projectors, feats):
        f = f.float()
        zs = (f - gamma * f.mean(dim=1, keepdim=True)) / (f.std(dim=1, keepdim=True) + 1e-6)
        B, T, D = h.shape
        side = math.isqrt(T)
        zt = F.conv2d(h.reshape(B, side, side, D).permute(0, 3, 1, 2), proj_layer.weight, proj_layer.bias,
                      padding=proj_layer.weight.shape[-1] // 2).permute(0, 2, 3, 1).reshape(B, T, -1)
        proj = proj + (-(F.normalize(zs, dim=-1) * F.normalize(zt, dim=-1)).sum(-1)).mean()
    proj = proj / len(feats)
    return loss, proj, loss + coeff * proj


def test_loss_equals_release_formulas_on_fixed_draws():
    obj = objective(dims=(24, 12), grids=((4, 4), (4, 4)))
    model = obj.build_model(obj.model_config())
    randomize(model, 4, scale=0.1)
    (phase,) = obj.phases(model, {})
    assert phase.params == list(model.parameters())
    g = torch.Generator().manual_seed(7)
    B = 6
    pixels = torch.randint(0, 256, (B, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 5, (B,), generator=g)
    feats = [torch.randn(B, 16, 24, generator=g).half(), torch.randn(B, 16, 12, generator=g).half()]
    t = torch.tensor([0.02, 0.3, 0.5, 0.94, 0.97, 0.999])  # 1 - t below t_eps for the last three
    e = torch.randn(B, 3, 16, 16, generator=g) * 1.0
    drop = torch.tensor([False, True, False, False, True, False])
    out = phase.module({"pixels": pixels, "features": feats, "label": labels}, {"t": t, "e": e, "drop": drop}, {})
    mse, proj, total = release_loss(model, pixels, labels, drop, t, e, feats)
    torch.testing.assert_close(out["mse"], mse.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["align_loss"], proj.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["cosine"], -proj.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], total, atol=1e-5, rtol=1e-5)
    assert set(out) >= {"cosine/enc0", "cosine/enc1"}
    # gradients reach the network and the projectors
    out["loss"].backward()
    assert model.projectors[1].weight.grad.abs().sum() > 0 and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # without alignment the loss is the v-space MSE alone
    obj_none = objective(align=None)
    m2 = obj_none.build_model(obj_none.model_config())
    assert len(m2.projectors) == 0
    res = obj_none.phases(m2, {})[0].module({"pixels": pixels, "features": [], "label": labels},
                                            {"t": t, "e": e, "drop": drop}, {})
    assert torch.equal(res["loss"].detach(), res["mse"]) and float(res["align_loss"]) == 0.0
    with pytest.raises(ValueError, match="expects uint8 pixels"):
        phase.module({"pixels": pixels.float(), "features": feats, "label": labels}, {"t": t, "e": e, "drop": drop}, {})


def test_draw_is_the_published_distribution():
    obj = objective()
    g = torch.Generator().manual_seed(11)
    d = obj.draw(5, g, torch.device("cpu"))
    g = torch.Generator().manual_seed(11)
    t_ref = torch.sigmoid(torch.randn(5, generator=g) * 0.8 + (-0.8))
    e_ref = torch.randn(5, 3, 16, 16, generator=g) * 1.0
    drop_ref = torch.rand(5, generator=g) < 0.1
    assert torch.equal(d["t"], t_ref) and torch.equal(d["e"], e_ref) and torch.equal(d["drop"], drop_ref)
    big = obj.draw(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    logit = torch.log(big["t"] / (1 - big["t"]))
    assert abs(float(logit.mean()) + 0.8) < 0.03 and abs(float(logit.std()) - 0.8) < 0.03
    assert abs(float(big["drop"].float().mean()) - 0.1) < 0.01
    # noise scale: 1.0 at 256 px, 2.0 at 512 px, or the flag
    assert objective(pixel=(3, 256, 256)).noise_scale == 1.0
    assert objective(pixel=(3, 512, 512)).noise_scale == 2.0
    assert objective(opts=JiTOptions(noise_scale=3.0)).noise_scale == 3.0
    e512 = objective(pixel=(3, 512, 512)).draw(2, torch.Generator().manual_seed(1), torch.device("cpu"))["e"]
    g = torch.Generator().manual_seed(1)
    torch.randn(2, generator=g)
    assert torch.equal(e512, torch.randn(2, 3, 512, 512, generator=g) * 2.0)


# ---------------------------------------------------------------------------- sampling
class ToyNet(torch.nn.Module):
    """x_pred = tanh(a * z + b[y] + c * t): cheap, label- and time-dependent; records its calls."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(3, 1, 1, generator=g))
        self.b = torch.nn.Parameter(torch.randn(5, 3, 1, 1, generator=g))
        self.c = torch.nn.Parameter(torch.randn(3, 1, 1, generator=g))
        self.calls: list[tuple[float, int]] = []

    def forward(self, z, t, y):
        self.calls.append((float(t[0]), z.shape[0]))
        return torch.tanh(self.a * z + self.b[y] + self.c * t.view(-1, 1, 1, 1)), None


def official_generate(net, z, labels, steps, method, cfg, interval, t_eps=0.05, num_classes=4):
    """The release's Denoiser.generate / _euler_step / _heun_step / _forward_sample, transcribed."""
    bsz = labels.size(0)
    timesteps = torch.linspace(0.0, 1.0, steps + 1).view(-1, *([1] * z.ndim)).expand(-1, bsz, -1, -1, -1)

    def forward_sample(z, t):
        active = cfg != 1.0
        low, high = interval
        if active and ((t[0] >= high) or (low != 0 and t[0] <= low)):
            active = False
        if not active:
            x_cond, _ = net(z, t.flatten(), labels)
            return (x_cond - z) / (1.0 - t).clamp_min(t_eps)
        x_out, _ = net(torch.cat([z, z]), torch.cat([t, t]).flatten(),
                       torch.cat([labels, torch.full_like(labels, num_classes)]))
        x_cond, x_uncond = x_out.chunk(2)
        x_cfg = x_uncond + cfg * (x_cond - x_uncond)
        return (x_cfg - z) / (1.0 - t).clamp_min(t_eps)

    def euler(z, t, tn):
        return z + (tn - t) * forward_sample(z, t)

    def heun(z, t, tn):
        v_t = forward_sample(z, t)
        v_n = forward_sample(z + (tn - t) * v_t, tn)
        return z + (tn - t) * (0.5 * (v_t + v_n))

    stepper = heun if method == "heun" else euler
    for i in range(steps - 1):
        z = stepper(z, timesteps[i], timesteps[i + 1])
    return euler(z, timesteps[-2], timesteps[-1])


@pytest.mark.parametrize("method,steps,cfg,interval", [("heun", 50, 2.5, (0.1, 1.0)), ("heun", 7, 1.0, (0.1, 1.0)),
                                                       ("euler", 20, 3.0, (0.0, 0.6)), ("heun", 10, 1.7, (0.3, 0.8))])
def test_sampler_equals_official_loop(method, steps, cfg, interval):
    net = ToyNet()
    z = torch.randn(3, 3, 4, 4) * 2.0
    labels = torch.tensor([0, 3, 1])
    with torch.no_grad():
        ref = official_generate(net, z, labels, steps, method, cfg, interval)
    ref_calls = list(net.calls)
    net.calls.clear()
    out = heun_sample(net, z, labels, steps=steps, method=method, cfg_scale=cfg, interval=interval)
    assert torch.equal(out, ref)
    assert net.calls == ref_calls
    assert len(net.calls) == (2 * steps - 1 if method == "heun" else steps)


def test_guidance_interval_is_on_jit_time():
    net = ToyNet()
    heun_sample(net, torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), steps=50, cfg_scale=2.0, interval=(0.1, 1.0))
    guided = sorted({round(t, 4) for t, b in net.calls if b == 4})
    unguided = sorted({round(t, 4) for t, b in net.calls if b == 2})
    assert guided[0] == 0.12 and guided[-1] == 0.98  # t > 0.1 only (t = 1 is data; no call at t = 1)
    assert unguided == [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]


def test_objective_sample_scales_noise_and_decoder_rounds_like_the_release():
    obj = objective(pixel=(3, 512, 512), grids=((32, 32),), patch_size=32)
    net = ToyNet()
    noise = torch.randn(2, 3, 8, 8)
    out = obj.sample(net, noise, torch.tensor([1, 2]), cfg_scale=2.0, steps=5)
    torch.testing.assert_close(out, heun_sample(ToyNet(), noise * 2.0, torch.tensor([1, 2]), steps=5,
                                                cfg_scale=2.0, interval=(0.1, 1.0)))
    assert obj.noise_shape() == (3, 512, 512)
    x = torch.cat([torch.linspace(-1.2, 1.2, 997), (torch.arange(256) + 0.5) / 255 * 2 - 1])
    x = x.reshape(1, 1, 1, -1).float()
    dec = obj.decoder()
    # the release: ((x + 1) / 2) in torch, then np.round(np.clip(v * 255, 0, 255)).astype(uint8)
    ref = np.round(np.clip(((x + 1) / 2).numpy() * 255, 0, 255)).astype(np.uint8)
    assert dec(x).dtype == torch.uint8 and np.array_equal(dec(x).numpy(), ref)
    with pytest.raises(ValueError, match="uses no VAE"):
        obj.decoder("stabilityai/sd-vae-ft-ema")


# ---------------------------------------------------------------------------- config and store checks
def test_preset_options_and_registry():
    assert "jit" in objective_names() and get_objective("jit") is JiTObjective
    p = JiTObjective.preset
    assert p["betas"] == (0.9, 0.95) and p["blr"] == 5e-5 and p["warmup_epochs"] == 5
    assert p["ema"] == (0.9999, 0.9996) and p["class_dropout"] == 0.1 and p["align"] == "irepa-official-jit"
    # the release's JiT alignment: jit/configs/irepa.yaml (conv, coeff 0.5, zscore) over main_jit.py's
    # argparse defaults (kernel 3, zscore_alpha 0.8)
    a = PRESETS["irepa-official-jit"]
    assert (a.projector, a.kernel, a.spatial_norm, a.gamma, a.coeff) == ("conv", 3, "zscore", 0.8, 0.5)
    o = JiTOptions()
    assert (o.p_mean, o.p_std, o.t_eps, o.sampler, o.sampling_steps, o.interval_min, o.interval_max) == \
        (-0.8, 0.8, 0.05, "heun", 50, 0.1, 1.0)
    for bad, msg in [(dict(sampler="dpm"), "--sampler"), (dict(interval_min=0.5, interval_max=0.4), "CFG interval"),
                     (dict(t_eps=0.0), "--t-eps"), (dict(noise_scale=-1.0), "--noise-scale")]:
        with pytest.raises(ValueError, match=msg):
            JiTOptions(**bad)


def test_check_data_refuses_what_the_model_cannot_train():
    # JiT-B/32 at 512 px has a 16x16 patch grid; a store whose features sit on 32x32 cannot align to it
    obj = objective(pixel=(3, 512, 512), grids=((32, 32),), dims=(768,), hidden_size=None, depth=None,
                    num_heads=None, patch_size=None, model="JiT-B/32")
    mc = obj.model_config()
    with pytest.raises(StoreMismatchError, match=r"stores/x.*enc0 token grid 32x32 != JiT-B/32's patch grid 16x16 "
                                                 r"\(512x512 px / patch 32\)"):
        obj.check_data(mc, "stores/x")
    fits = objective(pixel=(3, 256, 256), grids=((16, 16),), dims=(768,), hidden_size=None, depth=None,
                     num_heads=None, patch_size=None)
    fits.check_data(fits.model_config(), "stores/ok")
    assert fits.model_config()["encoder_depth"] == 4
    # a store without pixels, or a model built for another resolution (e.g. a resumed checkpoint)
    no_px = objective(pixel=None)
    with pytest.raises(StoreMismatchError, match="holds no pixels.*--pixels"):
        no_px.check_data({"name": "JiT-B/16", "input_size": 16, "patch_size": 4, "z_dims": [24]}, "stores/lat")
    with pytest.raises(StoreMismatchError, match="pixels are 16x16, JiT-B/16 was built for 32x32"):
        objective().check_data({**objective().model_config(), "input_size": 32}, "stores/y")
    with pytest.raises(ValueError, match="trains a JiT model; got --model 'SiT-B/2'"):
        objective(model="SiT-B/2").model_config()


# ---------------------------------------------------------------------------- learning
def test_tiny_jit_memorises_images_and_alignment_rises():
    torch.manual_seed(0)
    N, S = 4, 16
    g = torch.Generator().manual_seed(3)
    # smooth, distinct images (a colour gradient per image) as uint8
    yy, xx = torch.meshgrid(torch.linspace(0, 1, S), torch.linspace(0, 1, S), indexing="ij")
    imgs = []
    for i in range(N):
        col = torch.rand(3, 1, 1, generator=g)
        pat = torch.sin((i + 1) * math.pi * (xx if i % 2 else yy))[None]
        imgs.append((0.5 + 0.45 * pat * (col * 2 - 1)).clamp(0, 1))
    pixels = (torch.stack(imgs) * 255).round().to(torch.uint8)
    labels = torch.arange(N)
    # "encoder" features: a fixed random map of each 4x4 patch, so that alignment is learnable
    proj = torch.randn(48, 24, generator=g)
    patches = F.unfold(pixels.float() / 127.5 - 1, 4, stride=4).transpose(1, 2)  # [N, 16, 48]
    feats = (patches @ proj).half()
    obj = objective(opts=JiTOptions(bottleneck_dim=16, in_context_len=2, in_context_start=1), hidden_size=64,
                    depth=4, num_heads=4)
    model = obj.build_model(obj.model_config())
    (phase,) = obj.phases(model, {})
    opt = torch.optim.AdamW(phase.params, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    cos = []
    for step in range(400):
        idx = torch.randint(0, N, (16,), generator=gen)
        draws = obj.draw(16, gen, torch.device("cpu"))
        out = phase.module({"pixels": pixels[idx], "features": [feats[idx]], "label": labels[idx]}, draws, {})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        cos.append(float(out["cosine"]))
    assert np.mean(cos[-50:]) > max(0.9, np.mean(cos[:20]) + 0.3), (np.mean(cos[:20]), np.mean(cos[-50:]))
    noise = torch.randn(2 * N, 3, S, S, generator=torch.Generator().manual_seed(5))
    samples = obj.decoder()(obj.sample(model, noise, torch.cat([labels, labels]), steps=20)).float()
    err = ((samples[:, None] - pixels.float()[None]) ** 2).reshape(2 * N, N, -1).mean(-1)  # [sample, image]
    own = err[torch.arange(2 * N), torch.cat([labels, labels])]
    spread = float(((pixels.float() - pixels.float().mean(0)) ** 2).mean())
    assert torch.equal(err.argmin(1), torch.cat([labels, labels])), err
    assert float(own.max()) < 0.02 * spread, (own, spread)
