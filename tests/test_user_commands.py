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


# ----------------------------------------------------------------------------- the build side

import os  # noqa: E402
import subprocess  # noqa: E402

from PIL import Image  # noqa: E402

from irepa.pipeline.build import build_store  # noqa: E402
from irepa.pipeline.cli import COMMANDS, run_fire  # noqa: E402
from irepa.stores import open_store, read_manifest, verify_store  # noqa: E402

TINY_BUILD = ["--resolution", "32", "--encoder-config", "tiny", "--vae", "tiny", "--num-workers", "0",
              "--device", "cpu", "--progress", "false"]


def _cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_the_users_literal_two_commands_on_the_demo(tmp_path):
    build = _cli(["-m", "irepa.pipeline.cli", "build", "--encoder", "siglip", "--num-workers", "0"], tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    first = build.stdout.splitlines()[0]
    assert "bundled demo" in first and "tiny random" in first and "stores/siglip" in first  # said before starting
    store = tmp_path / "stores" / "siglip"
    m = read_manifest(store)
    assert list(m["encoders"]) == ["siglip-vit-b"] and m["build_args"]["encoder"] == ["siglip-vit-b"]
    insp = _cli(["-m", "irepa.pipeline.cli", "inspect", "stores/siglip"], tmp_path)
    assert "encoder siglip-vit-b:" in insp.stdout
    train = _cli(["-m", "irepa.trainer", "--cache", "stores/siglip", "--model", "SiT-S/2", "--hidden-size", "32",
                  "--depth", "2", "--num-heads", "2", "--batch-size", "4", "--steps", "2", "--sample-every", "0",
                  "--num-workers", "0", "--progress", "false", "--device", "cpu"], tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    assert len(list((tmp_path / "runs").glob("*/checkpoints/0000002.pt"))) == 1


def test_irepa_data_is_the_default_source(tmp_path, images, monkeypatch):
    monkeypatch.setenv("IREPA_DATA", str(images))
    monkeypatch.chdir(tmp_path)
    build_store(encoder="dinov2-vit-s", resolution=32, encoder_config="tiny", vae="tiny", num_workers=0,
                device="cpu", progress=False, shard_size=4)
    m = read_manifest(tmp_path / "stores" / "dinov2-vit-s")
    assert m["num_rows"] == 6 and m["dataset"]["source"] == str(images) and m["build_args"]["data"] == str(images)


def _fails_before_any_work(argv: list[str], out: Path, capsys, *needles: str) -> str:
    with pytest.raises(SystemExit) as e:
        run_fire(COMMANDS, "irepa-cache", ["build", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()  # no half-made store to delete by hand
    return err


def test_arguments_are_checked_before_a_folder_or_a_model(tmp_path, images, capsys, monkeypatch):
    import irepa.pipeline.build as build_mod

    def no_models(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(build_mod, "load_encoder", no_models)
    monkeypatch.setattr(build_mod, "load_vae", no_models)
    out = tmp_path / "x"
    data = ["--data", str(images)]
    _fails_before_any_work([*data, "--encoder", "sigclip", *TINY_BUILD], out, capsys,
                           "unknown encoder 'sigclip'", "did you mean", "siglip")
    _fails_before_any_work([*data, "--encoder", "siglip", "--cls", *TINY_BUILD], out, capsys,
                           "--cls: encoder siglip-vit-b has no CLS token")
    _fails_before_any_work([*data, "--batch-size", "0", *TINY_BUILD], out, capsys, "--batch-size must be >= 1")
    _fails_before_any_work([*data, "--resolution", "320"], out, capsys, "--resolution 320", "256 and 512")
    _fails_before_any_work([*data, "--encoder", "dinov2mixed-vit-b", *TINY_BUILD], out, capsys,
                           "dinov2mixed", "add --cls")


def test_a_source_without_a_decodable_image_writes_no_store(tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "c").mkdir(parents=True)
    (bad / "c" / "x.jpg").write_bytes(b"not an image")
    (bad / "c" / "y.png").write_bytes(b"")
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as e:
        run_fire(COMMANDS, "irepa-cache", ["build", "--data", str(bad), "--out", str(out), "--encoder", "dinov2-vit-s",
                                           *TINY_BUILD])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"data {bad}" in err and "none of its 2 inputs decodes" in err and "empty file" in err
    assert not out.exists()


def test_no_hub_access_fails_in_one_line_naming_the_model_and_the_offline_flags(tmp_path, images):
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    common = ["-m", "irepa.pipeline.cli", "build", "--data", str(images), "--num-workers", "0", "--device", "cpu",
              "--resolution", "256", "--out", str(tmp_path / "s")]
    res = _cli([*common, "--encoder", "dinov2-vit-s", "--vae", "tiny"], tmp_path, env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "timm/vit_small_patch14_dinov2.lvd142m" in res.stderr and "--weights dinov2-vit-s=PATH" in res.stderr
    res = _cli([*common, "--encoder", "dinov2-vit-s", "--encoder-config", "tiny"], tmp_path,
               {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there
    assert res.returncode == 2 and "stabilityai/sd-vae-ft-ema" in res.stderr and "--vae PATH" in res.stderr
    assert "cannot be reached" in res.stderr and not (tmp_path / "s").exists()


def test_closed_pipe_exits_quietly(tmp_path):
    store = make_synthetic_store(tmp_path / "s", num_samples=8, encoders={"e": 16}, grid=(2, 2))
    res = subprocess.run(f"{sys.executable} -m irepa.pipeline.cli inspect {store} | head -1", shell=True,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("store ") and res.stderr == "", res.stderr


def test_overwrite_rebuilds_another_builds_store(tmp_path, images, capsys):
    out = tmp_path / "s"
    base = ["build", "--data", str(images), "--out", str(out), "--encoder", "dinov2-vit-s", "--shard-size", "4",
            *TINY_BUILD]
    run_fire(COMMANDS, "irepa-cache", base)
    with pytest.raises(SystemExit):
        run_fire(COMMANDS, "irepa-cache", [*base[:-len(TINY_BUILD)], "--flip", *TINY_BUILD])
    assert "--overwrite to delete this store" in capsys.readouterr().err
    run_fire(COMMANDS, "irepa-cache", [*base, "--flip", "--overwrite"])
    assert open_store(out).has_flip


def test_verify_checks_and_relink_fixes_a_moved_latents_store(tmp_path, images, capsys):
    lat, feat = tmp_path / "lat", tmp_path / "feat"
    kw = dict(data=str(images), resolution=32, encoder_config="tiny", vae="tiny", num_workers=0, device="cpu",
              progress=False, shard_size=4)
    build_store(out=str(lat), encoder="dinov2-vit-s", **kw)
    build_store(out=str(feat), encoder="dinov2-vit-b", latents_from=str(lat), **kw)
    assert verify_store(feat).ok
    moved = tmp_path / "elsewhere" / "lat"
    moved.parent.mkdir()
    lat.rename(moved)
    rep = verify_store(feat)
    assert not rep.ok and "does not exist" in rep.format() and "irepa-cache relink" in rep.format()
    with pytest.raises(SystemExit):  # a store that holds no latents of its own
        run_fire(COMMANDS, "irepa-cache", ["relink", str(feat), "--latents-from", str(feat)])
    assert "that store borrows its latents too" in capsys.readouterr().err
    other = make_synthetic_store(tmp_path / "other", num_samples=6, encoders={"e": 16}, grid=(2, 2), shard_size=4)
    with pytest.raises(SystemExit):  # another dataset
        run_fire(COMMANDS, "irepa-cache", ["relink", str(feat), "--latents-from", str(other)])
    assert "dataset fingerprint" in capsys.readouterr().err
    run_fire(COMMANDS, "irepa-cache", ["relink", str(feat), "--latents-from", str(moved)])
    assert verify_store(feat).ok and read_manifest(feat)["latents_from"]["path"] == "../elsewhere/lat"
    assert len(open_store(feat)) == 6


def test_dinov2mixed_trains_from_the_dinov2_cache_with_cls(tmp_path, images):
    """--encoders dinov2mixed-vit-b (the official name) aligns to 0.1 CLS + 0.9 patch tokens of the
    cached dinov2-vit-b features: no second cache (issue 14)."""
    import torch

    from irepa.trainer.data import LoaderSpec
    from irepa.trainer.run_data import CacheSource, Target

    kw = dict(data=str(images), resolution=32, encoder_config="tiny", vae="tiny", num_workers=0, device="cpu",
              progress=False, shard_size=4)
    with_cls = build_store(out=str(tmp_path / "cls"), encoder="dinov2-vit-b", cls=True, **kw)
    no_cls = build_store(out=str(tmp_path / "nocls"), encoder="dinov2-vit-b", **kw)
    reader = open_store(with_cls)
    src = CacheSource(reader, [Target("dinov2mixed-vit-b", "dinov2-vit-b", "dinov2mixed"), Target("dinov2-vit-b", "dinov2-vit-b")],
                      LoaderSpec(global_batch=4, shuffle=False), 1, None, 0, torch.device("cpu"))
    b = next(iter(src))
    raw = reader.get_batch(b["index"].numpy())
    mixed = 0.1 * raw["cls"]["dinov2-vit-b"][:, None, :] + 0.9 * raw["features"]["dinov2-vit-b"]
    torch.testing.assert_close(b["features"][0], torch.as_tensor(mixed), rtol=1e-3, atol=1e-3)  # fp16 storage
    torch.testing.assert_close(b["features"][1].float(), torch.as_tensor(raw["features"]["dinov2-vit-b"]),
                               rtol=1e-3, atol=1e-3)
    out = tmp_path / "run"
    train(cache=str(with_cls), encoders="dinov2mixed-vit-b", steps=1, out=str(out))
    assert "cosine/dinov2mixed-vit-b" in rows(out)[0]
    with pytest.raises(ValueError, match="stores no CLS token for dinov2-vit-b; rebuild it with --cls"):
        train(cache=str(no_cls), encoders="dinov2mixed-vit-b", steps=1, out=str(tmp_path / "r2"))


def test_a_rerun_is_complete_only_with_the_same_options(tmp_path, images, capsys):
    """A finished store answers 'nothing to do' to the same command only: --cls, a different VAE or
    tiny vs pretrained encoders go through the full checks (and are refused as another build)."""
    out = tmp_path / "s"
    base = ["build", "--data", str(images), "--out", str(out), "--encoder", "dinov2-vit-s", *TINY_BUILD]
    run_fire(COMMANDS, "irepa-cache", base)
    capsys.readouterr()
    run_fire(COMMANDS, "irepa-cache", base)
    assert "already complete for this build; nothing to do" in capsys.readouterr().out
    for extra in (["--cls"], ["--vae", "tiny:1"]):
        with pytest.raises(SystemExit):
            run_fire(COMMANDS, "irepa-cache", [*base, *extra])
        err = capsys.readouterr().err
        assert "was started by a different build" in err or "differing fields" in err, err
    # --overwrite is how the build ran, not what it wrote: reloading build_args never deletes a store
    run_fire(COMMANDS, "irepa-cache", [*base, "--overwrite"])
    assert "overwrite" not in read_manifest(out)["build_args"]


def test_a_sampler_the_previews_would_fail_on_is_refused_before_step_0(tmp_path, stores):
    a, _, _ = stores
    for kw, msg in ((dict(sample_method="euler"), "--sample-method euler is not a sampler of --objective flow"),
                    (dict(sample_method="sde", sample_steps=1), "--sample-method sde needs --sample-steps >= 2"),
                    (dict(sample_steps=0), "--sample-steps must be >= 1")):
        out = tmp_path / "r"
        with pytest.raises(OptionError, match=msg):
            train(cache=str(a), steps=20, sample_every=10, out=str(out), **kw)
        assert not (out / "checkpoints").exists()


def test_a_store_built_as_dinov2mixed_aligns_to_the_mix_by_default(tmp_path, images):
    store = build_store(data=str(images), out=str(tmp_path / "mixed"), encoder="dinov2mixed-vit-b", cls=True,
                        resolution=32, encoder_config="tiny", vae="tiny", num_workers=0, device="cpu",
                        progress=False, shard_size=4)
    m = read_manifest(store)
    assert list(m["encoders"]) == ["dinov2-vit-b"]  # one cache, the canonical encoder
    assert m["encoders"]["dinov2-vit-b"]["transform"] == "dinov2mixed"
    train(cache=str(store), steps=1, out=str(tmp_path / "r"))  # no --encoders: the store's own target
    assert "cosine/dinov2mixed-vit-b" in rows(tmp_path / "r")[0]
