"""Helpers shared by the training tests (test_train, test_meanflow_train, test_jit_train,
test_repae_train): reading metrics.jsonl, a 2-rank torchrun, a store the alignment can learn, and
the one-thread fixture (import it into a test module to make it apply there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irepa.stores import StoreLayout, StoreWriter


def metrics(out) -> list[dict]:
    """The rows of ``<out>/metrics.jsonl``."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the 2 cores are shared with the DDP tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def torchrun_2ranks(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` in ``tmp_path`` with the installed package
    (irepa.*); fails the test with the output's tail when it exits non-zero."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + args
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def learnable_store(path, n=8, c=4, hw=(4, 4), d=16, std=0.01, seed=0) -> np.ndarray:
    """A store (VAE "tiny": previews decode) whose features are a fixed linear map of each token's
    latent patch, so the alignment can be learnt; returns the posterior means [n, c, h, w]."""
    rng = np.random.default_rng(seed)
    gh, gw = hw[0] // 2, hw[1] // 2
    layout = StoreLayout(num_rows=n, shard_size=n, latent_channels2=2 * c, latent_hw=hw,
                         encoders={"enc": (gh * gw, d)})
    mean = rng.normal(0, 1, (n, c, *hw)).astype(np.float32)
    patches = mean.reshape(n, c, gh, 2, gw, 2).transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * 4)
    feats = (patches @ rng.normal(0, 1, (c * 4, d))).astype(np.float32)
    info = {"dataset": {"source": "test", "num_classes": 4, "class_names": list("abcd")},
            "image": {"resolution": 8 * hw[0], "crop": "adm"},
            "vae": {"id": "tiny", "latent_channels": c, "scaling_factor": 0.18215, "shift_factor": 0.0},
            "encoders": {"enc": {"timm_id": "test", "weights_sha256": None, "token_grid": [gh, gw],
                                 "input_size": 16 * gh}},
            "build_args": {}}
    w = StoreWriter.open(path, "zarr", layout, [f"k{i}" for i in range(n)], np.arange(n) % 4, info,
                         resume=False, overwrite=True)
    w.write_shard(0, {"latents": np.concatenate([mean, np.full_like(mean, std)], 1), "features/enc": feats}, [])
    w.finalize()
    return mean
