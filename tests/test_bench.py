"""The benchmark suite runs: every bench in its --smoke mode prints its table and its ratios.

No timing is asserted anywhere (numbers on a shared CPU are noise); what is checked is that each
bench runs end to end, and the figures that do not depend on timing: byte counts against the
arithmetic, fused vs plain alignment agreeing, FLOP counts ordered as they must be.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import align, build, loader, storage, train_step  # noqa: E402

MODULES = {"align": align, "storage": storage, "train_step": train_step, "loader": loader, "build": build}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        MODULES[name].main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m bench.{name}" in out and "--smoke" in out


def _tables(out: str) -> None:
    assert "# machine: cpu:" in out
    assert "\n### " in out and "|---" in out, "no markdown table printed"
    assert out.rstrip().split("\nratios:\n", 1)[1].strip(), "no ratios block at the end"


def test_align_smoke(capsys):
    res = align.main(["--smoke", "--device", "cpu"])
    _tables(capsys.readouterr().out)
    assert {r["preset"] for r in res["records"]} == {"repa", "irepa"}
    for r in res["records"]:
        assert r["loss_diff"] < 1e-5 and r["grad_rel_diff"] < 1e-4  # fused == plain
        assert r["fused"]["saved"] == 0 < r["plain"]["saved"]      # fused keeps nothing for backward


def test_storage_smoke(capsys):
    res = storage.main(["--smoke", "--device", "cpu"])
    _tables(capsys.readouterr().out)
    zarr = [r for r in res["records"] if r["format"] == "zarr"]
    assert len(zarr) == 4 and {r["format"] for r in res["records"]} == {"zarr", "wds"}
    for r in zarr:
        # each feature array adds zarr's 16-byte shard-index entry and (format 2) a 4-byte crc32c
        # per sample, nothing else
        n_arrays = (2 if r["dtype"] == "int8" else 1) * (2 if r["flip"] else 1)
        assert r["feat_per_sample"] == r["arithmetic"]["features"] + (16 + 4) * n_arrays
        assert r["per_sample"] >= r["arithmetic"]["total"]
    by = {(r["flip"], r["dtype"]): r for r in zarr}
    for flip in (False, True):
        assert by[(flip, "int8")]["feat_per_sample"] < by[(flip, "float16")]["feat_per_sample"]
    for f in res["fidelity"]:
        assert 0.99 < f["int8_mean"] <= 1.0 + 1e-9 and f["int8_worst"] <= f["int8_mean"]
        assert f["fp16_mean"] > 0.99999


def test_train_step_smoke(capsys):
    res = train_step.main(["--smoke", "--device", "cpu"])
    out = capsys.readouterr().out
    _tables(out)
    (r,) = res["records"]
    assert set(r["times"]) == {"no-align", "cached", "online", "online: VAE", "online: encoder"}
    assert all(v > 0 for v in r["times"].values())
    f = r["flops_per_image"]
    assert f["step no-align"] < f["step cached plain"] < f["step cached"]


def test_loader_smoke(capsys):
    res = loader.main(["--smoke", "--device", "cpu"])
    _tables(capsys.readouterr().out)
    kinds = {(r["format"], r["cache"], r["reader"]) for r in res["records"]}
    want = {(f, c, k) for f in ("zarr", "wds") for c in ("warm", "cold") for k in ("plain", "loader")}
    want |= {("zarr", c, f"get_batch {d}") for c in ("warm", "cold") for d in ("fp32", "fp16")}
    assert kinds == want
    assert all(r["samples"] > 0 and r["samples_per_s"] > 0 for r in res["records"])


def test_build_smoke(capsys):
    res = build.main(["--smoke", "--device", "cpu"])
    _tables(capsys.readouterr().out)
    assert set(res["decode"]) == {0, 1} and res["model_rate"] > 0 and res["build_rate"] > 0
    assert res["flops_per_image"] > 0


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore", PYTHON=sys.executable)


def test_run_all_smoke_one():
    p = subprocess.run([sys.executable, "-m", "bench.run_all", "--smoke", "--only", "align"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "## bench.align" in p.stdout and "ratios:" in p.stdout and "exit 0" in p.stdout


def test_run_all_rejects_unknown():
    p = subprocess.run([sys.executable, "-m", "bench.run_all", "--only", "nope"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "unknown bench" in p.stderr


def test_gpu_sh_dry_run(tmp_path):
    log = tmp_path / "gpu.log"
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--log", str(log)], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = log.read_text()
    for name in ("align", "train_step", "build"):
        assert f"## bench.{name}" in text and f"(bench.{name}:" in text
    assert "DRY RUN" in text and "failed: none" in text
    assert text.count("ratios:") == 3
