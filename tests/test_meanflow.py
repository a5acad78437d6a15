"""MeanFlow objective: two-time SiT, draws, JVP, the release's loss, DDP gradients, learning, sampling.

The loss is checked against a direct transcription of the official release's ``MeanFlow.forward``
(Gsunshine/meanflow, meanflow.py) written below with an independent JVP
(``torch.autograd.functional.jvp``) and a single pass whose primal carries the gradient, as JAX's
``jax.jvp`` does there.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irepa.trainer.align import resolve_align
from irepa.trainer.config import TrainConfig
from irepa.trainer.data import LatentNorm
from irepa.trainer.models import build_sit, load_reference_state_dict, sit_param_count
from irepa.trainer.objectives import DataSpec, get_objective, objective_names
from irepa.trainer.objectives.meanflow import (GUIDANCE_PRESETS, MeanFlow, MeanFlowLoss, MeanFlowOptions,
                                               math_attention, meanflow_sample, resolve_options)
from train_helpers import one_thread  # noqa: F401 (autouse fixture)

TINY = dict(model="SiT-S/2", hidden_size=32, depth=2, num_heads=2, projector_dim=32)


def randomize(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Non-zero weights everywhere (adaLN-Zero would make u = 0 and every derivative trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype))


def make_objective(align: str = "irepa", c: int = 4, hw: int = 4, d: int = 16, n_enc: int = 1, opts=None,
                   **cfg_kw) -> MeanFlow:
    kw = dict(TINY, **cfg_kw)
    cfg = TrainConfig(**kw)
    grid = (hw // 2, hw // 2)
    data = DataSpec(latent_shape=(2 * c, hw, hw), encoders=[f"e{i}" for i in range(n_enc)] if align != "none" else [],
                    feature_dims=[d] * n_enc if align != "none" else [], token_grids=[grid] * n_enc,
                    num_classes=4, latent_norm=LatentNorm("sd", 0.18215, 0.0), vae={"id": "tiny"}, store="test")
    al = None if align == "none" else resolve_align(align, projector_dim=cfg.projector_dim)
    return get_objective("meanflow")(cfg, opts if opts is not None else MeanFlowOptions(), data, al,
                                     torch.device("cpu"))


def two_time_model(dtype=torch.float64, attn="math", seed=0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_sit("SiT-S/2", input_size=4, in_channels=4, num_classes=4, z_dims=kw.pop("z_dims", ()),
                  hidden_size=32, depth=2, num_heads=2, attn=attn, time_conditions=("t", "t-r"), **kw)
    randomize(m, seed + 1, 0.1)
    return m.to(dtype)


def resolved(**kw) -> MeanFlowOptions:
    return resolve_options(MeanFlowOptions(**kw), "SiT-B/2")


# ----------------------------------------------------------------------------- model


def test_two_time_sit_keeps_flow_keys_and_inits_h_embedder_as_release():
    flow = build_sit("SiT-B/2", input_size=8, z_dims=(16,), hidden_size=64, depth=2, num_heads=2)
    mf = build_sit("SiT-B/2", input_size=8, z_dims=(16,), hidden_size=64, depth=2, num_heads=2,
                   time_conditions=("t", "t-r"))
    fk, mk = set(flow.state_dict()), set(mf.state_dict())
    assert fk < mk and sorted(mk - fk) == ["h_embedder.mlp.0.bias", "h_embedder.mlp.0.weight",
                                           "h_embedder.mlp.2.bias", "h_embedder.mlp.2.weight"]
    assert "time_conditions" not in flow.build_kwargs and mf.build_kwargs["time_conditions"] == ["t", "t-r"]
    assert sum(p.numel() for p in mf.parameters()) == sit_param_count(
        "SiT-B/2", input_size=8, z_dims=(16,), hidden_size=64, depth=2, num_heads=2, time_conditions=("t", "t-r"))
    # the release's init of the h embedder: N(0, 0.02) weights, zero biases (as its t embedder)
    for i in (0, 2):
        w, b = mf.h_embedder.mlp[i].weight, mf.h_embedder.mlp[i].bias
        assert abs(w.std().item() - 0.02) < 0.004 and torch.count_nonzero(b) == 0
    # a flow SiT checkpoint initialises every shared part; only the h embedder is left
    info = load_reference_state_dict(mf, flow.state_dict(), strict=False)
    assert info["missing"] == sorted(mk - fk) and info["unexpected"] == []
    for k, v in flow.state_dict().items():
        assert torch.equal(mf.state_dict()[k], v), k
    # flow refuses r; the two-time model needs it
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="conditioned on t only"):
        flow(x, t, y, r=t)
    with pytest.raises(ValueError, match="pass the second time r"):
        mf(x, t, y)
    with pytest.raises(ValueError, match="time_conditions must be"):
        build_sit("SiT-S/2", input_size=8, time_conditions=("t-r",))


def test_parameter_counts_match_the_paper():
    """The paper's Table 4 sizes (M params, rounded): B/4 131, B/2 131, L/2 459, XL/2 676."""
    for name, m in (("SiT-B/4", 131), ("SiT-B/2", 131), ("SiT-L/2", 459), ("SiT-XL/2", 676)):
        assert round(sit_param_count(name, z_dims=(), time_conditions=("t", "t-r")) / 1e6) == m, name
    assert round(sit_param_count("SiT-XL/2", z_dims=()) / 1e6) == 675  # the flow SiT: one embedder less


def test_two_time_condition_is_t_plus_h_of_t_minus_r_plus_y():
    m = two_time_model(torch.float32, z_dims=(8,), encoder_depth=1)
    x, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 3, 4])
    t, r = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.1, 0.5, 0.0])
    u, h = m(x, t, y, r=r)
    c = m.t_embedder(t) + m.h_embedder(t - r) + m.y_embedder.embedding_table(y)
    tokens = m.blocks[0](m.x_embedder(x) + m.pos_embed, c)
    torch.testing.assert_close(h, tokens)
    tokens = m.blocks[1](tokens, c)
    out = m.final_layer(tokens, c).reshape(3, 2, 2, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(3, 4, 4, 4)
    torch.testing.assert_close(u, out)


# ----------------------------------------------------------------------------- options and draws


def test_presets_resolve_by_model_and_flags_win():
    assert resolve_options(MeanFlowOptions(), "SiT-B/2").mf_cfg_k == 0.5
    l2 = resolve_options(MeanFlowOptions(), "SiT-L/2")
    assert (l2.mf_preset, l2.mf_cfg_w, l2.mf_cfg_k, l2.mf_cfg_t_min, l2.mf_cfg_t_max) == ("l2", 0.2, 0.92, 0.0, 0.8)
    assert resolve_options(MeanFlowOptions(), "SiT-XL/2").mf_cfg_t_max == 0.75
    o = resolve_options(MeanFlowOptions(mf_preset="l2", mf_cfg_w=0.5), "SiT-B/2")
    assert (o.mf_preset, o.mf_cfg_w, o.mf_cfg_k) == ("l2", 0.5, 0.92)
    assert GUIDANCE_PRESETS["b2"].effective_scale == 2.0
    assert GUIDANCE_PRESETS["l2"].effective_scale == pytest.approx(2.5)
    for bad, msg in [(dict(mf_preset="b3"), "--mf-preset 'b3'"), (dict(mf_ratio=1.5), "--mf-ratio"),
                     (dict(mf_time_dist="beta"), "--mf-time-dist"), (dict(mf_adaptive_c=0.0), "--mf-adaptive-c"),
                     (dict(mf_cfg_t_min=0.9, mf_cfg_t_max=0.1), "--mf-cfg-t-min")]:
        with pytest.raises(ValueError, match=msg.replace("-", "[-]")):
            MeanFlowOptions(**bad)
    with pytest.raises(ValueError, match="needs the null class: --class-dropout > 0"):
        make_objective(class_dropout=0.0)
    make_objective(class_dropout=0.0, opts=MeanFlowOptions(mf_preset="unguided"))
    assert "meanflow" in objective_names() and get_objective("meanflow") is MeanFlow
    assert MeanFlow.preset["betas"] == (0.9, 0.95)  # the release's Adam b2


def test_draws_follow_the_release():
    obj = make_objective(align="none")
    B = 20000
    d = obj.draw(B, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert {k: tuple(v.shape) for k, v in d.items()} == {
        "post": (B, 4, 4, 4), "t": (B,), "r": (B,), "eps": (B, 4, 4, 4), "drop": (B,)}
    assert bool((d["r"] <= d["t"]).all()) and bool(((d["t"] > 0) & (d["t"] < 1)).all())
    eq = d["r"] == d["t"]
    assert int(eq.sum()) == int(B * 0.75)  # an exact fraction, as the release's first-rows mask
    assert bool(eq[d["drop"]].all())  # dropped rows are r = t rows (the release drops the first rows)
    assert abs(d["drop"].float().mean().item() - 0.1) < 0.01
    # t and r: the max and min of two logit-normal(-0.4, 1) draws
    logit = lambda p: torch.log(p) - torch.log1p(-p)  # noqa: E731
    both = torch.cat([logit(d["t"][~eq]), logit(d["r"][~eq])])
    assert abs(both.mean().item() + 0.4) < 0.05 and abs(both.std().item() - 1.0) < 0.05
    # the same generator state gives the same draw; the batch order of rows is random
    again = obj.draw(B, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert 0.6 < eq[: B // 2].float().mean().item() < 0.9


# ----------------------------------------------------------------------------- JVP


@pytest.mark.parametrize("attn", ["math", "sdpa"])
def test_du_dt_equals_central_difference(attn):
    """du/dt along (v_g, 1, 0) = a central finite difference of u (float64, 1e-6)."""
    m = two_time_model(torch.float64, attn=attn)
    loss = MeanFlowLoss(m, resolved())
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 4, 4, 4, generator=g, dtype=torch.float64)
    vg = torch.randn(4, 4, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.35, 0.8], dtype=torch.float64)
    r = torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 4, 3])
    du = loss.du_dt(z, t, r, vg, y)
    assert all(a.backend == attn for a in (b.attn for b in m.blocks))  # the math switch is undone
    keep = torch.zeros_like(y)
    with torch.no_grad():
        u = lambda s: m(z + s * vg, t + s, y, force_drop_ids=keep, r=r)[0]  # noqa: E731
        h = 1e-5
        fd = (u(h) - u(-h)) / (2 * h)
    assert du.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(du, fd, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the loss vs the release


def official_meanflow_loss(net, x, e, t, r, labels, drop, num_classes, omega, kappa, t_start, t_end,
                           norm_p=1.0, norm_eps=0.01):
    """Direct transcription of the release's MeanFlow.forward (guidance_eq='cfg') for given draws.

    ``net(x, t, h, y)`` is the release's DiT call (h = t - r); ``drop`` replaces the release's
    first-``num_drop``-rows mask. JAX's ``jax.jvp`` primal carries the gradient; here
    ``torch.autograd.functional.jvp(create_graph=True)`` does the same."""
    bz = x.shape[0]
    t4, r4 = t.reshape(bz, 1, 1, 1), r.reshape(bz, 1, 1, 1)
    c = lambda a: torch.tensor(a, dtype=x.dtype)  # noqa: E731 - jnp.where's scalars, in x's precision
    z_t = (1 - t4) * x + t4 * e
    v = e - x

    def v_fn(z, tt, y):
        return net(z, tt.reshape(bz), torch.zeros_like(tt).reshape(bz), y)

    with torch.no_grad():  # the release's guidance output only enters the stop-gradient target
        if kappa == 0:
            y_null = torch.full((bz,), num_classes)
            v_uncond = v_fn(z_t, t4, y_null)
            om = torch.where((t4 >= t_start) & (t4 <= t_end), c(omega), c(1.0))
            v_g = v_uncond + om * (v - v_uncond)
        else:
            y_null = torch.full((bz,), num_classes)
            v_uncond = v_fn(z_t, t4, y_null)
            v_cond = v_fn(z_t, t4, labels)
            om = torch.where((t4 >= t_start) & (t4 <= t_end), c(omega), c(1.0))
            ka = torch.where((t4 >= t_start) & (t4 <= t_end), c(kappa), c(0.0))
            v_g = om * v + (1 - om - ka) * v_uncond + ka * v_cond
    dm = drop.reshape(bz, 1, 1, 1)
    y_inp = torch.where(drop, num_classes, labels)
    v_g = torch.where(dm, v, v_g)

    def u_fn(z, tt, rr):
        return net(z, tt.reshape(bz), (tt - rr).reshape(bz), y_inp)

    u, du_dt = torch.autograd.functional.jvp(u_fn, (z_t, t4, r4), (v_g, torch.ones_like(t4), torch.zeros_like(r4)),
                                             create_graph=True)
    u_tgt = (v_g - torch.clip(t4 - r4, 0.0, 1.0) * du_dt).detach()
    loss = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3))
    adp_wt = (loss + norm_eps) ** norm_p
    loss = loss / adp_wt.detach()
    return loss.mean()


@pytest.mark.parametrize("preset,over", [("b2", {}), ("l2", {}), ("b2", dict(mf_cfg_w=2.0, mf_cfg_k=0.0)),
                                         ("unguided", {}), ("b2", dict(mf_adaptive_p=0.5, mf_adaptive_c=0.1))])
def test_loss_and_gradient_equal_the_release_formula(preset, over):
    m = two_time_model(torch.float64)
    opts = resolve_options(MeanFlowOptions(mf_preset=preset, **over), "SiT-B/2")
    ours = MeanFlowLoss(m, opts)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64)
    e = torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.95, 0.85, 0.7, 0.5, 0.3, 0.9], dtype=torch.float64)  # 0.85 / 0.9 / 0.95: outside l2's window
    r = torch.tensor([0.95, 0.2, 0.7, 0.1, 0.0, 0.4], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    drop = torch.tensor([True, False, False, False, True, False])
    res = ours.compute(x, y, t, r, e, drop)
    m.zero_grad()
    res["loss"].backward()
    g_ours = {k: p.grad.clone() for k, p in m.named_parameters()}

    keep = torch.zeros(6, dtype=torch.long)

    def net(xx, tt, hh, yy):
        return m(xx, tt, yy, force_drop_ids=keep, r=tt - hh)[0]

    m.zero_grad()
    ref = official_meanflow_loss(net, x, e, t, r, y, drop, 4, opts.mf_cfg_w, opts.mf_cfg_k, opts.mf_cfg_t_min,
                                 opts.mf_cfg_t_max, opts.mf_adaptive_p, opts.mf_adaptive_c)
    ref.backward()
    assert res["loss"].item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    for k, p in m.named_parameters():
        torch.testing.assert_close(g_ours[k], p.grad, rtol=1e-8, atol=1e-12, msg=k)
    assert float(res["align_loss"]) == 0.0 and set(res) >= {"loss", "mf_loss", "mse", "v_loss", "align_loss", "cosine"}


def test_guidance_is_skipped_when_unguided_and_uses_release_weights():
    m = two_time_model(torch.float64)
    calls = []
    m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    e, t, r = torch.randn_like(x), torch.full((3,), 0.5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    y, drop = torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.bool)
    MeanFlowLoss(m, resolved(mf_preset="unguided")).compute(x, y, t, r, e, drop)
    n_unguided = len(calls)
    calls.clear()
    MeanFlowLoss(m, resolved(mf_preset="b2")).compute(x, y, t, r, e, drop)
    assert calls[0] == 6 and len(calls) == n_unguided + 1  # one 2B guidance pass (u_null, u_cond)
    calls.clear()
    MeanFlowLoss(m, resolved(mf_preset="b2", mf_cfg_k=0.0, mf_cfg_w=2.0)).compute(x, y, t, r, e, drop)
    assert calls[0] == 3  # k = 0: only the unconditional velocity


# ----------------------------------------------------------------------------- DDP


def _ddp_setup(out: Path):
    """Objective, model and one global step's data, identical in every process."""
    obj = make_objective(align="irepa")
    torch.manual_seed(0)
    model = obj.build_model(obj.model_config())
    randomize(model, 2, 0.05)
    B = 8
    d = obj.draw(B, torch.Generator().manual_seed(11), torch.device("cpu"))
    g = torch.Generator().manual_seed(12)
    batch = {"latents": torch.cat([torch.randn(B, 4, 4, 4, generator=g), torch.full((B, 4, 4, 4), 0.05)], 1),
             "label": torch.arange(B) % 4, "features": [torch.randn(B, 4, 16, generator=g)]}
    return obj, model, d, batch


def _rows(tree, sl):
    if isinstance(tree, dict):
        return {k: _rows(v, sl) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_rows(v, sl) for v in tree]
    return tree[sl]


def _ddp_worker(out: str) -> None:
    """torchrun entry: 2 ranks x 2 micro-batches of 2 rows, DDP over the phase module as the loop wraps it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    obj, model, d, batch = _ddp_setup(Path(out))
    phase = obj.phases(model, {})[0]
    runner = DDP(phase.module, broadcast_buffers=False)
    accum, micro = 2, 2
    losses = []
    for mi in range(accum):
        lo = rank * accum * micro + mi * micro
        sl = slice(lo, lo + micro)
        ctx = runner.no_sync() if mi < accum - 1 else torch.enable_grad()
        with ctx:
            res = runner(_rows(batch, sl), _rows(d, sl), {})
            (res["loss"] / accum).backward()
        losses.append(float(res["loss"]))
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    torch.save({"grads": grads, "losses": torch.tensor(losses)}, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_ddp_gradients_equal_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--ddp-worker", str(tmp_path)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    obj, model, d, batch = _ddp_setup(tmp_path)
    phase = obj.phases(model, {})[0]
    out = phase.module(batch, d, {})
    out["loss"].backward()
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert float(out["align_loss"]) != 0.0
    # the global loss is the mean of the 4 micro-batch losses
    mean_loss = torch.cat([r0["losses"], r1["losses"]]).mean().item()
    assert mean_loss == pytest.approx(out["loss"].item(), rel=1e-5)
    n_nonzero = 0
    for k, p in model.named_parameters():
        torch.testing.assert_close(r0["grads"][k], p.grad, rtol=1e-4, atol=1e-7, msg=k)
        assert torch.equal(r0["grads"][k], r1["grads"][k]), k  # all-reduced: every rank holds the same
        n_nonzero += int(p.grad.abs().sum() > 0)
    assert n_nonzero == len(list(model.parameters()))  # h embedder and projector included


# ----------------------------------------------------------------------------- learning


def _alignable(n=8, c=4, hw=4, d=16, seed=0):
    """Fixed latents and features that are a linear map of each token's latent patch (alignable)."""
    rng = np.random.default_rng(seed)
    g = hw // 2
    mean = rng.normal(0, 1, (n, c, hw, hw)).astype(np.float32)
    patches = mean.reshape(n, c, g, 2, g, 2).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * 4)
    feats = (patches @ rng.normal(0, 1, (c * 4, d))).astype(np.float32)
    return torch.from_numpy(mean), torch.from_numpy(feats)


def _train(align: str, steps: int, lr: float, hidden: int = 64, repeat: int = 1, log_every: int = 10):
    """A plain AdamW loop over the phase (what the train loop does, minus DDP / EMA / logging), with
    the objective's train defaults (betas (0.9, 0.95), no clipping). ``repeat`` copies of the 8
    latents per batch: more (t, r) draws per step at almost no cost on CPU (overhead-bound)."""
    obj = make_objective(align=align, hidden_size=hidden, projector_dim=64)
    obj.data.latent_norm = LatentNorm("stats", [1.0] * 4, [0.0] * 4)  # latents already ~N(0, 1)
    torch.manual_seed(0)
    model = obj.build_model(obj.model_config())
    init = obj.build_model(obj.model_config())
    init.load_state_dict(model.state_dict())
    phase = obj.phases(model, {})[0]
    opt = torch.optim.AdamW(phase.params, lr=lr, betas=MeanFlow.preset["betas"], weight_decay=0.0)
    assert MeanFlow.preset["grad_clip"] == 0.0
    mean, feats = _alignable()
    n = mean.shape[0] * repeat
    batch = {"latents": torch.cat([mean, torch.full_like(mean, 0.01)], 1).repeat(repeat, 1, 1, 1),
             "label": (torch.arange(mean.shape[0]) % 4).repeat(repeat),
             "features": [feats.repeat(repeat, 1, 1)] if align != "none" else []}
    cos = []
    for step in range(steps):
        d = obj.draw(n, torch.Generator().manual_seed(step), torch.device("cpu"))
        res = phase.module(batch, d, {})
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        opt.step()
        if step % log_every == 0:
            cos.append(float(res["cosine"]))
    return obj, model, init, mean, cos


def _nn_error(obj, model, mean, steps=1):
    z = torch.randn((8, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 4
    s = obj.sample(model, z, y, steps=steps)
    return ((s[:, None] - mean[None]) ** 2).flatten(2).mean(-1).min(1).values.mean().item()


def test_learns_latents_in_one_step_and_irepa_aligns():
    obj, model, init, mean, cos = _train("irepa", steps=350, lr=3e-3, repeat=4)
    e_init, e_1, e_2 = _nn_error(obj, init, mean), _nn_error(obj, model, mean), _nn_error(obj, model, mean, 2)
    assert e_1 < 0.3 * e_init and e_2 < 0.3 * e_init, (e_1, e_2, e_init)
    assert np.mean(cos[-5:]) > max(0.8, cos[0] + 0.3), cos


def test_repa_alignment_cosine_rises():
    *_, cos = _train("repa", steps=120, lr=3e-3, hidden=32, log_every=5)
    assert np.mean(cos[-3:]) > cos[0] + 0.2, cos


# ----------------------------------------------------------------------------- sampling and the rest


def test_sampler_steps_and_test_time_cfg():
    m = two_time_model(torch.float64)
    z, y = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    m.train()
    one = meanflow_sample(m, z, y)
    assert m.training  # mode restored
    m.eval()

    def u(x, t, r, yy):
        return m(x, torch.full((3,), t, dtype=x.dtype), yy, r=torch.full((3,), r, dtype=x.dtype))[0]

    with torch.no_grad():
        torch.testing.assert_close(one, z - u(z, 1.0, 0.0, y))  # z0 = z1 - u(z1, r=0, t=1)
        mid = z - 0.5 * u(z, 1.0, 0.5, y)
        torch.testing.assert_close(meanflow_sample(m, z, y, steps=2), mid - 0.5 * u(mid, 0.5, 0.0, y))
        null = torch.full_like(y, 4)
        guided = z - (u(z, 1.0, 0.0, null) + 1.5 * (u(z, 1.0, 0.0, y) - u(z, 1.0, 0.0, null)))
        torch.testing.assert_close(meanflow_sample(m, z, y, cfg_scale=1.5), guided)
    obj = make_objective(align="none")
    assert obj.noise_shape() == (4, 4, 4)
    torch.testing.assert_close(obj.sample(m, z, y, method="ode"), one)
    with pytest.raises(ValueError, match="'sde' is a flow sampler"):
        obj.sample(m, z, y, method="sde")


def test_decoder_and_model_config_and_store_checks():
    from irepa.trainer.store_checks import StoreMismatchError

    obj = make_objective(align="irepa")
    mc = obj.model_config()
    assert mc["time_conditions"] == ["t", "t-r"] and mc["z_dims"] == [16] and mc["projector"] == "conv"
    json.dumps(mc)  # checkpointable
    model = obj.build_model(mc)
    assert model.build_kwargs == mc
    obj.check_data(mc, "store S")
    with pytest.raises(StoreMismatchError, match="store S does not fit.*token grid 2x2 != the model's patch grid 1x1"):
        obj.check_data(dict(mc, patch_size=4), "store S")
    with pytest.raises(StoreMismatchError, match="latent channel count 4 != 8"):
        obj.check_data(dict(mc, in_channels=8), "store S")
    images = obj.decoder()(torch.randn(2, 4, 4, 4))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    # every alignment preset builds and trains a step
    for preset in ("repa", "irepa", "irepa-official-ldm", "irepa-official-jit", "none"):
        o = make_objective(align=preset, n_enc=2)
        mdl = o.build_model(o.model_config())
        randomize(mdl, 3, 0.05)
        ph = o.phases(mdl, {})[0]
        d = o.draw(4, torch.Generator().manual_seed(0), torch.device("cpu"))
        b = {"latents": torch.randn(4, 8, 4, 4).abs(), "label": torch.arange(4),
             "features": [torch.randn(4, 4, 16) for _ in o.data.encoders]}
        res = ph.module(b, d, {})
        res["loss"].backward()
        assert math.isfinite(res["loss"].item())
        if preset != "none":
            assert res["align_loss"] != 0 and {"cosine/e0", "cosine/e1"} <= set(res)
            assert all(p.grad is not None for p in mdl.projectors.parameters())


def test_compile_runs_the_jvp_eagerly_and_matches_eager():
    """--compile: the phase compiles (guidance + gradient pass); the JVP is excluded and eager."""
    pytest.importorskip("torch._inductor")
    obj = make_objective(align="irepa")
    model = obj.build_model(obj.model_config())
    randomize(model, 4, 0.05)
    phase = obj.phases(model, {})[0]
    d = obj.draw(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    b = {"latents": torch.randn(4, 8, 4, 4).abs(), "label": torch.arange(4), "features": [torch.randn(4, 4, 16)]}
    eager = phase.module(b, d, {})
    compiled = torch.compile(phase.module, backend="aot_eager")(b, d, {})
    torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_jvp_and_step():
    """The bf16 path (CUDA's autocast, here on CPU): the JVP's tangents follow the bf16 primals and
    du/dt stays close to float32's; a full step runs and back-propagates."""
    m = two_time_model(torch.float32, attn="sdpa")
    opts = resolved()
    fp32, bf16 = MeanFlowLoss(m, opts), MeanFlowLoss(m, opts, amp_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    z, vg = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g)
    t, r, y = torch.tensor([0.9, 0.6, 0.4, 0.8]), torch.tensor([0.1, 0.6, 0.3, 0.0]), torch.tensor([0, 1, 4, 3])
    ref, low = fp32.du_dt(z, t, r, vg, y), bf16.du_dt(z, t, r, vg, y)
    assert low.dtype == torch.float32
    assert ((low - ref).norm() / ref.norm()).item() < 0.05
    res = bf16.compute(z, y, t, r, vg, torch.tensor([False, True, False, False]))
    res["loss"].backward()
    assert math.isfinite(res["loss"].item()) and all(p.grad is not None for p in m.parameters())


def test_math_attention_context_restores_backends():
    m = two_time_model(torch.float32, attn="sdpa")
    with math_attention(m):
        assert all(b.attn.backend == "math" for b in m.blocks)
    assert all(b.attn.backend == "sdpa" for b in m.blocks)


if __name__ == "__main__" and "--ddp-worker" in sys.argv:
    _ddp_worker(sys.argv[sys.argv.index("--ddp-worker") + 1])
