"""Flow-matching interpolant / loss and the samplers (exact Gaussian velocity as ground truth)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from irepa.trainer.loss import FlowMatching, mean_flat
from irepa.trainer.models import build_sit
from irepa.trainer.sample import guidance_active, sample, velocity_to_score

torch.set_num_threads(1)


# ---------------------------------------------------------------- interpolant
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_endpoints_and_target_is_time_derivative(path):
    fm = FlowMatching(path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    xt0, _ = fm.interpolate(x, eps, torch.zeros(3, dtype=torch.float64))
    xt1, _ = fm.interpolate(x, eps, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(xt0, x, rtol=0, atol=1e-15)
    torch.testing.assert_close(xt1, eps, rtol=0, atol=1e-15)
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    _, target = fm.interpolate(x, eps, t)
    dt = 1e-6
    fd = (fm.interpolate(x, eps, t + dt)[0] - fm.interpolate(x, eps, t - dt)[0]) / (2 * dt)
    torch.testing.assert_close(target, fd, rtol=1e-7, atol=1e-8)
    if path == "linear":
        torch.testing.assert_close(target, eps - x)
        torch.testing.assert_close(fm.interpolate(x, eps, t)[0], (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps)


def test_time_samplers():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = FlowMatching("linear", "uniform").sample_t(5000, generator=g1)
    assert t.shape == (5000,) and t.min() >= 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    torch.testing.assert_close(t, torch.rand(5000, generator=g2))
    # log-normal sigma, t = sigma / (1 + sigma) = sigmoid(N(m, s)) on the linear path
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    t = FlowMatching("linear", "lognormal", lognormal_mean=-0.4, lognormal_std=1.3).sample_t(100, generator=g1)
    torch.testing.assert_close(t, torch.sigmoid(torch.randn(100, generator=g2) * 1.3 - 0.4))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = FlowMatching("cosine", "lognormal").sample_t(100, generator=g1)
    torch.testing.assert_close(t, 2 / math.pi * torch.atan(torch.randn(100, generator=g2).exp()))
    with pytest.raises(ValueError, match="unknown interpolant path 'vp'"):
        FlowMatching("vp")
    with pytest.raises(ValueError, match="unknown time sampler 'beta'"):
        FlowMatching("linear", "beta")


def test_flow_matching_loss_with_tiny_sit():
    torch.manual_seed(0)
    model = build_sit("SiT-S/2", input_size=8, num_classes=10, z_dims=(16,), hidden_size=32, depth=2,
                      num_heads=2, projector_dim=24, encoder_depth=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    fm = FlowMatching()
    x = torch.randn(4, 4, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    out = fm.loss(model, x, y, generator=torch.Generator().manual_seed(1))
    assert out["per_sample_mse"].shape == (4,) and out["h"].shape == (4, 16, 32) and out["t"].shape == (4,)
    # reproduce by hand from the same draws
    g = torch.Generator().manual_seed(1)
    t = torch.rand(4, generator=g)
    eps = torch.randn(x.shape, generator=g)
    tb = t.view(-1, 1, 1, 1)
    v, _ = model((1 - tb) * x + tb * eps, t, y)
    expect = ((v - (eps - x)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["t"], t)
    torch.testing.assert_close(out["per_sample_mse"], expect)
    torch.testing.assert_close(mean_flat(torch.ones(2, 3, 4) * torch.tensor([1.0, 2.0]).view(2, 1, 1)), torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------- exact Gaussian model
class GaussianVelocity(nn.Module):
    """Exact velocity of the linear path when data ~ N(mu_y, s^2) per coordinate, noise N(0, 1).

    m_t = (1 - t) mu, var_t = (1 - t)^2 s^2 + t^2 and v = E[eps - x | x_t]
    = -mu + (t - (1 - t) s^2) / var_t * (x_t - m_t). The ODE maps noise e to mu + s e.
    """

    def __init__(self, mus, s: float, num_classes: int):
        super().__init__()
        self.register_buffer("mus", torch.as_tensor(mus, dtype=torch.float64))
        self.s = s
        self.num_classes = num_classes
        self.calls: list[tuple[float, int, list[int]]] = []

    def forward(self, x, t, y):
        self.calls.append((float(t[0]), x.shape[0], y.tolist()))
        assert not self.training
        mu = self.mus[y].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        var = (1 - t) ** 2 * self.s**2 + t**2
        return -mu + (t - (1 - t) * self.s**2) / var * (x - (1 - t) * mu), None


def gaussian_score(x, t, mu, s):
    return -(x - (1 - t) * mu) / ((1 - t) ** 2 * s**2 + t**2)


def test_velocity_to_score_matches_gaussian_score():
    model = GaussianVelocity([0.7], 0.5, 1).eval()
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9, 1.0):
        tt = torch.full((3,), t, dtype=torch.float64)
        v, _ = model(x, tt, torch.zeros(3, dtype=torch.long))
        torch.testing.assert_close(velocity_to_score(v, x, tt), gaussian_score(x, t, 0.7, 0.5))


def endpoint_error(method, steps, model, z, y, mu, s):
    out = sample(model, z, y, method=method, steps=steps)
    return (out - (mu + s * z)).abs().max().item()


def test_ode_lands_on_exact_endpoint_and_heun_converges_faster():
    mu, s = 1.5, 0.4
    model = GaussianVelocity([mu], s, 1).eval()
    z = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(6, dtype=torch.long)
    euler = [endpoint_error("ode", n, model, z, y, mu, s) for n in (10, 20, 40)]
    heun = [endpoint_error("heun", n, model, z, y, mu, s) for n in (10, 20, 40)]
    assert euler[0] > euler[1] > euler[2] and heun[0] > heun[1] > heun[2]
    # first order: halving the step halves the error; second order: quarters it
    assert 1.6 < euler[1] / euler[2] < 2.5
    assert heun[1] / heun[2] > 3.2
    assert heun[2] < euler[2] / 10
    assert endpoint_error("heun", 200, model, z, y, mu, s) < 1e-4
    # model calls: Euler one per step, Heun two except on the last step (REPA)
    model.calls.clear()
    sample(model, z, y, method="heun", steps=5)
    assert len(model.calls) == 9


def test_sde_samples_the_data_distribution():
    mu, s = -0.8, 0.6
    model = GaussianVelocity([mu], s, 1).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, 1, 1, generator=g)
    y = torch.zeros(20000, dtype=torch.long)
    out = sample(model, z, y, method="sde", steps=100, generator=torch.Generator().manual_seed(1)).double()
    assert len(model.calls) == 100
    assert abs(out.mean().item() - mu) < 0.03
    assert abs(out.std().item() - s) < 0.03
    # the endpoint is not the ODE's deterministic map: noise was injected
    assert (out - (mu + s * z.double())).abs().mean() > 0.1
    # reproducible with the same generator, different with another
    a = sample(model, z[:8], y[:8], method="sde", steps=20, generator=torch.Generator().manual_seed(7))
    b = sample(model, z[:8], y[:8], method="sde", steps=20, generator=torch.Generator().manual_seed(7))
    c = sample(model, z[:8], y[:8], method="sde", steps=20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- CFG
class ConstantVelocity(nn.Module):
    def __init__(self, values, num_classes):
        super().__init__()
        self.values = torch.as_tensor(values, dtype=torch.float64)
        self.num_classes = num_classes
        self.calls: list[tuple[float, int, list[int]]] = []

    def forward(self, x, t, y):
        self.calls.append((float(t[0]), x.shape[0], y.tolist()))
        return self.values[y].view(-1, 1, 1, 1).expand_as(x).to(x.dtype), None


def test_guidance_interval_logic():
    assert guidance_active(0.5, 1.8, (0.0, 0.7)) and guidance_active(0.7, 1.8, (0.0, 0.7))
    assert not guidance_active(0.71, 1.8, (0.0, 0.7)) and not guidance_active(0.5, 1.0, (0.0, 0.7))
    assert not guidance_active(0.1, 4.0, (0.2, 1.0))
    v_c, v_u, scale = 2.0, -1.0, 1.8
    model = ConstantVelocity([v_c, 0.0, v_u], num_classes=2)  # class 0 and null class 2
    z = torch.zeros(3, 1, 2, 2)
    y = torch.zeros(3, dtype=torch.long)
    out = sample(model, z, y, method="ode", steps=8, cfg_scale=scale, guidance_interval=(0.0, 0.7))
    ts = [c[0] for c in model.calls]
    assert ts == [1 - i / 8 for i in range(8)]
    for t, batch, labels in model.calls:
        if t <= 0.7:  # t = 0.625 ... 0.125: doubled batch, null class = num_classes
            assert batch == 6 and labels == [0, 0, 0, 2, 2, 2]
        else:
            assert batch == 3 and labels == [0, 0, 0]
    guided = v_u + scale * (v_c - v_u)
    expect = -(3 * v_c + 5 * guided) / 8  # dt = -1/8 per step
    torch.testing.assert_close(out, torch.full_like(z, expect))
    # no guidance at cfg 1, whatever the interval
    model.calls.clear()
    out = sample(model, z, y, method="ode", steps=8, cfg_scale=1.0)
    assert all(b == 3 for _, b, _ in model.calls)
    torch.testing.assert_close(out, torch.full_like(z, -v_c))
    # Heun corrector uses the interval decision of the step's start time (REPA)
    model.calls.clear()
    sample(model, z, y, method="heun", steps=4, cfg_scale=scale, guidance_interval=(0.0, 0.6))
    assert [(t, b) for t, b, _ in model.calls] == [(1.0, 3), (0.75, 3), (0.75, 3), (0.5, 3), (0.5, 6), (0.25, 6), (0.25, 6)]
    # SDE: guidance on the same interval
    model.calls.clear()
    sample(model, z, y, method="sde", steps=5, cfg_scale=scale, guidance_interval=(0.0, 0.7),
           generator=torch.Generator().manual_seed(0))
    assert [b for _, b, _ in model.calls] == [3 if t > 0.7 else 6 for t, _, _ in model.calls]


def test_sampler_restores_mode_and_validates():
    model = GaussianVelocity([0.0], 1.0, 1)
    model.train()
    z = torch.randn(2, 1, 2, 2)
    y = torch.zeros(2, dtype=torch.long)
    sample(model, z, y, method="ode", steps=2)  # GaussianVelocity asserts eval mode inside
    assert model.training
    with pytest.raises(ValueError, match="unknown sampling method 'dpm'"):
        sample(model, z, y, method="dpm")
    with pytest.raises(ValueError, match="steps must be"):
        sample(model, z, y, method="sde", steps=1)


def test_sampler_runs_a_real_sit_with_cfg():
    torch.manual_seed(0)
    model = build_sit("SiT-S/2", input_size=8, num_classes=5, z_dims=(), hidden_size=32, depth=2, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    z = torch.randn(2, 4, 8, 8)
    for method in ("ode", "heun", "sde"):
        out = sample(model, z, torch.tensor([1, 4]), method=method, steps=4, cfg_scale=1.8,
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == z.shape and out.dtype == z.dtype and torch.isfinite(out).all()
