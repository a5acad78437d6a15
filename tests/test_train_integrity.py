"""Issue 9 through irepa-train: a damaged byte stops the run with one line (also from a loader
worker), --skip-damaged trains on and counts, a resumed run removes a killed run's temporaries."""

from __future__ import annotations

import json
import shutil

import pytest

from irepa.stores.testing import make_synthetic_store
from irepa.trainer.cli import main as train_main

FLAGS = ["--model", "SiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--projector-dim", "32",
         "--batch-size", "4", "--lr", "1e-3", "--log-every", "1", "--ckpt-every", "0", "--sample-every", "0",
         "--progress", "false", "--device", "cpu"]


@pytest.fixture()
def damaged(tmp_path):
    """A store whose row 5 features carry one flipped payload byte (shard 0 of 2)."""
    store = make_synthetic_store(tmp_path / "store", num_samples=8, encoders={"e": 16}, grid=(2, 2), shard_size=8)
    shard = store / "features" / "e" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    row_bytes = 4 * 16 * 2 + 4  # fp16 tokens + the row's crc32c
    data[5 * row_bytes + 3] ^= 0x40
    shard.write_bytes(bytes(data))
    return store, shard


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_damaged_byte_stops_training_with_one_line(tmp_path, damaged, capsys, workers):
    store, shard = damaged
    with pytest.raises(SystemExit) as e:
        train_main(["--cache", str(store), "--steps", "2", "--num-workers", workers, "--out", str(tmp_path / "r"),
                    *FLAGS])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "worker" not in err, err
    assert err.startswith("irepa-train: error: ") and str(shard.relative_to(store)) in err and "row 5" in err


def test_skip_damaged_trains_on_and_counts(tmp_path, damaged, capsys):
    store, _ = damaged
    out = tmp_path / "r"
    train_main(["--cache", str(store), "--steps", "4", "--num-workers", "0", "--skip-damaged", "--out", str(out),
                *FLAGS])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["damaged_skipped"] >= 1  # 4 steps x 4 samples = two epochs of 8: row 5 read twice
    assert "skipped a damaged sample (--skip-damaged)" in capsys.readouterr().out


def test_resume_removes_a_killed_runs_temporary_checkpoint(tmp_path, capsys):
    store = make_synthetic_store(tmp_path / "store", num_samples=8, encoders={"e": 16}, grid=(2, 2), shard_size=8)
    out = tmp_path / "r"
    train_main(["--cache", str(store), "--steps", "1", "--num-workers", "0", "--out", str(out), *FLAGS])
    ckpts = out / "checkpoints"
    leftover = ckpts / ".0000002.pt.tmp-999999"  # a process that no longer exists was writing step 2
    shutil.copy(ckpts / "0000001.pt", leftover)
    train_main(["--cache", str(store), "--steps", "2", "--num-workers", "0", "--out", str(out), *FLAGS])
    assert not leftover.exists() and sorted(p.name for p in ckpts.iterdir()) == ["0000001.pt", "0000002.pt"]
    assert f"removed {leftover.name}" in capsys.readouterr().out
