"""``--objective meanflow`` through the real training loop (``irepa.trainer.train.run`` and the CLIs).

tests/test_meanflow.py checks the objective's pieces (draws, JVP, the release's loss, DDP gradients
of the phase module); this file checks the loop's guarantees for it, as tests/test_train.py does
for flow: exact resume, N ranks == 1 rank, fused == plain alignment, learning on a tiny store,
preview grids and ``irepa-sample`` (1-NFE / 2-NFE), ``--init-from`` a flow SiT, ``--compile``.
Configs go through ``resolve_train`` (what the CLI does), so the objective's preset (Adam betas
(0.9, 0.95), no clipping, 1-NFE previews) applies as for a user.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irepa.stores.testing import make_synthetic_store
from irepa.trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from irepa.trainer.config import resolve_train
from irepa.trainer.data import LatentNorm, mix_seed
from irepa.trainer.models import build_sit
from irepa.trainer.objectives.meanflow import meanflow_sample
from irepa.trainer.train import run
from train_helpers import learnable_store, metrics, one_thread, torchrun_2ranks  # noqa: F401 (one_thread: autouse fixture)

TINY = dict(model="SiT-S/2", hidden_size=32, depth=2, num_heads=2, projector_dim=32)
#: every scalar the MeanFlow phase logs for a one-encoder store, plus the loop's grad norm
LOGGED = ("loss", "mf_loss", "mse", "v_loss", "align_loss", "cosine", "grad_norm")


def mf(**flags) -> tuple:
    """(TrainConfig, MeanFlowOptions) for a tiny CPU MeanFlow run, resolved as ``irepa-train`` does."""
    base = dict(TINY, objective="meanflow", batch_size=8, steps=4, lr=1e-3, log_every=1, ckpt_every=0,
                sample_every=0, num_workers=0, progress=False, device="cpu")
    base.update(flags)
    cfg, opts, _ = resolve_train(base)
    return cfg, opts


def train(**flags) -> dict:
    return run(*mf(**flags))


def model_from(ckpt: dict, weights: str = "ema") -> torch.nn.Module:
    mc = dict(ckpt["model_config"])
    model = build_sit(mc.pop("name"), **mc)
    model.load_state_dict(ckpt[weights])
    return model.eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("s") / "store", num_samples=16, encoders={"e": 16},
                                grid=(2, 2), shard_size=8, flip=True)


@pytest.fixture(scope="module")
def tiny_vae_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("l") / "store"
    return path, learnable_store(path)


# ----------------------------------------------------------------------------- config


def test_cli_config_resolves_the_objective_preset_and_refuses_bad_flags(tmp_path, store):
    from irepa.pipeline.config import OptionError

    cfg, opts = mf(mf_preset="l2", mf_cfg_k=0.9)
    assert tuple(cfg.betas) == (0.9, 0.95) and cfg.grad_clip == 0.0 and cfg.sample_steps == 1  # the preset
    assert opts.mf_preset == "l2" and opts.mf_cfg_k == 0.9 and opts.mf_cfg_w is None  # resolved in the objective
    cfg, _ = mf(betas=(0.9, 0.999), grad_clip=1.0)  # flags beat the objective's preset
    assert tuple(cfg.betas) == (0.9, 0.999) and cfg.grad_clip == 1.0
    with pytest.raises(OptionError, match="--mf-ratio belongs to --objective meanflow, not flow"):
        resolve_train({"mf_ratio": 0.5})
    with pytest.raises(ValueError, match=r"--mf-preset 'l3': expected auto or one of \['b2', 'l2', 'unguided', "):
        mf(mf_preset="l3")
    # guidance needs the null class: refused before step 0
    with pytest.raises(ValueError, match="needs the null class: --class-dropout > 0"):
        train(cache=str(store), class_dropout=0.0, out=str(tmp_path / "r"))
    # a flow sampler for the previews would stop the run at its first preview: refused before step 0
    with pytest.raises(ValueError, match="--sample-method sde is not a sampler of --objective meanflow: meanflow, ode"):
        train(cache=str(store), sample_method="sde", sample_every=2, out=str(tmp_path / "r"))
    assert not (tmp_path / "r" / "metrics.jsonl").exists() and latest_checkpoint(tmp_path / "r") is None


# ----------------------------------------------------------------------------- resume


def test_resume_matches_unbroken_run(tmp_path, store):
    kw = dict(cache=str(store), steps=6, ckpt_every=2, grad_accum=2, seed=3)
    train(out=str(tmp_path / "a"), **kw)
    b = tmp_path / "b"
    train(out=str(b), **{**kw, "steps": 4}, num_workers=2)
    assert [s for s, _ in list_checkpoints(b)] == [2, 4]
    (b / "checkpoints" / "0000004.pt").unlink()  # crashed after logging step 4, before its checkpoint
    train(out=str(b), **kw)
    la, lb = metrics(tmp_path / "a"), metrics(b)
    assert [m["step"] for m in lb] == list(range(1, 7))
    for k in LOGGED:
        assert [m[k] for m in la] == [m[k] for m in lb], k
    assert len({m["loss"] for m in la}) == 6  # the steps differ: the comparison is not vacuous
    ca, cb = load_checkpoint(latest_checkpoint(tmp_path / "a")), load_checkpoint(latest_checkpoint(b))
    assert ca["model_config"]["time_conditions"] == ["t", "t-r"]
    for key in ("model", "ema"):
        for name, t in ca[key].items():
            assert torch.equal(t, cb[key][name]), (key, name)
    assert ca["data_state"] == cb["data_state"] == {"kind": "index", "position": 48, "num_samples": 16, "seed": 3}
    args = json.loads((b / "args.json").read_text())
    assert (args["mf_preset"], args["mf_cfg_w"], args["mf_cfg_k"]) == ("b2", 1.0, 0.5)  # auto resolved by SiT-S


# ----------------------------------------------------------------------------- DDP


def test_two_process_torchrun_matches_one_process(tmp_path, store):
    """2 gloo ranks x 2 accumulated micro-batches of 2 == 1 process with the whole batch of 8."""
    one = tmp_path / "one"
    train(cache=str(store), steps=3, out=str(one))
    two = tmp_path / "two"
    flags = ["--objective", "meanflow", "--cache", str(store), "--model", "SiT-S/2", "--hidden-size", "32",
             "--depth", "2", "--num-heads", "2", "--projector-dim", "32", "--batch-size", "8", "--grad-accum", "2",
             "--steps", "3", "--lr", "1e-3", "--log-every", "1", "--ckpt-every", "0", "--sample-every", "0",
             "--num-workers", "0", "--progress", "False", "--device", "cpu", "--out", str(two)]
    torchrun_2ranks(["-m", "irepa.trainer"] + flags, tmp_path)
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        for k in LOGGED:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
    p1, p2 = load_checkpoint(latest_checkpoint(one)), load_checkpoint(latest_checkpoint(two))
    mc = dict(p1["model_config"])
    torch.manual_seed(0)  # the run's seed: the weights at step 0
    start = build_sit(mc.pop("name"), **mc).state_dict()
    for name, t in p1["model"].items():
        # float32 sums in another order (2 ranks x 2 micro-batches vs one batch of 8; the JVP's
        # tangent products too): Adam turns the rounding of near-zero gradients into update
        # differences of a few 1e-6 after 3 steps at lr 1e-3
        torch.testing.assert_close(t, p2["model"][name], rtol=1e-5, atol=5e-6)
    # the (t - r) embedder trains too (its gradient is all-reduced like the rest)
    assert any(not torch.equal(t, start[k]) for k, t in p1["model"].items() if k.startswith("h_embedder."))


# ----------------------------------------------------------------------------- fused vs plain alignment


def test_plain_alignment_flag_matches_fused(store, tmp_path):
    """--nofused-align (plain composition) trains to the same losses as the fused module."""
    for fused in (True, False):
        train(cache=str(store), out=str(tmp_path / f"fused{fused}"), fused_align=fused)
    a, b = metrics(tmp_path / "fusedTrue"), metrics(tmp_path / "fusedFalse")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["align_loss"] != 0
        for k in ("loss", "mf_loss", "align_loss", "grad_norm"):
            np.testing.assert_allclose(x[k], y[k], rtol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------- learning


def test_learns_cached_latents_in_one_step_and_irepa_aligns(tmp_path, tiny_vae_store):
    """The flow memorisation criterion with 1-NFE (and 2-NFE) samples of the trained EMA. Margin
    measured over store seeds 0-2: 1-NFE error / init error 0.11-0.23 after 500 steps (< 0.3 asked)."""
    path, mean = tiny_vae_store
    out = tmp_path / "run"
    train(cache=str(path), align="irepa", hidden_size=64, projector_dim=64, batch_size=32, steps=500, lr=3e-3,
          ema=[0.0], log_every=10, latent_norm="stats", out=str(out))
    cos = [m["cosine"] for m in metrics(out)]
    assert np.mean(cos[-5:]) > max(0.8, cos[0] + 0.3), cos
    ck = load_checkpoint(latest_checkpoint(out))
    trained = model_from(ck)
    mc = dict(ck["model_config"])
    torch.manual_seed(0)
    init = build_sit(mc.pop("name"), **mc).eval()
    x = LatentNorm.from_dict(json.loads(ck["extra"]["latent_norm"])).normalize(torch.from_numpy(mean))
    z = torch.randn((8, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 4

    def nn_error(model, steps=1):
        s = meanflow_sample(model, z, y, steps=steps)
        return ((s[:, None] - x[None]) ** 2).flatten(2).mean(-1).min(1).values.mean().item()

    e_init, e_1, e_2 = nn_error(init), nn_error(trained), nn_error(trained, 2)
    assert e_1 < 0.3 * e_init and e_2 < 0.3 * e_init, (e_1, e_2, e_init)


def test_repa_alignment_cosine_rises(tmp_path, tiny_vae_store):
    """REPA's MLP head aligns through the MeanFlow gradient pass (rise 0.23-0.38 over store seeds 0-2
    by 200 steps; 0.2 asked)."""
    path, _ = tiny_vae_store
    out = tmp_path / "run"
    train(cache=str(path), align="repa", steps=300, lr=3e-3, log_every=5, out=str(out))
    cos = [m["cosine"] for m in metrics(out)]
    assert np.mean(cos[-3:]) > cos[0] + 0.2, cos


# ----------------------------------------------------------------------------- sampling


def test_preview_grid_and_irepa_sample_1_and_2_nfe(tmp_path, tiny_vae_store):
    from PIL import Image

    from irepa.pipeline.vae import load_vae
    from irepa.trainer.cli import sample as sample_cli

    path, _ = tiny_vae_store
    run_dir = tmp_path / "r"
    # EMA 0 (EMA = the model) and a large lr: after 4 steps u is far from the zero output of adaLN-Zero at init
    train(cache=str(path), steps=4, sample_every=2, sample_n=3, lr=3e-2, ema=[0.0], out=str(run_dir))
    pngs = sorted((run_dir / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["0000002.png", "0000004.png"]
    assert Image.open(pngs[0]).size == (2 * 32, 2 * 32)  # 3 images of 32 px on a 2x2 grid

    ck = load_checkpoint(latest_checkpoint(run_dir))
    model = model_from(ck)
    norm = LatentNorm.from_dict(json.loads(ck["extra"]["latent_norm"]))
    vae = load_vae("tiny", device=torch.device("cpu"))
    n, seed = 5, 0
    zs, ys = [], []
    for i in range(n):  # image i's noise and label, as irepa-sample draws them
        g = torch.Generator().manual_seed(mix_seed("sample", seed, i))
        zs.append(torch.randn((4, 4, 4), generator=g))
        ys.append(int(torch.randint(4, (1,), generator=g)))
    z, y = torch.stack(zs), torch.tensor(ys)

    def u(x, t, r):  # the average velocity over [r, t], in float64 like the sampler's state
        with torch.no_grad():
            full = torch.full((n,), t), torch.full((n,), r)
            return model(x.float(), full[0], y, r=full[1])[0].double()

    z64 = z.double()
    assert u(z64, 1.0, 0.0).abs().mean() > 0.1
    one = z64 - u(z64, 1.0, 0.0)                   # 1-NFE: z0 = z1 - u(z1, r=0, t=1)
    mid = z64 - 0.5 * u(z64, 1.0, 0.5)             # 2-NFE: 1 -> 0.5 -> 0
    two = mid - 0.5 * u(mid, 0.5, 0.0)
    kw = dict(num_samples=n, batch_size=2, vae="tiny", device="cpu", progress=False, seed=seed)
    for steps, ref in ((None, one), (2, two)):
        out = tmp_path / f"s{steps}"
        sample_cli(ckpt=str(run_dir), out=str(out), **kw, **({"steps": steps} if steps else {}))
        with np.load(out / "samples.npz", allow_pickle=False) as f:
            assert f.files == ["arr_0"]
            arr = f["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (n, 32, 32, 3)
        want = vae.decode(norm.denormalize(ref.float())).permute(0, 2, 3, 1).numpy()
        assert np.abs(arr.astype(int) - want.astype(int)).max() <= 1, steps
        assert (out / "grid.png").is_file()
    with np.load(tmp_path / "sNone" / "samples.npz") as a, np.load(tmp_path / "s2" / "samples.npz") as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])  # 1-NFE and 2-NFE are different samplers
    with pytest.raises(ValueError, match="'sde' is a flow sampler"):
        sample_cli(ckpt=str(run_dir), out=str(tmp_path / "sde"), method="sde", **kw)


# ----------------------------------------------------------------------------- --init-from, --compile


def test_init_from_a_flow_sit_leaves_only_the_t_minus_r_embedder_at_init(tmp_path, store, capsys):
    flow = tmp_path / "flow"
    run(resolve_train(dict(TINY, cache=str(store), steps=1, batch_size=8, num_workers=0, progress=False,
                           device="cpu", out=str(flow)))[0])
    ck = latest_checkpoint(flow)
    src = load_checkpoint(ck)["ema"]
    train(cache=str(store), steps=0, init_from=str(ck), out=str(tmp_path / "mf"))
    assert "left out: missing ['h_embedder." in capsys.readouterr().out
    got = load_checkpoint(latest_checkpoint(tmp_path / "mf"))
    train(cache=str(store), steps=0, out=str(tmp_path / "fresh"))  # the same seed: the embedder's init
    fresh = load_checkpoint(latest_checkpoint(tmp_path / "fresh"))
    h_keys = sorted(k for k in got["model"] if k.startswith("h_embedder."))
    assert h_keys and set(got["model"]) - set(src) == set(h_keys)
    for k, t in got["model"].items():
        ref = fresh["model"][k] if k in h_keys else src[k]
        assert torch.equal(t, ref), k
        assert torch.equal(got["ema"][k], ref), k
    assert not all(torch.equal(fresh["model"][k], src[k]) for k in src)  # the load did something
    # a SiT whose patch embedding does not fit the store's latents is refused, naming both
    from irepa.trainer.store_checks import StoreMismatchError
    c8 = make_synthetic_store(tmp_path / "c8", num_samples=8, encoders={"e": 16}, grid=(2, 2), latent_channels=8)
    run(resolve_train(dict(TINY, cache=str(c8), steps=0, batch_size=8, num_workers=0, progress=False,
                           device="cpu", out=str(tmp_path / "flow8")))[0])
    ck8 = latest_checkpoint(tmp_path / "flow8")
    with pytest.raises(StoreMismatchError) as e:
        train(cache=str(store), steps=0, init_from=str(ck8), out=str(tmp_path / "mf8"))
    assert str(ck8) in str(e.value) and str(store) in str(e.value) and "latent channel count 4 != 8" in str(e.value)
    # the other way round a MeanFlow SiT has a key a flow SiT lacks: refused unless partial
    with pytest.raises(ValueError, match="h_embedder"):
        run(resolve_train(dict(TINY, cache=str(store), steps=0, batch_size=8, num_workers=0, progress=False,
                               device="cpu", init_from=str(latest_checkpoint(tmp_path / "mf")),
                               out=str(tmp_path / "back")))[0])


def test_compile_is_accepted_and_trains_like_eager(tmp_path, store, monkeypatch):
    """``--compile`` goes through the loop's ``torch.compile`` of the DDP-able phase module. CPU
    inductor takes about a minute for this graph on the shared 2-core machine, so the test compiles
    with ``aot_eager`` (dynamo's tracing and graph breaks, AOT autograd, no code generation); the
    JVP is excluded from the graph (``torch.compiler.disable``) either way."""
    calls = []
    real = torch.compile

    def compile_aot_eager(model, **kw):
        calls.append(type(model).__name__)
        return real(model, **{**kw, "backend": "aot_eager"})

    train(cache=str(store), steps=3, out=str(tmp_path / "eager"))
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    train(cache=str(store), steps=3, compile=True, out=str(tmp_path / "compiled"))
    assert calls == ["MeanFlowLoss"]
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for x, y in zip(a, b):
        for k in ("loss", "mf_loss", "align_loss", "grad_norm"):
            np.testing.assert_allclose(x[k], y[k], rtol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------- --online


def test_online_and_cache_give_the_same_loss(tmp_path):
    """``--online`` (VAE and encoder at every step, the benchmarks' baseline) trains MeanFlow on the
    same numbers as the cache: the same draws, latents within float rounding, fp16-cached features."""
    from irepa.pipeline.build import build_store

    store = build_store(data=None, out=str(tmp_path / "store"), encoder="dinov2-vit-s", vae="tiny",
                        encoder_config="tiny", resolution=32, shard_size=4, batch_size=4, num_workers=0,
                        device="cpu", progress=False)
    common = dict(cache=str(store), steps=2, batch_size=4, seed=1, latent_norm="stats", hidden_size=32)
    train(out=str(tmp_path / "cache"), **common)
    train(out=str(tmp_path / "online"), online=True, **common)
    mc, mo = metrics(tmp_path / "cache"), metrics(tmp_path / "online")
    assert len(mc) == len(mo) == 2
    for a, b in zip(mc, mo):
        for k in ("mf_loss", "mse", "v_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
        assert a["align_loss"] == pytest.approx(b["align_loss"], rel=2e-3, abs=2e-4)  # fp16 cached features
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


# ----------------------------------------------------------------------------- bench


def test_bench_meanflow_vs_flow_smoke(capsys):
    """``python -m bench.train_step --meanflow-only --smoke``: the meanflow table and its ratios
    (no timing is asserted: only that every row is there and was timed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import train_step

    res = train_step.main(["--smoke", "--meanflow-only", "--device", "cpu"])
    out = capsys.readouterr().out
    assert res["records"] == [] and "cached vs online" not in out  # --meanflow-only: no VAE, no online path
    (r,) = res["meanflow"]
    rows = {"flow step", "meanflow step", "meanflow: guidance pass", "meanflow: JVP (math attention)",
            "meanflow: gradient pass", "meanflow: JVP, torch's linear rule"}
    assert set(r["times"]) == set(r["flops_per_image"]) == rows
    assert all(v > 0 for v in r["times"].values())
    f = r["flops_per_image"]  # counted on the meta device: exact, whatever the machine's load
    assert f["flow step"] < f["meanflow step"]
    assert f["meanflow: JVP (math attention)"] < f["meanflow: JVP, torch's linear rule"]
    assert "meanflow vs flow" in out and "meanflow/flow step time" in out and "--mf-preset b2" in out


# ----------------------------------------------------------------------------- the JVP's cost


def test_jvp_linears_run_two_matmuls_not_three(monkeypatch):
    """PyTorch's forward-mode rule for a linear layer multiplies by a materialised zero weight
    tangent (3 matmuls); ``du_dt`` routes linears through a rule with 2 (primal, ``x_t W^T``).
    Same du/dt (float64), and exactly twice a forward's linear FLOPs (counted, not timed)."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    import irepa.trainer.objectives.meanflow as mfmod

    torch.manual_seed(0)
    m = build_sit("SiT-S/2", input_size=4, in_channels=4, num_classes=4, z_dims=(), hidden_size=32, depth=2,
                  num_heads=2, time_conditions=("t", "t-r")).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero weights everywhere (adaLN-Zero would make u = 0)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    loss = mfmod.MeanFlowLoss(m, mfmod.resolve_options(mfmod.MeanFlowOptions(), "SiT-S/2"))
    z, vg = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, 4, dtype=torch.float64)
    t, r, y = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64), \
        torch.tensor([0, 1, 4])

    def linear_flops(fc) -> int:
        return sum(n for op, n in fc.get_flop_counts()["Global"].items() if str(op) in ("aten.addmm", "aten.mm"))

    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        m(z, t, y, r=r)
    with FlopCounterMode(display=False) as fast:
        du_fast = loss.du_dt(z, t, r, vg, y)
    monkeypatch.setattr(mfmod, "_TangentLinears", contextlib.nullcontext)  # PyTorch's own rule
    with FlopCounterMode(display=False) as plain:
        du_plain = loss.du_dt(z, t, r, vg, y)
    assert du_fast.abs().max() > 1e-2
    torch.testing.assert_close(du_fast, du_plain, rtol=0, atol=1e-12)
    assert linear_flops(fwd) > 0 and linear_flops(fast) == 2 * linear_flops(fwd)
    assert fast.get_total_flops() < plain.get_total_flops()
