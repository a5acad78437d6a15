"""JiT (and REPA-E) end to end through `irepa-train` on pixel stores: learning, samples written
straight from pixels, exact resume, 2 processes == 1 process, --online == cached."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irepa.stores import StoreLayout, StoreWriter
from irepa.stores.testing import make_synthetic_store
from irepa.trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from irepa.trainer.cli import sample as sample_cli
from irepa.trainer.cli import train
from train_helpers import metrics, one_thread, torchrun_2ranks  # noqa: F401 (one_thread: autouse fixture)

#: a tiny JiT: 16 px images, patch 4 (a 4x4 grid), 3 in-context tokens from block 1
TINY = dict(objective="jit", model="JiT-B/16", hidden_size=32, depth=4, num_heads=2, patch_size=4, bottleneck_dim=8,
            in_context_len=3, in_context_start=1, projector_dim=16)
RUN = dict(batch_size=8, steps=4, log_every=1, ckpt_every=0, sample_every=0, num_workers=0, progress=False,
           device="cpu")


def learnable_pixel_store(path, n: int = 4, size: int = 16, d: int = 24, seed: int = 3) -> torch.Tensor:
    """A pixel-only store of ``n`` smooth, distinct images (label i = image i) whose features are a
    fixed random map of each 4x4 patch (so alignment is learnable); returns the pixels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    imgs = []
    for i in range(n):
        col = torch.rand(3, 1, 1, generator=g)
        pat = torch.sin((i + 1) * math.pi * (xx if i % 2 else yy))[None]
        imgs.append((0.5 + 0.45 * pat * (col * 2 - 1)).clamp(0, 1))
    pixels = (torch.stack(imgs) * 255).round().to(torch.uint8)
    proj = torch.randn(48, d, generator=g)
    feats = F.unfold(pixels.float() / 127.5 - 1, 4, stride=4).transpose(1, 2) @ proj
    grid = size // 4
    layout = StoreLayout(num_rows=n, shard_size=n, latent_channels2=0, latent_hw=(0, 0), pixel_hw=(size, size),
                         encoders={"enc": (grid * grid, d)})
    info = {"dataset": {"source": "test", "num_classes": n, "class_names": [f"c{i}" for i in range(n)]},
            "image": {"resolution": size, "crop": "adm"}, "vae": None,
            "encoders": {"enc": {"timm_id": "test", "weights_sha256": None, "token_grid": [grid, grid],
                                 "input_size": size}}}
    w = StoreWriter.open(path, "zarr", layout, [f"img{i}" for i in range(n)], np.arange(n), info, resume=False,
                         overwrite=True)
    w.write_shard(0, {"pixels": pixels.numpy(), "features/enc": feats.numpy()}, [])
    w.finalize()
    return pixels


@pytest.fixture(scope="module")
def flip_store(tmp_path_factory):
    """16 random pixel-only samples in two shards, with flipped features."""
    return make_synthetic_store(tmp_path_factory.mktemp("px") / "store", num_samples=16, encoders={"e": 24},
                                grid=(4, 4), shard_size=8, flip=True, latent_channels=0, pixel_hw=(16, 16))


# ----------------------------------------------------------------------------- learning and sampling


def test_jit_memorises_stored_images_and_samples_come_straight_from_pixels(tmp_path):
    pixels = learnable_pixel_store(tmp_path / "store")
    out = tmp_path / "run"
    train(cache=str(tmp_path / "store"), out=str(out),
          **{**TINY, **RUN, "hidden_size": 64, "num_heads": 4, "bottleneck_dim": 16, "in_context_len": 2,
             "batch_size": 16, "steps": 400, "log_every": 10, "sample_every": 400},
          lr=2e-3, ema=(0.0,), sample_n=4, sample_steps=4)
    cos = [m["cosine"] for m in metrics(out)]
    assert np.mean(cos[-5:]) > max(0.9, cos[0] + 0.3), cos
    # the preview grid: 4 samples of 16 px on a 2x2 grid, decoded by no VAE
    from PIL import Image

    (png,) = sorted((out / "samples").glob("*.png"))
    assert png.name == "0000400.png" and Image.open(png).size == (32, 32)
    # irepa-sample --ckpt: the ADM .npz, uint8 [N, 16, 16, 3] straight from the pixels JiT predicts
    sample_cli(ckpt=str(out), out=str(tmp_path / "samples"), num_samples=8, batch_size=4, labels=[0, 1, 2, 3],
               steps=20, device="cpu", progress=False)
    with np.load(tmp_path / "samples" / "samples.npz", allow_pickle=False) as f:
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (8, 16, 16, 3)
    stored = pixels.permute(0, 2, 3, 1).float()
    err = ((torch.from_numpy(arr).float()[:, None] - stored[None]) ** 2).reshape(8, 4, -1).mean(-1)  # [sample, image]
    labels = torch.arange(8) % 4
    assert torch.equal(err.argmin(1), labels), err
    spread = float(((stored - stored.mean(0)) ** 2).mean())
    assert float(err[torch.arange(8), labels].max()) < 0.05 * spread, (err, spread)


# ----------------------------------------------------------------------------- resume, DDP


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_jit_resume_matches_unbroken_run(tmp_path, fmt):
    store = make_synthetic_store(tmp_path / "store", num_samples=16, encoders={"e": 24}, grid=(4, 4), shard_size=4,
                                 flip=True, latent_channels=0, pixel_hw=(16, 16), format=fmt)
    kw = dict(cache=str(store), **{**TINY, **RUN, "steps": 6, "ckpt_every": 2}, grad_accum=2, seed=3)
    # a webdataset store's sample order depends on its streams (one per worker): the same count in all runs
    train(out=str(tmp_path / "a"), **{**kw, "num_workers": 0 if fmt == "zarr" else 2})
    b = tmp_path / "b"
    train(out=str(b), **{**kw, "steps": 4, "num_workers": 2})
    assert [s for s, _ in list_checkpoints(b)] == [2, 4]
    (b / "checkpoints" / "0000004.pt").unlink()  # crashed after logging step 4, before its checkpoint
    train(out=str(b), **{**kw, "num_workers": 2})
    la, lb = metrics(tmp_path / "a"), metrics(b)
    assert [m["step"] for m in lb] == list(range(1, 7))
    for k in ("loss", "mse", "align_loss", "grad_norm"):
        assert [m[k] for m in la] == [m[k] for m in lb], k
    ca, cb = load_checkpoint(latest_checkpoint(tmp_path / "a")), load_checkpoint(latest_checkpoint(b))
    for key in ("model", "ema"):
        for name, t in ca[key].items():
            assert torch.equal(t, cb[key][name]), (key, name)
    for name, t in ca["emas"][0].items():  # JiT's second EMA (0.9996)
        assert torch.equal(t, cb["emas"][0][name]), name
    assert ca["data_state"] == cb["data_state"]


def test_jit_two_processes_match_one_process(tmp_path, flip_store):
    common = {**TINY, **RUN, "steps": 3, "lr": 1e-3}
    train(cache=str(flip_store), out=str(tmp_path / "one"), grad_accum=2, **common)  # micro 4, like 2 ranks x 4
    flags = ["--cache", str(flip_store), "--out", str(tmp_path / "two")]
    for k, v in common.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    torchrun_2ranks(["-m", "irepa.trainer"] + flags, tmp_path)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        for k in ("loss", "mse", "align_loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
    p1, p2 = load_checkpoint(latest_checkpoint(tmp_path / "one")), load_checkpoint(latest_checkpoint(tmp_path / "two"))
    for name, t in p1["model"].items():
        torch.testing.assert_close(t, p2["model"][name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- online


@pytest.fixture(scope="module")
def built_pixel_store(tmp_path_factory):
    """The bundled photos at 64 px with flips, a tiny DINOv2-S (a 4x4 grid), no VAE."""
    from irepa.pipeline.build import build_store

    return build_store(data=None, out=str(tmp_path_factory.mktemp("b") / "px"), encoder="dinov2-vit-s", vae="none",
                       pixels=True, flip=True, encoder_config="tiny", resolution=64, shard_size=4, batch_size=4,
                       num_workers=0, device="cpu", progress=False)


def test_jit_online_and_cache_give_the_same_loss(tmp_path, built_pixel_store):
    common = dict(cache=str(built_pixel_store), **{**TINY, **RUN, "patch_size": 16, "steps": 2, "batch_size": 4},
                  seed=1)
    train(out=str(tmp_path / "cache"), **common)
    train(out=str(tmp_path / "online"), online=True, **common)
    mc, mo = metrics(tmp_path / "cache"), metrics(tmp_path / "online")
    assert len(mc) == len(mo) == 2
    for a, b in zip(mc, mo):
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-6)  # the same pixels, flips and draws
        assert a["align_loss"] == pytest.approx(b["align_loss"], rel=2e-3, abs=2e-4)  # fp16 cached features
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


# ----------------------------------------------------------------------------- REPA-E


def test_repae_runs_two_steps_on_a_pixel_store(tmp_path, built_pixel_store):
    """--objective repae reads the pixel store through the same path (tiny VAE, random LPIPS)."""
    pytest.importorskip("lpips")
    out = tmp_path / "repae"
    train(cache=str(built_pixel_store), out=str(out), objective="repae", model="SiT-S/2", hidden_size=32, depth=2,
          num_heads=2, projector_dim=16, vae="tiny", lpips_weights="random", lpips_net="alex", disc_channels=8,
          disc_layers=2, **{**RUN, "batch_size": 4, "steps": 2})
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "l1", "sit/loss", "sit/mse")), r


# ----------------------------------------------------------------------------- benches


def test_jit_step_and_pixel_storage_benches_run(capsys):
    import bench.jit_step
    import bench.storage

    res = bench.jit_step.main(["--smoke", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "JiT train step: pixel store (cached) vs online encoder" in out and "online/cached step time" in out
    (r,) = res["records"]
    f = r["flops_per_image"]
    assert f["step cached"] > f["step no-align"] > 0 and f["encoder"] > 0
    assert set(r["times"]) == {"no-align", "cached", "online", "online: encoder", "online: decode + crop (1 core)"}
    res = bench.storage.main(["--smoke", "--device", "cpu", "--only-pixels"])
    out = capsys.readouterr().out
    assert "Pixel codecs: bytes and loader speed" in out and "zstd/none pixel bytes" in out
    recs = res["pixels"]["records"]
    assert {(r["format"], r["codec"]) for r in recs} == {("zarr", "none"), ("zarr", "zstd"), ("wds", "none"),
                                                          ("wds", "png")}
    raw = {r["format"]: r["pixel_bytes_per_sample"] for r in recs if r["codec"] == "none"}
    for r in recs:
        if r["codec"] != "none":  # lossless codecs of photos: fewer bytes than the raw rows
            assert r["pixel_bytes_per_sample"] < raw[r["format"]], r
