"""irepa-train --eval-every: FID-K of EMA samples in metrics.jsonl equals irepa-eval's FID of the
same images computed another way (issue 13)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from irepa.pipeline.build import build_store
from irepa.trainer.config import SampleConfig, resolve_train
from irepa.trainer.evaluate import fid_of_images
from irepa.trainer.inception import load_inception
from irepa.trainer.sample import generate, load_for_sampling
from irepa.trainer.train import run


def test_training_time_fid_equals_the_fid_of_the_same_samples(tmp_path):
    store = build_store(out=str(tmp_path / "store"), encoder="dinov2-vit-s", vae="tiny", encoder_config="tiny",
                        resolution=32, shard_size=5, batch_size=5, num_workers=0, device="cpu", progress=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8))
    cfg, opts, _ = resolve_train(dict(
        cache=str(store), model="SiT-S/2", hidden_size=32, depth=2, num_heads=2, projector_dim=32, batch_size=4,
        steps=2, log_every=1, ckpt_every=0, sample_every=0, num_workers=0, progress=False, device="cpu",
        sample_steps=3, eval_every=2, eval_ref=str(tmp_path / "ref.npz"), eval_samples=6,
        eval_inception_weights="random", out=str(tmp_path / "run")))
    run(cfg, opts)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fid_rows = [r for r in rows if "fid_6" in r]
    assert [r["step"] for r in fid_rows] == [2] and np.isfinite(fid_rows[0]["fid_6"]) and fid_rows[0]["fid_6"] > 0
    # the same 6 images, sampled from the step-2 checkpoint's EMA as irepa-sample would, scored directly
    objective, ema, extra = load_for_sampling(SampleConfig(ckpt=str(tmp_path / "run"), device="cpu"),
                                              torch.device("cpu"))
    images = generate(objective, ema, objective.decoder(None, extra), list(range(6)), cfg.seed, method="ode",
                      steps=3)
    want = fid_of_images(torch.from_numpy(images).permute(0, 3, 1, 2), tmp_path / "ref.npz",
                         network=load_inception("random", "cpu"))
    assert fid_rows[0]["fid_6"] == pytest.approx(want, rel=1e-6)


def test_eval_every_needs_a_reference():
    from irepa.pipeline.config import OptionError

    with pytest.raises(OptionError, match="--eval-every N needs --eval-ref REF"):
        resolve_train({"eval_every": 100})
