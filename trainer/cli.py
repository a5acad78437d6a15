"""``irepa-train`` and ``irepa-sample``: their options are :class:`~irepa.trainer.config.TrainConfig`
(plus the selected objective's own options) and :class:`~irepa.trainer.config.SampleConfig`;
``--help`` lists every flag. ``torchrun --nproc_per_node N -m irepa.trainer ...`` runs
``irepa-train`` under DDP.
"""

from __future__ import annotations

from typing import Any

from irepa.pipeline.config import ParsedArgs, resolve, run_commands
from irepa.trainer.config import EvalConfig, ExportVaeConfig, SampleConfig, TrainConfig

__all__ = ["train", "sample", "main", "sample_main", "eval_main"]


def _objective_flag(name: str) -> list[type]:
    """Where to look up a flag that is not a TrainConfig field: every objective's own options
    (their dataclasses only: no torch, so a misspelt flag is answered at once)."""
    from irepa.trainer.objectives import objective_names, objective_options

    return [o for o in (objective_options(n) for n in objective_names()) if o is not None]


def _objective_sections(command: str) -> dict[str, type]:
    from irepa.trainer.objectives import objective_names, objective_options

    out = {}
    for n in objective_names():
        opts = objective_options(n)
        if opts is not None:
            out[f"--objective {n} flags:"] = opts
    return out


def _resolved_help(command: str, parsed: ParsedArgs) -> str:
    """What ``--help`` adds after the flag list: with other flags given (``--objective jit
    --help``), the values they resolve to where those differ from the defaults listed (an
    objective's or alignment preset's own learning rate, betas, EMA, ...)."""
    import dataclasses

    from irepa.pipeline.config import flag_name, json_value, to_json, value_text
    from irepa.trainer.config import resolve_train

    if not parsed.values and parsed.config is None:
        return ("\nThe defaults above are --objective flow's; `irepa-train --objective NAME --help` (or with any other "
                "flags) shows what they resolve to.\n")
    try:
        cfg, opts, _ = resolve_train(parsed.values, parsed.config)
    except Exception as err:  # noqa: BLE001 - help still prints; the run would fail the same way
        return f"\nthese flags do not resolve: {err}\n"
    lines = []
    for obj in (cfg, opts) if opts is not None else (cfg,):
        values = to_json(obj)
        for f in dataclasses.fields(obj):
            if f.default is dataclasses.MISSING or f.metadata.get("hidden") or f.name in parsed.values:
                continue
            if values[f.name] != json_value(f.default):
                lines.append(f"  {flag_name(f.name)} {value_text(values[f.name])}")
    given = " ".join(f"{flag_name(k)} {value_text(v)}" for k, v in parsed.values.items())
    given += f" --config {parsed.config}" if parsed.config else ""
    head = f"\nresolved with {given.strip()} (presets applied), these differ from the defaults above:\n"
    return head + ("\n".join(lines) if lines else "  (none)") + "\n"


def _train(parsed: ParsedArgs) -> None:
    from irepa.trainer.config import resolve_train

    cfg, opts, notes = resolve_train(parsed.values, parsed.config)  # every option checked first
    from irepa.trainer.train import run

    run(cfg, opts, notes=tuple(notes))


def _sample(parsed: ParsedArgs) -> None:
    cfg = resolve(SampleConfig, parsed.values, parsed.config)[0]
    from irepa.trainer.sample import run_sampling

    run_sampling(cfg)


def train(**kwargs: Any) -> dict:
    """Python entry of ``irepa-train``: keyword arguments are flags (checked the same way)."""
    from irepa.trainer.config import resolve_train
    from irepa.trainer.train import run

    config = kwargs.pop("config", None)
    cfg, opts, notes = resolve_train(kwargs, config)
    return run(cfg, opts, notes=tuple(notes))


def sample(**kwargs: Any):
    """Python entry of ``irepa-sample``: keyword arguments are flags (checked the same way)."""
    from irepa.trainer.sample import run_sampling

    config = kwargs.pop("config", None)
    return run_sampling(resolve(SampleConfig, kwargs, config)[0])


def _user_errors() -> tuple[type[BaseException], ...]:
    from irepa.stores import StoreError
    from irepa.trainer.checkpoint import CheckpointError

    return (StoreError, CheckpointError)


def _eval(parsed: ParsedArgs) -> None:
    cfg = resolve(EvalConfig, parsed.values, parsed.config)[0]
    if not cfg.samples:
        from irepa.pipeline.config import OptionError

        raise OptionError("name the samples: irepa-eval samples.npz --ref REF.npz (irepa-eval --help)")
    from irepa.trainer.evaluate import evaluate

    evaluate(cfg)


def _export_vae(parsed: ParsedArgs) -> None:
    cfg = resolve(ExportVaeConfig, parsed.values, parsed.config)[0]
    if not cfg.run:
        from irepa.pipeline.config import OptionError

        raise OptionError("name the run: irepa-train export-vae runs/NAME [--out DIR]")
    from irepa.trainer.objectives.repae import export_vae

    out = export_vae(cfg.run, cfg.out, overwrite=cfg.overwrite)
    print(f"tuned VAE written to {out}: irepa-cache build --vae {out} ... re-caches latents with it")


TRAIN = {"train": (TrainConfig, _train, (TrainConfig.__doc__ or "").strip())}
EXPORT_VAE = {"export-vae": (ExportVaeConfig, _export_vae, (ExportVaeConfig.__doc__ or "").strip())}
EVAL = {"eval": (EvalConfig, _eval, (EvalConfig.__doc__ or "").strip())}
SAMPLE = {"sample": (SampleConfig, _sample, (SampleConfig.__doc__ or "").strip())}


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``irepa-train`` (and ``irepa-train export-vae RUN`` for REPA-E runs)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export-vae"]:
        run_commands("irepa-train export-vae", EXPORT_VAE, argv[1:], default="export-vae", user_errors=_user_errors)
        return
    run_commands("irepa-train", TRAIN, argv, default="train", extra_fields=_objective_flag,
                 help_sections=_objective_sections, help_extra=_resolved_help, user_errors=_user_errors)


def sample_main(argv: list[str] | None = None) -> None:
    """Console entry point of ``irepa-sample``."""
    run_commands("irepa-sample", SAMPLE, argv, default="sample", user_errors=_user_errors)


def eval_main(argv: list[str] | None = None) -> None:
    """Console entry point of ``irepa-eval`` (``torchrun -m irepa.trainer.evaluate`` too)."""
    run_commands("irepa-eval", EVAL, argv, default="eval", user_errors=_user_errors)


if __name__ == "__main__":
    main()
