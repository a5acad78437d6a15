"""trainer: learning end to end, exact resume, DDP equivalence, store checks, --online vs cache, sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irepa.stores import StoreError, StoreLayout, StoreWriter
from irepa.stores.testing import make_synthetic_store
from irepa.trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from irepa.trainer.data import LatentNorm
from irepa.trainer.models import build_sit
from irepa.trainer.sample import sample
from irepa.trainer.store_checks import StoreMismatchError
from irepa.trainer.train import TrainConfig, run
from train_helpers import learnable_store, metrics, one_thread, torchrun_2ranks  # noqa: F401 (one_thread: autouse fixture)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="SiT-S/2", hidden_size=32, depth=2, num_heads=2, projector_dim=32)


def cfg(**kw) -> TrainConfig:
    base = dict(TINY, batch_size=8, steps=4, lr=1e-3, log_every=1, ckpt_every=0, sample_every=0, num_workers=0,
                progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("s") / "store", num_samples=16, encoders={"e": 16},
                                grid=(2, 2), shard_size=8, flip=True)


# ----------------------------------------------------------------------------- learning


def test_learns_cached_latents_and_aligns(tmp_path):
    mean = learnable_store(tmp_path / "store")
    out = tmp_path / "run"
    run(cfg(cache=str(tmp_path / "store"), align="irepa", hidden_size=64, projector_dim=64, steps=500, lr=3e-3,
            ema=0.0, log_every=5, latent_norm="stats", out=str(out)))
    cos = [m["cosine"] for m in metrics(out)]
    assert np.mean(cos[-5:]) > max(0.8, cos[0] + 0.3), cos
    ck = load_checkpoint(latest_checkpoint(out))
    mc = dict(ck["model_config"])
    name = mc.pop("name")
    trained, init = build_sit(name, **mc), build_sit(name, **mc)
    trained.load_state_dict(ck["ema"])
    x = LatentNorm.from_dict(json.loads(ck["extra"]["latent_norm"])).normalize(torch.from_numpy(mean))
    z = torch.randn((8, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 4

    def nn_error(model):
        s = sample(model, z, y, method="ode", steps=20)
        return ((s[:, None] - x[None]) ** 2).flatten(2).mean(-1).min(1).values.mean().item()

    e_init, e_trained = nn_error(init), nn_error(trained)
    assert e_trained < 0.3 * e_init, (e_trained, e_init)


def test_repa_alignment_cosine_rises(tmp_path):
    learnable_store(tmp_path / "store")
    out = tmp_path / "run"
    run(cfg(cache=str(tmp_path / "store"), align="repa", steps=120, lr=3e-3, log_every=5, out=str(out)))
    cos = [m["cosine"] for m in metrics(out)]
    assert np.mean(cos[-3:]) > cos[0] + 0.2, cos


# ----------------------------------------------------------------------------- resume


def test_resume_matches_unbroken_run(tmp_path, store):
    kw = dict(cache=str(store), steps=6, ckpt_every=2, grad_accum=2, seed=3)
    run(cfg(out=str(tmp_path / "a"), **kw))
    b = tmp_path / "b"
    run(cfg(out=str(b), **{**kw, "steps": 4}, num_workers=2))
    assert [s for s, _ in list_checkpoints(b)] == [2, 4]
    (b / "checkpoints" / "0000004.pt").unlink()  # crashed after logging step 4, before its checkpoint
    run(cfg(out=str(b), **kw))
    la, lb = metrics(tmp_path / "a"), metrics(b)
    assert [m["step"] for m in lb] == list(range(1, 7))
    for k in ("loss", "mse", "align_loss", "grad_norm"):
        assert [m[k] for m in la] == [m[k] for m in lb], k
    ca, cb = load_checkpoint(latest_checkpoint(tmp_path / "a")), load_checkpoint(latest_checkpoint(b))
    for key in ("model", "ema"):
        for name, t in ca[key].items():
            assert torch.equal(t, cb[key][name]), (key, name)
    assert ca["data_state"] == cb["data_state"] == {"kind": "index", "position": 48, "num_samples": 16, "seed": 3}


def test_checkpoint_is_pickle_free_and_refuses_other_files(tmp_path, store):
    run(cfg(cache=str(store), steps=1, out=str(tmp_path / "r")))
    p = latest_checkpoint(tmp_path / "r")
    raw = torch.load(p, weights_only=True)
    assert isinstance(raw["args"], str) and isinstance(raw["rng"]["torch"], torch.Tensor)
    assert not list((tmp_path / "r" / "checkpoints").glob(".*tmp*"))
    bad = tmp_path / "bad.pt"
    torch.save({"x": Path("a")}, bad)  # a pickled Python object: refused, never unpickled
    from irepa.trainer.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(bad)
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not an irepa training checkpoint"):
        load_checkpoint(bad)


# ----------------------------------------------------------------------------- DDP


def test_two_process_ddp_matches_one_process(tmp_path, store):
    one = tmp_path / "one"
    run(cfg(cache=str(store), steps=3, grad_accum=2, out=str(one)))  # micro 4, like 2 ranks x 4
    two = tmp_path / "two"
    flags = ["--cache", str(store), "--model", "SiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2",
             "--projector-dim", "32", "--batch-size", "8", "--steps", "3", "--lr", "1e-3", "--log-every", "1",
             "--ckpt-every", "0", "--sample-every", "0", "--num-workers", "0", "--progress", "False",
             "--device", "cpu", "--out", str(two)]
    torchrun_2ranks(["-m", "irepa.trainer"] + flags, tmp_path)
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        for k in ("loss", "mse", "align_loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
    p1, p2 = load_checkpoint(latest_checkpoint(one)), load_checkpoint(latest_checkpoint(two))
    for name, t in p1["model"].items():
        torch.testing.assert_close(t, p2["model"][name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- store checks


def test_token_grid_mismatch_is_refused(tmp_path, store):
    with pytest.raises(StoreMismatchError) as e:
        run(cfg(cache=str(store), patch_size=4, out=str(tmp_path / "r")))
    msg = str(e.value)
    assert str(store) in msg and "token grid 2x2" in msg and "patch grid 1x1" in msg and "4x4 latent" in msg


def test_channel_mismatch_on_resume_and_init_from_is_refused(tmp_path, store):
    run(cfg(cache=str(store), steps=1, out=str(tmp_path / "r")))
    other = make_synthetic_store(tmp_path / "c8", num_samples=8, encoders={"e": 16}, grid=(2, 2), latent_channels=8)
    with pytest.raises(StoreMismatchError) as e:  # same run folder, a store with 8-channel latents
        run(cfg(cache=str(other), steps=2, out=str(tmp_path / "r")))
    assert str(other) in str(e.value) and "latent channel count 8 != 4" in str(e.value)
    ck = latest_checkpoint(tmp_path / "r")
    with pytest.raises(StoreMismatchError) as e:
        run(cfg(cache=str(other), steps=1, init_from=str(ck), out=str(tmp_path / "r2")))
    assert str(other) in str(e.value) and "latent channel count 8 != 4" in str(e.value) and str(ck) in str(e.value)
    run(cfg(cache=str(store), steps=0, init_from=str(ck), out=str(tmp_path / "r3")))  # the fitting store starts
    src, got = load_checkpoint(ck), load_checkpoint(latest_checkpoint(tmp_path / "r3"))
    assert all(torch.equal(src["ema"][k], got["model"][k]) for k in src["ema"])


def test_unfinished_and_corrupt_stores_are_refused(tmp_path):
    layout = StoreLayout(num_rows=8, shard_size=4, latent_channels2=8, latent_hw=(4, 4), encoders={"e": (4, 16)})
    w = StoreWriter.open(tmp_path / "half", "zarr", layout, [f"k{i}" for i in range(8)], np.zeros(8, int), {})
    w.write_shard(0, {"latents": np.ones((4, 8, 4, 4), np.float32), "features/e": np.ones((4, 4, 16), np.float32)},
                  [])
    with pytest.raises(StoreError, match="unfinished") as e:
        run(cfg(cache=str(tmp_path / "half"), out=str(tmp_path / "r")))
    assert str(tmp_path / "half") in str(e.value)
    good = make_synthetic_store(tmp_path / "good", num_samples=8, encoders={"e": 16}, grid=(2, 2))
    chunk = sorted(p for p in (good / "latents").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="crc32c") as e:  # without --verify the first read of it stops the run
        run(cfg(cache=str(good), steps=1, out=str(tmp_path / "ok")))
    assert str(chunk) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreError, match="verif") as e:
        run(cfg(cache=str(good), steps=1, verify=True, out=str(tmp_path / "v")))
    assert str(good) in str(e.value) and "bad shard 0" in str(e.value)


# ----------------------------------------------------------------------------- sampling


def test_irepa_sample_writes_adm_npz_and_shards_across_ranks(tmp_path, store):
    from irepa.trainer.cli import sample as sample_cli

    run(cfg(cache=str(store), steps=2, out=str(tmp_path / "r")))
    kw = dict(num_samples=5, batch_size=1, method="heun", steps=3, cfg_scale=1.5, vae="tiny", device="cpu", progress=False)
    sample_cli(ckpt=str(tmp_path / "r"), out=str(tmp_path / "one"), **kw)
    with np.load(tmp_path / "one" / "samples.npz", allow_pickle=False) as f:
        assert f.files == ["arr_0"]
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 32, 32, 3)  # 4x4 latents, tiny VAE /8
    assert (tmp_path / "one" / "grid.png").is_file()
    flags = ["--ckpt", str(tmp_path / "r"), "--out", str(tmp_path / "two")]
    for k, v in kw.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    script = tmp_path / "irepa_sample.py"
    script.write_text("from irepa.trainer.cli import sample_main\nsample_main()\n")
    torchrun_2ranks([str(script)] + flags, tmp_path)
    with np.load(tmp_path / "two" / "samples.npz", allow_pickle=False) as f:
        assert np.array_equal(f["arr_0"], arr)
    assert not list((tmp_path / "two").glob(".part-*"))
    # --init-from a REPA-style training checkpoint ({"model", "ema", "opt", "args": Namespace, ...})
    import argparse
    ck = load_checkpoint(latest_checkpoint(tmp_path / "r"))
    repa = tmp_path / "repa.pt"
    torch.save({"model": {f"module.{k}": v for k, v in ck["model"].items()}, "ema": ck["ema"], "opt": {},
                "args": argparse.Namespace(model="SiT-S/2"), "steps": 2}, repa)
    sample_cli(init_from=str(repa), out=str(tmp_path / "repa"), model="SiT-S/2", hidden_size=32, depth=2, num_heads=2,
               resolution=32, num_classes=4, **kw)
    with np.load(tmp_path / "repa" / "samples.npz", allow_pickle=False) as f:
        assert np.array_equal(f["arr_0"], arr)  # same EMA weights, same noise: the same images


def test_cli_help_lists_flags():
    env = dict(os.environ)
    for mod, flag in (("irepa.trainer", "--latent-norm"), ("irepa.trainer.cli", "--cache")):
        res = subprocess.run([sys.executable, "-m", mod, "--help"], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0 and flag in res.stdout + res.stderr, res.stderr[-2000:]


# ----------------------------------------------------------------------------- online


def test_online_and_cache_give_the_same_loss(tmp_path):
    from irepa.pipeline.build import build_store

    store = build_store(data=None, out=str(tmp_path / "store"), encoder="dinov2-vit-s", vae="tiny",
                        encoder_config="tiny", resolution=32, shard_size=4, batch_size=4, num_workers=0,
                        device="cpu", progress=False)
    common = dict(cache=str(store), steps=2, batch_size=4, seed=1, latent_norm="stats")
    run(cfg(out=str(tmp_path / "cache"), **common))
    run(cfg(out=str(tmp_path / "online"), online=True, **common))
    mc, mo = metrics(tmp_path / "cache"), metrics(tmp_path / "online")
    for a, b in zip(mc, mo):
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-4)
        assert a["align_loss"] == pytest.approx(b["align_loss"], rel=2e-3, abs=2e-4)  # fp16 cached features
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def test_sample_grid_png_every_n_steps_or_a_log_line(tmp_path, store, capsys):
    learnable_store(tmp_path / "s")  # manifest VAE id "tiny": previews decode
    run(cfg(cache=str(tmp_path / "s"), steps=4, sample_every=2, sample_n=3, sample_steps=2, out=str(tmp_path / "a")))
    from PIL import Image
    pngs = sorted((tmp_path / "a" / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["0000002.png", "0000004.png"]
    assert Image.open(pngs[0]).size == (2 * 32, 2 * 32)  # 3 images of 32 px on a 2x2 grid
    run(cfg(cache=str(store), steps=2, sample_every=1, out=str(tmp_path / "b")))  # VAE "synthetic": not loadable
    assert "sample previews off" in capsys.readouterr().out
    assert not (tmp_path / "b" / "samples").exists()


def test_plain_alignment_flag_matches_fused(store, tmp_path):
    """--nofused_align (plain composition) trains to the same losses as the fused module."""
    for fused in (True, False):
        run(cfg(cache=str(store), out=str(tmp_path / f"fused{fused}"), fused_align=fused))
    a, b = metrics(tmp_path / "fusedTrue"), metrics(tmp_path / "fusedFalse")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["align_loss"] != 0
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-5)
        np.testing.assert_allclose(x["align_loss"], y["align_loss"], rtol=1e-5)


def test_sde_samples_do_not_depend_on_batching(tmp_path, store):
    """SDE noise is drawn per image from (seed, i): batch size (and so ranks) cannot change it."""
    from irepa.trainer.cli import sample as sample_cli

    run(cfg(cache=str(store), steps=2, out=str(tmp_path / "r")))
    kw = dict(num_samples=4, method="sde", steps=4, vae="tiny", device="cpu", progress=False, use_ema=False)
    arrays = {}
    for bs in (1, 4):
        sample_cli(ckpt=str(tmp_path / "r"), out=str(tmp_path / f"bs{bs}"), batch_size=bs, **kw)
        with np.load(tmp_path / f"bs{bs}" / "samples.npz", allow_pickle=False) as f:
            arrays[bs] = f["arr_0"].astype(int)
    diff = np.abs(arrays[1] - arrays[4])
    assert diff.max() <= 2 and diff.mean() < 0.05  # float rounding of batched matmuls at most
