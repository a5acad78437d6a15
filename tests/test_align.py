"""Alignment: projectors, spatial normalisation, presets, fused loss == reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irepa.trainer.align import (
    PRESETS,
    AlignConfig,
    AlignmentLoss,
    alignment_loss_reference,
    build_projector,
    resolve_align,
    spatial_normalize,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- projectors
def test_projector_layouts_and_shapes():
    mlp = build_projector("mlp", 16, 12, projector_dim=20)
    assert [type(m).__name__ for m in mlp] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert sorted(n for n, _ in mlp.named_parameters()) == [
        "0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features, mlp[4].out_features) == (16, 20, 20, 12)
    lin = build_projector("linear", 16, 12)
    conv = build_projector("conv", 16, 12, kernel=3, grid=(2, 3))
    assert sorted(n for n, _ in conv.named_parameters()) == ["bias", "weight"]
    assert conv.weight.shape == (12, 16, 3, 3) and conv.padding == (1, 1)
    h = torch.randn(2, 6, 16)
    for p in (mlp, lin, conv):
        assert p(h).shape == (2, 6, 12)
    with pytest.raises(ValueError, match="unknown projector kind 'gru'"):
        build_projector("gru", 16, 12)
    with pytest.raises(ValueError, match="odd"):
        build_projector("conv", 16, 12, kernel=2)
    with pytest.raises(ValueError, match="built for a 2x3 token grid got 5 tokens"):
        conv(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="square token grid"):
        build_projector("conv", 16, 12)(torch.randn(1, 6, 16))


def test_conv_projector_is_a_conv_on_the_raster_grid():
    torch.manual_seed(0)
    conv = build_projector("conv", 5, 7, kernel=3, grid=(3, 4))
    h = torch.randn(2, 12, 5)
    out = conv(h)
    # independent computation: explicit sum over the 3x3 neighbourhood with zero padding
    grid = h.reshape(2, 3, 4, 5).double()
    W, b = conv.weight.double(), conv.bias.double()
    expect = torch.zeros(2, 3, 4, 7, dtype=torch.float64)
    for i in range(3):
        for j in range(4):
            acc = b.clone().expand(2, 7).clone()
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    ii, jj = i + di, j + dj
                    if 0 <= ii < 3 and 0 <= jj < 4:
                        acc += grid[:, ii, jj] @ W[:, :, di + 1, dj + 1].T
            expect[:, i, j] = acc
    torch.testing.assert_close(out.double(), expect.reshape(2, 12, 7), atol=1e-5, rtol=1e-5)
    # kernel 1 == a per-token linear map with the same weights
    c1 = build_projector("conv", 5, 7, kernel=1, grid=(3, 4))
    torch.testing.assert_close(c1(h), h @ c1.weight[:, :, 0, 0].T + c1.bias)


# ---------------------------------------------------------------- spatial normalisation
@pytest.mark.parametrize("gamma", [1.0, 0.6, 0.0])
def test_spatial_normalize_against_numpy(gamma):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 10, 4)) * rng.uniform(0.5, 3, size=(3, 1, 4)) + rng.normal(size=(3, 1, 4)) * 2
    got = spatial_normalize(torch.tensor(z), "zscore", gamma=gamma).numpy()
    expect = np.empty_like(z)
    for b in range(3):
        for d in range(4):
            col = z[b, :, d]
            mean = col.sum() / len(col)
            std = np.sqrt(((col - mean) ** 2).sum() / (len(col) - 1))  # unbiased, as torch.std
            expect[b, :, d] = (col - gamma * mean) / (std + 1e-6)
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-12)
    if gamma == 1.0:  # per image and channel: zero mean, unit unbiased std
        np.testing.assert_allclose(got.mean(axis=1), 0, atol=1e-9)
        np.testing.assert_allclose(got.std(axis=1, ddof=1), 1, atol=1e-5)


def test_spatial_normalize_modes_and_errors():
    z = torch.randn(2, 5, 3, dtype=torch.float16)
    out = spatial_normalize(z, "none")
    assert out.dtype == torch.float32 and torch.equal(out, z.float())
    assert spatial_normalize(z, "zscore").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown spatial_norm 'l2'"):
        spatial_normalize(z, "l2")
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        spatial_normalize(torch.randn(5, 3), "zscore")


# ---------------------------------------------------------------- presets
def test_presets_fields():
    assert (PRESETS["repa"].projector, PRESETS["repa"].spatial_norm, PRESETS["repa"].coeff) == ("mlp", "none", 0.5)
    ir = PRESETS["irepa"]
    assert (ir.projector, ir.kernel, ir.spatial_norm, ir.gamma, ir.coeff) == ("conv", 3, "zscore", 1.0, 1.0)
    off = PRESETS["irepa-official-ldm"]
    assert (off.projector, off.kernel, off.spatial_norm, off.gamma, off.coeff) == ("conv", 1, "zscore", 0.6, 1.0)
    for name, cfg in PRESETS.items():
        assert cfg.preset == name and cfg.projector_dim == 2048 and cfg.encoder_depth is None


def test_resolve_align_overrides_and_errors():
    cfg = resolve_align("irepa", gamma=0.6, kernel=1, encoder_depth=None)
    assert (cfg.gamma, cfg.kernel, cfg.projector) == (0.6, 1, "conv")
    assert cfg.preset == "irepa+gamma=0.6,kernel=1"
    assert resolve_align("repa") == PRESETS["repa"]
    assert resolve_align("repa", coeff=0.5).preset == "repa"
    assert resolve_align(cfg, coeff=2.0).coeff == 2.0
    with pytest.raises(ValueError, match=r"unknown alignment preset 'irepa2'; expected one of \["):
        resolve_align("irepa2")
    with pytest.raises(ValueError, match=r"unknown alignment field\(s\) \['alpha'\]"):
        resolve_align("irepa", alpha=0.6)
    with pytest.raises(ValueError, match="unknown projector 'transformer'"):
        resolve_align("repa", projector="transformer")
    with pytest.raises(ValueError, match="odd positive"):
        resolve_align("irepa", kernel=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["repa"].coeff = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------- loss
def repa_style_loss(zs_tilde, zs):
    """REPA's SILoss projection term, written out: per-encoder, per-image token means."""
    total = 0.0
    B = zs[0].shape[0]
    for z, zt in zip(zs, zs_tilde):
        for j in range(B):
            a = F.normalize(zt[j], dim=-1)
            b = F.normalize(z[j], dim=-1)
            total = total + (-(a * b).sum(-1)).mean()
    return total / (len(zs) * B)


def make_case(kind, kernel=3, z_dims=(6, 5), B=5, grid=(3, 3), D=8, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    T = grid[0] * grid[1]
    projs = torch.nn.ModuleList(
        [build_projector(kind, D, z, kernel=kernel, projector_dim=11, grid=grid) for z in z_dims]).to(dtype)
    h = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
    targets = [torch.randn(B, T, z, dtype=dtype) * 2 + 0.5 for z in z_dims]
    return projs, h, targets


def grads(projs, h, out):
    gh, *gp = torch.autograd.grad(out["loss"], [h, *projs.parameters()])
    return gh, gp


def test_reference_matches_repa_formula():
    projs, h, targets = make_case("mlp")
    cfg = AlignConfig(projector="mlp")
    out = alignment_loss_reference(projs, h, targets, cfg)
    expect = repa_style_loss([p(h) for p in projs], targets)
    torch.testing.assert_close(out["loss"], expect)
    torch.testing.assert_close(out["cosine"], -expect.detach())
    # iREPA: spatial normalisation of the targets only, then the same cosine
    cfg = AlignConfig(projector="mlp", spatial_norm="zscore", gamma=0.6)
    out = alignment_loss_reference(projs, h, targets, cfg)
    expect = repa_style_loss([p(h) for p in projs], [spatial_normalize(z, "zscore", 0.6) for z in targets])
    torch.testing.assert_close(out["loss"], expect)


CASES = [
    ("mlp", 3, "none", 1.0, (6,)),
    ("mlp", 3, "zscore", 1.0, (6, 5)),
    ("linear", 3, "zscore", 0.6, (6, 5, 4)),
    ("conv", 1, "zscore", 0.6, (6, 5)),
    ("conv", 3, "zscore", 1.0, (6, 5)),
    ("conv", 3, "none", 1.0, (7,)),
    ("conv", 3, "zscore", 0.0, (6, 5)),
]


@pytest.mark.parametrize("kind,kernel,norm,gamma,z_dims", CASES)
@pytest.mark.parametrize("chunk", [None, 1, 2, 5])
def test_fused_equals_reference_values_and_gradients(kind, kernel, norm, gamma, z_dims, chunk):
    projs, h, targets = make_case(kind, kernel, z_dims, grid=(3, 4))
    cfg = AlignConfig(projector=kind, kernel=kernel, spatial_norm=norm, gamma=gamma)
    ref = alignment_loss_reference(projs, h, targets, cfg)
    fused = AlignmentLoss(projs, cfg, fused=True, chunk_size=chunk)(h, targets)
    torch.testing.assert_close(fused["loss"], ref["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused["per_encoder"], ref["per_encoder"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused["cosine"], ref["cosine"])
    assert not fused["cosine"].requires_grad
    gh_r, gp_r = grads(projs, h, ref)
    gh_f, gp_f = grads(projs, h, fused)
    assert gh_r.abs().sum() > 0
    torch.testing.assert_close(gh_f, gh_r, rtol=1e-10, atol=1e-12)
    assert len(gp_f) == len(gp_r) > 0
    for a, b in zip(gp_f, gp_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_float32_and_backward_accumulates_into_grad():
    projs, h, targets = make_case("mlp", dtype=torch.float32)
    cfg = AlignConfig(projector="mlp", spatial_norm="zscore")
    loss_mod = AlignmentLoss(projs, cfg)
    # combined with another loss term, exactly as the trainer does: total = mse + coeff * align
    ((h ** 2).mean() + 0.5 * loss_mod(h, targets)["loss"]).backward()
    g_fused = [h.grad.clone()] + [p.grad.clone() for p in projs.parameters()]
    h.grad = None
    for p in projs.parameters():
        p.grad = None
    ((h ** 2).mean() + 0.5 * alignment_loss_reference(projs, h, targets, cfg)["loss"]).backward()
    g_ref = [h.grad] + [p.grad for p in projs.parameters()]
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_handles_frozen_projector_and_constant_h():
    projs, h, targets = make_case("linear")
    cfg = AlignConfig(projector="linear")
    for p in projs[0].parameters():
        p.requires_grad_(False)
    out = AlignmentLoss(projs, cfg)(h, targets)
    out["loss"].backward()
    assert projs[0].weight.grad is None and projs[1].weight.grad is not None and h.grad is not None
    with torch.no_grad():
        out = AlignmentLoss(projs, cfg)(h, targets)
    assert not out["loss"].requires_grad


def saved_bytes(fn) -> tuple[int, int]:
    """Bytes autograd saves for backward while running ``fn`` (new tensors only / all)."""
    seen_new, seen_all = {}, {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        seen_all[key] = t.numel() * t.element_size()
        if not any(t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in fn.inputs):
            seen_new[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen_new.values()), sum(seen_all.values())


def test_fused_saves_no_intermediates_for_backward():
    projs, h, targets = make_case("mlp", z_dims=(6, 5), B=8, dtype=torch.float32)
    cfg = AlignConfig(projector="mlp", spatial_norm="zscore")

    def run_ref():
        alignment_loss_reference(projs, h, targets, cfg)

    def run_fused():
        AlignmentLoss(projs, cfg)(h, targets)

    params = list(projs.parameters())
    run_ref.inputs = run_fused.inputs = [h, *targets, *params]
    ref_new, _ = saved_bytes(run_ref)
    fused_new, _ = saved_bytes(run_fused)
    # reference keeps activations (2 x [B, T, 11] per MLP, projections, normalised copies);
    # the fused Function keeps only references to h and the targets
    assert ref_new > 8 * 12 * 11 * 4 * 2
    assert fused_new == 0


def test_alignment_input_errors():
    projs, h, targets = make_case("mlp")
    loss = AlignmentLoss(projs, AlignConfig())
    with pytest.raises(ValueError, match="got 1 target feature tensors for 2 projectors"):
        loss(h, targets[:1])
    with pytest.raises(ValueError, match=r"encoder 1: target features \[5, 4, 5\] do not line up with SiT tokens \[5, 9, 8\]"):
        loss(h, [targets[0], targets[1][:, :4]])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        AlignmentLoss(projs, AlignConfig(), chunk_size=0)
    assert AlignmentLoss(projs, PRESETS["irepa"]).coeff == 1.0
    # projectors belong to the model: the loss module registers no parameters of its own
    assert list(AlignmentLoss(projs, AlignConfig()).parameters()) == []


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("z_dims", [(6,), (6, 5)])
def test_fused_under_autocast_matches_reference(kind, z_dims):
    # the recompute in backward must run under the same autocast state as the forward
    projs, h, targets = make_case(kind, z_dims=z_dims, dtype=torch.float32, B=4)
    cfg = AlignConfig(projector=kind, spatial_norm="zscore")
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = AlignmentLoss(projs, cfg, fused=fused, chunk_size=4)(h, targets)
        assert out["loss"].dtype == torch.float32
        results.append((out["loss"].detach(), *grads(projs, h, out)))
    (l_r, gh_r, gp_r), (l_f, gh_f, gp_f) = results
    torch.testing.assert_close(l_f, l_r, rtol=0, atol=0)  # same ops on the same chunk
    # One encoder: bit-identical. Several: autocast caches the bf16 cast of the leaf h, so the
    # reference sums the encoders' gradients in bf16 while the fused path sums in float32.
    tol = dict(rtol=0, atol=0) if len(z_dims) == 1 else dict(rtol=1e-2, atol=2e-5)
    torch.testing.assert_close(gh_f, gh_r, **tol)
    for a, b in zip(gp_f, gp_r):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and bf16 autocast differs from float32 (so the comparison above is not vacuous)
    plain = alignment_loss_reference(projs, h, targets, cfg)["loss"].detach()
    assert not torch.equal(plain, l_r)


def test_compiled_fused_path_matches_eager_reference():
    """The torch.compile path (default on CUDA) forced on CPU: same value and gradients."""
    projs, h, targets = make_case("conv", 3, (6, 5), grid=(3, 4), dtype=torch.float32)
    cfg = AlignConfig(projector="conv", kernel=3, spatial_norm="zscore", gamma=1.0)
    ref = alignment_loss_reference(projs, h, targets, cfg)
    compiled = AlignmentLoss(projs, cfg, fused=True, chunk_size=2, compile=True)(h, targets)
    import irepa.trainer.align as align_mod

    assert align_mod._COMPILED_LOSS_SUM is not None  # the compiled function was built and used
    torch.testing.assert_close(compiled["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    gh_r, gp_r = grads(projs, h, ref)
    gh_c, gp_c = grads(projs, h, compiled)
    torch.testing.assert_close(gh_c, gh_r, rtol=1e-4, atol=1e-6)
    for a, b in zip(gp_c, gp_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
