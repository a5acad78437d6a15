"""trainer.data: sample order, DDP split, resumable positions, webdataset streams, latent scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from irepa.stores import open_store
from irepa.stores.testing import make_synthetic_store
from irepa.trainer.data import (IndexOrder, LatentNorm, LoaderSpec, StoreLoader, WdsStreams, epoch_flips, epoch_order,
                          sample_posterior, shuffle_buffer)


def _loader(store, spec, steps, state=None, workers=0, **kw):
    r = open_store(store)
    kind = r.loader_kind
    return StoreLoader(store, kind=kind, num_samples=len(r), spec=spec, encoders=r.encoders, steps=steps,
                       state=state, num_workers=workers,
                       shard_counts=r.shard_sample_counts() if kind == "stream" else None, **kw)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("z") / "store", num_samples=24, shard_size=8,
                                encoders={"a": 8}, grid=(2, 2), flip=True)


@pytest.fixture(scope="module")
def wds_store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("w") / "store", num_samples=30, shard_size=5,
                                encoders={"a": 8}, grid=(2, 2), format="wds", flip=True)


# ----------------------------------------------------------------------------- index order


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=4, epoch=0))
    assert np.array_equal(epoch_flips(50, 3, 0), epoch_flips(50, 3, 0))
    assert 0 < epoch_flips(50, 3, 0).sum() < 50


@pytest.mark.parametrize("world,accum", [(2, 1), (2, 2), (4, 1)])
def test_ranks_disjoint_cover_epoch_and_equal_single_process_batch(world, accum):
    n, B = 48, 16
    single = IndexOrder(n, LoaderSpec(global_batch=B, seed=1))
    for step in range(n // B * 2):  # two epochs
        parts = []
        for r in range(world):
            o = IndexOrder(n, LoaderSpec(global_batch=B, seed=1, rank=r, world_size=world, grad_accum=accum))
            for m in range(accum):
                idx, _ = o.batch(step * accum + m)
                assert len(idx) == B // (world * accum)
                parts.append(idx)
        got = np.concatenate(parts)
        ref, _ = single.batch(step)
        assert np.array_equal(got, ref)  # the ranks' slices are the 1-process global batch, in order
    # one epoch = every sample exactly once
    first = np.concatenate([single.batch(s)[0] for s in range(n // B)])
    assert sorted(first.tolist()) == list(range(n))


def test_batches_straddle_epochs_without_dropping():
    o = IndexOrder(10, LoaderSpec(global_batch=4, seed=0))
    stream = np.concatenate([o.batch(j)[0] for j in range(5)])  # 20 positions = 2 epochs
    assert np.array_equal(stream[:10], epoch_order(10, 0, 0))
    assert np.array_equal(stream[10:], epoch_order(10, 0, 1))


def test_spec_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible"):
        LoaderSpec(global_batch=10, world_size=4)


# ----------------------------------------------------------------------------- zarr loader


def test_zarr_loader_reads_views_and_resumes(zarr_store):
    r = open_store(zarr_store)
    spec = LoaderSpec(global_batch=6, seed=5, flip=True)
    full = _take(_loader(zarr_store, spec, steps=10), 10)
    # each batch holds the samples the order names, with the view its flip bit names
    order = IndexOrder(len(r), spec)
    flipped = 0
    for j, b in enumerate(full):
        idx, fl = order.batch(j)
        assert b["index"].tolist() == idx.tolist()
        ref = r.get_batch(idx, flip=fl)
        assert torch.equal(b["latents"], torch.from_numpy(ref["latents"]))
        assert torch.equal(b["features"]["a"], torch.from_numpy(ref["features"]["a"]))
        assert b["label"].tolist() == ref["label"].tolist()
        flipped += int(fl.sum())
        plain = r.get_batch(idx)["latents"]
        assert np.array_equal(ref["latents"][~fl], plain[~fl]) and not np.array_equal(ref["latents"][fl], plain[fl])
    assert 0 < flipped < 60
    # resume after 4 steps (DataLoader workers this time): the same sequence continues
    first = _loader(zarr_store, spec, steps=4)
    state = first.state_after(4)
    assert state["position"] == 24
    rest = _take(_loader(zarr_store, spec, steps=6, state=state, workers=2), 6)
    for a, b in zip(full[4:], rest):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["latents"], b["latents"])


# ----------------------------------------------------------------------------- webdataset streams


def test_shuffle_buffer_bounded_and_complete():
    rng = np.random.default_rng(0)
    out = list(shuffle_buffer(iter(range(100)), 10, rng))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    for k, v in enumerate(out[:90]):
        assert v <= k + 10  # output k comes from the first k + size inputs
    again = list(shuffle_buffer(iter(range(100)), 10, np.random.default_rng(0)))
    assert out == again
    assert list(shuffle_buffer(iter(range(5)), 1, rng)) == list(range(5))


def _wds_indices(store, spec, workers, steps, state=None):
    ld = _loader(store, spec, steps=steps, state=state, workers=workers)
    return ld, [b["index"].tolist() for b in _take(ld, steps * spec.grad_accum)]


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_stream_resume_continues_same_sequence(wds_store, workers):
    spec = LoaderSpec(global_batch=4, seed=2, shuffle_buffer=4, flip=True)
    _, full = _wds_indices(wds_store, spec, workers, 12)
    seen = [i for b in full for i in b]
    assert sorted(seen[:30]) != seen[:30]  # shuffled
    for cut in (3, 7):  # 7 steps crosses an epoch of each stream
        ld, _ = _wds_indices(wds_store, spec, workers, cut)
        _, rest = _wds_indices(wds_store, spec, workers, 12 - cut, ld.state_after(cut))
        assert rest == full[cut:], cut


def test_wds_ranks_disjoint_and_cover_each_epoch(wds_store):
    r = open_store(wds_store)
    counts = r.shard_sample_counts()
    per_rank = []
    for rank in range(2):
        spec = LoaderSpec(global_batch=4, seed=7, rank=rank, world_size=2, shuffle_buffer=3)
        ds = WdsStreams(wds_store, spec, r.encoders, 1, counts, [0], 0)
        shards = ds.stream_shards(0, epoch=0)
        n = sum(counts[s] for s in shards)
        it = ds.samples(0, 0)
        per_rank.append([int(next(it)["index"]) for _ in range(n)])
    a, b = map(set, per_rank)
    assert not a & b and a | b == set(range(len(r)))


def test_wds_flip_picks_stored_view(wds_store):
    r = open_store(wds_store)
    spec = LoaderSpec(global_batch=5, seed=0, flip=True, shuffle_buffer=1, shuffle=False)
    b = _take(_loader(wds_store, spec, steps=6), 6)
    flips = epoch_flips(len(r), 0, 0)
    samples = {int(s["index"]): s for sh in range(r.num_shards) for s in r.iter_shard(sh)}
    for batch in b:
        for k, i in enumerate(batch["index"].tolist()):
            want = samples[i]["latents_flip" if flips[i] else "latents"]
            assert np.array_equal(batch["latents"][k].numpy(), want)


@pytest.mark.parametrize("feature_dtype", ["float16", "int8"])
def test_wds_batches_carry_float16_features_equal_to_the_store(tmp_path, feature_dtype):
    store = make_synthetic_store(tmp_path / "s", num_samples=14, shard_size=4, encoders={"a": 8, "b": 4},
                                 grid=(2, 2), format="wds", flip=True, feature_dtype=feature_dtype,
                                 skipped_rows=[5])
    r = open_store(store)
    spec = LoaderSpec(global_batch=4, seed=1, flip=True, shuffle_buffer=5)
    batches = _take(_loader(store, spec, steps=6), 6)  # 24 samples: crosses an epoch
    samples = {int(s["index"]): s for sh in range(r.num_shards) for s in r.iter_shard(sh)}  # eager, float32
    seen = []
    for b in batches:
        assert b["latents"].dtype == torch.float32 and b["label"].dtype == torch.int64
        for k, i in enumerate(b["index"].tolist()):
            epoch = len(seen) // len(r)
            seen.append(i)
            view = "_flip" if epoch_flips(len(r), 1, epoch)[i] else ""
            assert b["label"][k] == samples[i]["label"]
            assert np.array_equal(b["latents"][k].numpy(), samples[i]["latents" + view])
            for e in ("a", "b"):
                assert b["features"][e].dtype == torch.float16  # like the zarr batches
                assert np.array_equal(b["features"][e][k].numpy(), samples[i]["features" + view][e].astype(np.float16))
    assert sorted(seen[:13]) == list(range(13))


# ----------------------------------------------------------------------------- latents


def test_posterior_and_latent_norms():
    mean, std = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4)
    z = sample_posterior(torch.cat([mean, std], 1), noise)
    assert torch.allclose(z, mean + std * noise)
    m = {"vae": {"scaling_factor": 0.18215, "shift_factor": 0.0},
         "latent_stats": {"mean": [0.1, -0.2, 0.3], "std": [2.0, 0.5, 1.0]}}
    sd = LatentNorm.from_manifest(m, "sd")
    assert torch.allclose(sd.normalize(z), z * 0.18215)
    st = LatentNorm.from_manifest(m, "stats")
    ref = (z - torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([2.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(st.normalize(z), ref, atol=1e-6)
    for norm in (sd, st):
        assert torch.allclose(norm.denormalize(norm.normalize(z)), z, atol=1e-5)
        assert torch.allclose(LatentNorm.from_dict(norm.to_dict()).normalize(z), norm.normalize(z))
    with pytest.raises(ValueError, match="latent_stats"):
        LatentNorm.from_manifest({"vae": {}}, "stats", "store X")
