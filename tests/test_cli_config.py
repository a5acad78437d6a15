"""Config dataclasses and strict command lines (issue 8): flags, booleans, types, precedence,
--config reloads, the objective seam from outside, --init-from strictness, the irepa namespace."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from irepa.pipeline.build_config import BuildConfig
from irepa.pipeline.config import OptionError, coerce, format_help, parse_argv, resolve
from irepa.stores import open_store
from irepa.stores.testing import make_synthetic_store
from irepa.trainer.config import TrainConfig, resolve_train

TINY = dict(model="SiT-S/2", hidden_size=32, depth=2, num_heads=2, projector_dim=32, batch_size=8, lr=1e-3,
            log_every=1, ckpt_every=0, sample_every=0, num_workers=0, progress=False, device="cpu")


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("s") / "store", num_samples=16, encoders={"e": 16},
                                grid=(2, 2), shard_size=8)


# ----------------------------------------------------------------------------- flags


def test_booleans_types_spellings_and_help_flag():
    for argv, want in ((["--flip", "false"], False), (["--flip", "no"], False), (["--flip", "0"], False),
                       (["--flip"], True), (["--flip", "yes"], True), (["--flip=1"], True), (["--noflip"], False),
                       (["--no-flip"], False)):
        assert parse_argv(BuildConfig, argv, "b").values == {"flip": want}, argv
    assert parse_argv(BuildConfig, ["--shard_size", "8", "--shard-size=9"], "b").values == {"shard_size": 9}
    assert parse_argv(BuildConfig, ["-h"], "b").help and parse_argv(BuildConfig, ["--help"], "b").help
    with pytest.raises(OptionError, match=r"--flip takes true/false/yes/no/1/0; got 'maybe'"):
        parse_argv(BuildConfig, ["--flip", "maybe"], "b")
    with pytest.raises(OptionError, match=r"unknown flag --shard-sise; did you mean --shard-size\?"):
        parse_argv(BuildConfig, ["--shard-sise", "8"], "b")
    with pytest.raises(OptionError, match=r"--resolution takes an integer; got 'abc'"):
        parse_argv(BuildConfig, ["--resolution", "abc"], "b")
    with pytest.raises(OptionError, match=r"--format must be one of zarr, wds; got 'zar' \(did you mean zarr\?\)"):
        parse_argv(BuildConfig, ["--format", "zar"], "b")
    with pytest.raises(OptionError, match="unknown short flag -s"):
        parse_argv(BuildConfig, ["-s", "8"], "b")
    with pytest.raises(OptionError, match=r"--gamma takes a number; got 'abc'"):
        parse_argv(TrainConfig, ["--gamma", "abc"], "t")
    assert coerce("0.9,0.95", tuple[float, float], "--betas") == (0.9, 0.95)
    with pytest.raises(OptionError, match="--betas takes 2 comma-separated values"):
        coerce("0.9", tuple[float, float], "--betas")
    text = format_help(BuildConfig, "irepa-cache build", "summary")
    assert "--shard-size N" in text and "[default: 1024]" in text and "--flip, --noflip" in text
    assert "--shard_size" not in text and "--pretrained" not in text  # dashed names; hidden fields hidden


def test_direct_construction_is_checked_too():
    with pytest.raises(OptionError, match="--batch-size must be >= 1"):
        BuildConfig(batch_size=0)
    with pytest.raises(OptionError, match="--precision must be one of bf16, fp32"):
        TrainConfig(precision="fp8")
    assert TrainConfig(ema=0.99).ema == (0.99,) and TrainConfig(betas="0.9,0.95").betas == (0.9, 0.95)


def _cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_misspelt_flag_exits_2_before_any_work(tmp_path):
    out = tmp_path / "never"
    t0 = time.perf_counter()
    res = _cli(["irepa.pipeline.cli", "build", "--shard-sise", "8", "--out", str(out)], tmp_path)
    took = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr
    assert "unknown flag --shard-sise; did you mean --shard-size?" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()  # no store folder, no model loaded
    print(f"misspelt build flag answered in {took:.2f} s")  # informative only: no timing thresholds in tests
    res = _cli(["irepa.trainer", "--cach", str(tmp_path), "--out", str(out)], tmp_path)
    assert res.returncode == 2 and "did you mean --cache?" in res.stderr and not out.exists()
    res = _cli(["irepa.trainer", "--mf-ratio", "0.5", "--out", str(out)], tmp_path)
    assert res.returncode == 2 and not out.exists()


def test_command_lines_are_checked_before_torch_loads(tmp_path):
    """A misspelt flag, a flag of another objective's and --help are answered without importing
    torch (the objectives' options are plain dataclasses), which is what makes them instant."""
    probe = (
        "import sys\n"
        "from irepa.trainer.cli import main\n"
        "sys.argv = ['irepa-train'] + sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)\n")
    # (--objective jit --help does import it: it shows what the objective's presets resolve to)
    for args, code in ((["--cach", "x"], 2), (["--mf-rato", "0.5"], 2), (["--help"], 0)):
        res = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        assert res.stdout.strip().splitlines()[-1] == f"NO-TORCH {code}", (args, res.stdout[-300:], res.stderr)
    res = subprocess.run([sys.executable, "-c", probe, "--mf-rato", "0.5"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert "unknown flag --mf-rato; did you mean --mf-ratio" in res.stderr
    from irepa.trainer.objectives import get_objective, objective_names, objective_options

    for name in objective_names():  # the light table and the objective classes agree
        assert objective_options(name) is get_objective(name).Options


def test_help_shows_what_an_objective_resolves_to(capsys):
    from irepa.trainer.cli import main

    main(["--help"])
    plain = capsys.readouterr().out
    assert "--betas B1,B2\n      AdamW betas [default: 0.9,0.999]" in plain
    assert "`irepa-train --objective NAME --help`" in plain
    main(["--objective", "jit", "--help"])
    extra = capsys.readouterr().out.split("resolved with --objective jit (presets applied)")[1]
    rows = dict(line.split(None, 1) for line in extra.strip().splitlines()[1:])
    assert rows["--betas"] == "0.9,0.95" and rows["--blr"] == "5e-05" and rows["--align"] == "irepa-official-jit"
    assert rows["--ema"] == "0.9999,0.9996" and rows["--gamma"] == "0.8" and "--objective" not in rows
    main(["--objective", "meanflow", "--align", "repa", "--help"])
    extra = capsys.readouterr().out.split("(presets applied)")[1]
    rows = dict(line.split(None, 1) for line in extra.strip().splitlines()[1:])
    assert rows["--projector"] == "mlp" and rows["--proj-coeff"] == "0.5" and rows["--sample-steps"] == "1"


def test_flip_false_builds_without_flips(tmp_path):
    from irepa.pipeline.cli import COMMANDS, run_fire

    common = ["--encoder", "dinov2-vit-s", "--resolution", "32", "--batch-size", "5", "--num-workers", "0",
              "--device", "cpu", "--progress", "false"]
    run_fire(COMMANDS, "irepa-cache", ["build", "--flip", "false", "--out", str(tmp_path / "a"), *common])
    run_fire(COMMANDS, "irepa-cache", ["build", "--flip", "--out", str(tmp_path / "b"), *common])
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    assert not a.has_flip and "flip/latents" not in a.manifest["arrays"]
    assert b.has_flip and "flip/latents" in b.manifest["arrays"]
    # the store records the resolved options; --config of its manifest reloads them
    assert a.manifest["build_args"]["flip"] is False and a.manifest["build_args"]["batch_size"] == 5
    cfg = resolve(BuildConfig, {"out": str(tmp_path / "c")}, str(tmp_path / "a" / "manifest.json"))[0]
    assert cfg.flip is False and cfg.batch_size == 5 and cfg.encoder == ["dinov2-vit-s"] and cfg.resolution == 32


# ----------------------------------------------------------------------------- precedence


def test_precedence_flag_config_preset_default(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("align: irepa\nprojector: mlp\ngamma: 0.5\nbatch-size: 32\npath_type: cosine\n")
    cfg, opts, notes = resolve_train({"gamma": 0.7}, str(conf))
    assert cfg.gamma == 0.7                       # flag beats the config file
    assert cfg.projector == "mlp"                 # the config file beats the preset (irepa: conv)
    assert cfg.projector_kernel == 3 and cfg.spatial_norm == "zscore" and cfg.proj_coeff == 1.0  # preset
    assert cfg.batch_size == 32 and cfg.steps == 400_000  # config file, default
    assert opts.path_type == "cosine"             # the objective's own option from the same file
    # a flag naming another preset drops the config file's values of that preset's fields
    cfg, _, notes = resolve_train({"align": "repa"}, str(conf))
    assert (cfg.projector, cfg.spatial_norm, cfg.proj_coeff, cfg.gamma) == ("mlp", "none", 0.5, 1.0)
    assert notes and "--align is repa now (the config file had irepa)" in notes[0] and "gamma" in notes[0]
    # a flag that changes a preset through another one: a flow run's resolved args + --objective jit
    # gives JiT's own alignment recipe and optimiser, not a mix with the file's iREPA head
    flow_args = tmp_path / "args.json"
    flow_args.write_text(json.dumps({"objective": "flow", "model": "SiT-B/2", "align": "irepa", "projector": "conv",
                                     "projector_kernel": 3, "spatial_norm": "zscore", "gamma": 1.0, "proj_coeff": 1.0,
                                     "betas": [0.9, 0.999], "batch_size": 64}))
    cfg, _, notes = resolve_train({"objective": "jit"}, str(flow_args))
    assert (cfg.model, cfg.align, cfg.gamma, cfg.proj_coeff, cfg.betas) == (
        "JiT-B/16", "irepa-official-jit", 0.8, 0.5, (0.9, 0.95))
    assert cfg.batch_size == 64 and any("--align is irepa-official-jit now" in n for n in notes)
    with pytest.raises(OptionError, match=r"unknown option\(s\) gama \(did you mean gamma\?\)"):
        resolve_train(config={"gama": 1.0})
    with pytest.raises(ValueError, match=r"unknown --objective 'flwo': expected one of .*flow.*; did you mean flow"):
        resolve_train({"objective": "flwo"})


def test_config_args_json_reproduces_a_run(tmp_path, store):
    from irepa.trainer.cli import train

    train(cache=str(store), steps=3, out=str(tmp_path / "a"), seed=5, **TINY)
    args = json.loads((tmp_path / "a" / "args.json").read_text())
    assert args["projector"] == "conv" and args["projector_kernel"] == 3 and args["gamma"] == 1.0  # resolved
    assert args["path_type"] == "linear"  # the objective's options beside the common ones
    train(config=str(tmp_path / "a" / "args.json"), out=str(tmp_path / "b"))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [m["loss"] for m in a] == [m["loss"] for m in b] and len(a) == 3


def test_torchrun_module_from_a_folder_with_stores_and_trainer_dirs(tmp_path, store):
    (tmp_path / "stores").mkdir()  # a data folder named like the package: must not shadow irepa.stores
    (tmp_path / "trainer").mkdir()
    flags = ["--cache", str(store), "--model", "SiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2",
             "--projector-dim", "32", "--batch-size", "8", "--steps", "1", "--num-workers", "0", "--progress", "false",
             "--sample-every", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "irepa.trainer", *flags], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(metrics(tmp_path / "run")) == 1


# ----------------------------------------------------------------------------- the objective seam


def test_a_toy_objective_registered_from_a_test_file_trains(tmp_path, store):
    from irepa.pipeline.config import option
    from irepa.trainer.objectives import Objective, Phase, register
    from irepa.trainer.train import run

    @dataclasses.dataclass
    class ToyOptions:
        toy_scale: float = option(2.0, "target scale")

    class ToyStep(nn.Module):
        def __init__(self, model, scale):
            super().__init__()
            self.model, self.scale = model, scale

        def forward(self, batch, draws, carry):
            mean = batch["latents"][:, :4].float()
            err = ((self.model(mean) - self.scale * draws["noise"]) ** 2).mean()
            return {"loss": err, "mse": err.detach()}

    @register
    class Toy(Objective):
        name = "toy"
        Options = ToyOptions

        def model_config(self):
            return {"channels": self.data.latent_shape[0] // 2}

        def build_model(self, config):
            m = nn.Conv2d(config["channels"], config["channels"], 1)
            m.projectors, m.num_classes = nn.ModuleList(), self.data.num_classes
            return m

        def draw(self, batch, generator, device):
            c2, h, w = self.data.latent_shape
            return {"noise": torch.randn((batch, c2 // 2, h, w), generator=generator, device=device)}

        def phases(self, model, extra):
            return [Phase("model", ToyStep(model, self.opts.toy_scale), list(model.parameters()))]

    cfg, opts, _ = resolve_train({"objective": "toy", "toy_scale": 3.0, "cache": str(store), "steps": 3,
                                  "out": str(tmp_path / "toy"), "align": "none", **TINY})
    assert opts.toy_scale == 3.0
    with pytest.raises(OptionError, match="--toy-scale belongs to --objective toy, not flow"):
        resolve_train({"toy_scale": 3.0})
    with pytest.raises(OptionError, match=r"--path-type belongs to --objective flow( / \w+)*, not toy"):
        resolve_train({"objective": "toy", "path_type": "cosine"})
    res = run(cfg, opts)
    rows = metrics(tmp_path / "toy")
    assert res["step"] == 3 and [r["step"] for r in rows] == [1, 2, 3] and rows[0]["mse"] > 0
    assert json.loads((tmp_path / "toy" / "args.json").read_text())["toy_scale"] == 3.0


# ----------------------------------------------------------------------------- --init-from


def test_init_from_is_strict_unless_partial(tmp_path, store, capsys):
    from irepa.trainer.train import run

    run(resolve_train({"cache": str(store), "steps": 1, "align": "repa", "out": str(tmp_path / "mlp"), **TINY})[0])
    ck = next((tmp_path / "mlp" / "checkpoints").glob("*.pt"))
    conv = {"cache": str(store), "steps": 0, "align": "irepa", "init_from": str(ck), **TINY}
    with pytest.raises(ValueError) as e:  # REPA's MLP projector into a conv-projector model
        run(resolve_train({**conv, "out": str(tmp_path / "strict")})[0])
    msg = str(e.value)
    assert "projectors.0.0.weight" in msg and "projectors.0.weight" in msg and str(ck) in msg
    run(resolve_train({**conv, "init_from_partial": True, "out": str(tmp_path / "partial")})[0])
    out = capsys.readouterr().out
    assert "left out" in out and "projectors.0.weight" in out


def test_build_format_choices_are_the_store_backends():
    """BuildConfig stays torch- and zarr-free, so it names the formats itself: keep them equal."""
    import dataclasses

    from irepa.stores import BACKENDS

    f = {x.name: x for x in dataclasses.fields(BuildConfig)}["format"]
    assert tuple(f.metadata["choices"]) == tuple(BACKENDS)


def test_step_draws_do_not_depend_on_how_the_batch_is_split():
    """Rows of a step's draws are the same whatever rows a rank or micro-batch asks for (blocks of
    DRAW_BLOCK rows seeded by (seed, step, block)): N ranks == 1 rank, and no rank draws the whole
    global batch."""
    from irepa.trainer.objectives import DataSpec, get_objective
    from irepa.trainer.train import DRAW_BLOCK, draw_rows

    cfg, opts, _ = resolve_train({})
    flow = get_objective("flow")(cfg, opts, DataSpec(latent_shape=(8, 4, 4)), None, torch.device("cpu"))
    whole = draw_rows(flow, 3, 7, 0, 200, torch.device("cpu"))
    parts = [draw_rows(flow, 3, 7, lo, hi, torch.device("cpu")) for lo, hi in ((0, 37), (37, 130), (130, 200))]
    for key, v in whole.items():
        assert v.shape[0] == 200
        assert torch.equal(v, torch.cat([p[key] for p in parts])), key
    other_step = draw_rows(flow, 3, 8, 0, 200, torch.device("cpu"))
    assert not torch.equal(whole["eps"], other_step["eps"])
    assert DRAW_BLOCK < 200  # the test crosses block boundaries
