"""The user's own commands (issue 15): runs that cannot be mixed up, what a user watching a long job
sees, optional extras named when missing, empty stores refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from irepa.pipeline.config import OptionError
from irepa.stores import StoreError, StoreLayout, StoreWriter
from irepa.stores.testing import make_synthetic_store
from irepa.trainer.config import resolve_train
from irepa.trainer.train import run

TINY = dict(model="SiT-S/2", hidden_size=32, depth=2, num_heads=2, projector_dim=32, batch_size=8, lr=1e-3,
            log_every=1, ckpt_every=0, sample_every=0, num_workers=0, progress=False, device="cpu")


def train(**kw):
    cfg, opts, notes = resolve_train({**TINY, **kw})
    return run(cfg, opts, notes=tuple(notes))


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    a = make_synthetic_store(root / "a", num_samples=16, encoders={"e": 16, "f": 16}, grid=(2, 2), shard_size=8)
    same_width = make_synthetic_store(root / "b", num_samples=16, encoders={"g": 16}, grid=(2, 2), shard_size=8)
    other_data = make_synthetic_store(root / "c", num_samples=24, encoders={"e": 16}, grid=(2, 2), shard_size=8)
    return a, same_width, other_data


def test_resume_refuses_other_data_or_other_settings(tmp_path, stores):
    a, same_width, other_data = stores
    out = tmp_path / "run"
    train(cache=str(a), encoders="e", steps=2, out=str(out))
    with pytest.raises(OptionError) as e:  # another encoder of the same width: same model, other targets
        train(cache=str(same_width), steps=3, out=str(out))
    msg = str(e.value)
    assert "cannot resume" in msg and str(a) in msg and str(same_width) in msg and " g (" in msg and " e (" in msg
    with pytest.raises(OptionError) as e:  # another dataset (fingerprint), same encoder name and width
        train(cache=str(other_data), steps=3, out=str(out))
    assert "fingerprint" in str(e.value) and str(other_data) in str(e.value)
    with pytest.raises(OptionError, match=r"--gamma 1\.0 -> 0\.5"):  # the alignment recipe is the experiment
        train(cache=str(a), encoders="e", steps=3, gamma=0.5, out=str(out))
    with pytest.raises(OptionError, match=r"--lr 0\.001 -> 0\.002"):
        train(cache=str(a), encoders="e", steps=3, lr=2e-3, out=str(out))
    res = train(cache=str(a), encoders="e", steps=3, num_workers=1, log_every=3, out=str(out))  # how it runs: free
    assert res["step"] == 3


def test_metrics_rows_carry_time_data_wait_and_per_encoder_alignment(tmp_path, stores):
    a, _, _ = stores
    train(cache=str(a), steps=2, out=str(tmp_path / "r"))
    for r in rows(tmp_path / "r"):
        for k in ("elapsed_s", "time", "data_wait_s", "cosine/e", "cosine/f", "align_loss/e", "align_loss/f"):
            assert k in r, (k, sorted(r))
        assert r["data_wait_s"] >= 0 and r["elapsed_s"] > 0
        assert r["cosine"] == pytest.approx((r["cosine/e"] + r["cosine/f"]) / 2, rel=1e-6, abs=1e-7)
        assert r["align_loss/e"] == pytest.approx(-r["cosine/e"], abs=1e-7)


def test_wandb_logs_the_same_rows(tmp_path, stores, monkeypatch):
    """--wandb sends every metrics.jsonl row (a recording stand-in for the wandb module), and the
    real package runs offline into <out>/wandb."""
    import types

    a, _, _ = stores
    calls: dict = {"log": []}

    class FakeRun:
        def log(self, rec, step):
            calls["log"].append((step, rec))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return FakeRun()

    import importlib.machinery

    fake = types.ModuleType("wandb")
    fake.init, fake.__spec__ = init, importlib.machinery.ModuleSpec("wandb", None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "fake"
    train(cache=str(a), steps=2, out=str(out), wandb=True, wandb_mode="offline", wandb_project="p")
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "p" and calls.get("finished")
    assert calls["init"]["config"]["gamma"] == 1.0 and calls["init"]["name"] == "fake"
    logged = [(step, rec) for step, rec in calls["log"]]
    assert [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in rows(out)] == logged
    monkeypatch.undo()
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "real"
    train(cache=str(a), steps=1, out=str(out), wandb=True, wandb_mode="offline")
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_missing_extras_are_named_before_any_work(tmp_path, stores, monkeypatch):
    a, _, _ = stores
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("xformers", "tensorboard", "wandb") else real(name, *args))
    for flag, extra in ((dict(attn="xformers"), "xformers"), (dict(tensorboard=True), "tensorboard"),
                        (dict(wandb=True), "wandb")):
        out = tmp_path / extra
        with pytest.raises(OptionError, match=rf"needs the {extra} package: pip install 'irepa\[{extra}\]'"):
            train(cache=str(a), steps=1, out=str(out), **flag)
        assert not out.exists()


def test_an_empty_store_is_refused_naming_it(tmp_path):
    layout = StoreLayout(num_rows=4, shard_size=4, latent_channels2=8, latent_hw=(4, 4), encoders={"e": (4, 16)})
    w = StoreWriter.open(tmp_path / "empty", "zarr", layout, [f"k{i}" for i in range(4)], np.zeros(4, int),
                         {"encoders": {"e": {"token_grid": [2, 2]}}})
    w.write_shard(0, {"latents": np.zeros((4, 8, 4, 4), np.float32), "features/e": np.zeros((4, 4, 16), np.float32)},
                  [(r, "not an image: cannot identify image file") for r in range(4)])
    w.finalize()
    with pytest.raises(StoreError) as e:
        train(cache=str(tmp_path / "empty"), steps=1, out=str(tmp_path / "r"))
    assert str(tmp_path / "empty") in str(e.value) and "holds no samples" in str(e.value)
    assert "cannot identify image file" in str(e.value)
