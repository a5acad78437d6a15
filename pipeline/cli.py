"""`irepa-cache`: build, inspect, verify and measure feature/latent stores.

Each command's options are one dataclass; the command line is checked against it before any
work (see :mod:`irepa.pipeline.config`), then fire dispatches the command.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .build_config import BuildConfig
from .config import OptionError, ParsedArgs, option, resolve, run_commands

__all__ = ["InspectConfig", "VerifyConfig", "RelinkConfig", "MetricsConfig", "COMMANDS", "run_fire", "main"]


@dataclass
class InspectConfig:
    """Print what a store holds: counts, arrays, bytes on disk and per sample, skipped inputs, provenance."""

    store: str = option(None, "store directory", positional=True)
    json_out: bool = option(False, "print the description as JSON")


@dataclass
class VerifyConfig:
    """Recompute every shard checksum; exit 1 naming each bad shard, or if the store is unfinished."""

    store: str = option(None, "store directory", positional=True)


@dataclass
class RelinkConfig:
    """Point a --latents-from store at its latents store's new place (after a move); the data is checked."""

    store: str = option(None, "the store built with --latents-from", positional=True)
    latents_from: str | None = option(None, "where the store holding its latents is now", metavar="STORE")


@dataclass
class MetricsConfig:
    """Spatial-structure metrics (LDS, CDS, RMSC, SRSS) of each store's encoder features."""

    stores: list[str] = option(default_factory=list, help="one or more store directories", positional=True)
    limit: int = option(4096, "images sampled per store (fixed seed)")
    out: str = option("metrics", "folder for metrics.json, metrics.png and metrics.txt")
    fid: str | None = option(None, "FIDs to correlate each metric with: irepa-eval JSON file(s) (PATH or NAME=PATH, "
                                   "comma separated; the encoder is read from the JSON) or a table encoder -> FID "
                                   "(JSON or CSV/TSV)", metavar="SPEC")
    masks: str | None = option(None, "foreground masks for SRSS (folder or .npz)")
    gamma: float = option(1.0, "spatial-normalisation gamma for the normalised variant")
    seed: int = option(0, "seed of the sampled images")
    device: str | None = option(None, "torch device (default: cuda when available)")


def _config(cls: type, parsed: ParsedArgs | dict) -> Any:
    if isinstance(parsed, ParsedArgs):
        return resolve(cls, parsed.values, parsed.config)[0]
    return resolve(cls, parsed)[0]


def _need(value: Any, what: str, command: str) -> None:
    if not value:
        raise OptionError(f"name {what} (irepa-cache {command} --help)")


def _build(parsed: ParsedArgs | dict) -> None:
    cfg = _config(BuildConfig, parsed)  # every option checked before the heavy imports
    from irepa.stores import describe_store, format_description

    from .build import build_store
    from .dist import from_env

    path = build_store(cfg)
    if from_env().main:
        print(f"store written: {path.resolve()}")
        print(format_description(describe_store(path)))


def _inspect(parsed: ParsedArgs | dict) -> None:
    cfg = _config(InspectConfig, parsed)
    _need(cfg.store, "a store: irepa-cache inspect stores/NAME", "inspect")
    from irepa.stores import describe_store, format_description

    info = describe_store(cfg.store)
    print(json.dumps(info, indent=2) if cfg.json_out else format_description(info))


def _verify(parsed: ParsedArgs | dict) -> None:
    cfg = _config(VerifyConfig, parsed)
    _need(cfg.store, "a store: irepa-cache verify stores/NAME", "verify")
    from irepa.stores import verify_store

    report = verify_store(cfg.store, progress=True)
    print(report.format())
    if not report.ok:
        sys.exit(1)


def _relink(parsed: ParsedArgs | dict) -> None:
    cfg = _config(RelinkConfig, parsed)
    _need(cfg.store and cfg.latents_from, "a store and its latents store: irepa-cache relink STORE --latents-from NEW",
          "relink")
    from irepa.stores import relink_latents

    rel = relink_latents(cfg.store, cfg.latents_from)
    print(f"store {cfg.store}: latents read from {rel} (relative to the store) from now on")


def _metrics(parsed: ParsedArgs | dict) -> None:
    cfg = _config(MetricsConfig, parsed)
    _need(cfg.stores, "at least one store: irepa-cache metrics stores/NAME [...]", "metrics")
    from .metrics_report import run_metrics

    run_metrics(list(cfg.stores), limit=cfg.limit, out=cfg.out, fid=cfg.fid, masks=cfg.masks, gamma=cfg.gamma,
                seed=cfg.seed, device=cfg.device)


# Python entry points: keyword arguments are the flags (checked the same way)
def build(**kwargs: Any) -> None:
    """``irepa-cache build`` (see :class:`BuildConfig`)."""
    _build(kwargs)


def inspect(store: str, json_out: bool = False) -> None:
    """``irepa-cache inspect STORE``."""
    _inspect({"store": store, "json_out": json_out})


def verify(store: str) -> None:
    """``irepa-cache verify STORE``: exit 1 when a check fails."""
    _verify({"store": store})


def metrics(*stores: str, **kwargs: Any) -> None:
    """``irepa-cache metrics STORE [STORE ...]`` (see :class:`MetricsConfig`)."""
    _metrics({"stores": list(stores), **kwargs})


COMMANDS: dict[str, tuple[type, Any, str]] = {
    "build": (BuildConfig, _build, "run the VAE and encoders over a dataset once and write a store"),
    "inspect": (InspectConfig, _inspect, "what a store holds: counts, arrays, bytes, skipped inputs, provenance"),
    "verify": (VerifyConfig, _verify, "recompute every checksum; exit 1 naming each bad shard"),
    "relink": (RelinkConfig, _relink, "point a --latents-from store at its moved latents store"),
    "metrics": (MetricsConfig, _metrics, "spatial-structure metrics (LDS, CDS, RMSC, SRSS) of stores' features"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from irepa.stores import StoreError

    return (StoreError,)


@dataclass
class _NoOptions:
    """A command without options."""


def run_fire(commands: Mapping[str, Any], name: str, command: Sequence[str] | None = None,
             default: str | None = None) -> Any:
    """Check the command line against the commands' option dataclasses, then dispatch with fire.
    ``commands`` maps a name to ``(options dataclass, function(parsed), summary)`` (or to a plain
    function without options). User errors print one line and exit 2 (``IREPA_DEBUG=1`` shows the
    traceback)."""
    table = {k: v if isinstance(v, tuple) else (_NoOptions, lambda parsed, f=v: f(), (v.__doc__ or "").strip())
             for k, v in commands.items()}
    return run_commands(name, table, command, default=default, user_errors=_user_errors)


def main() -> None:
    """Console entry point of ``irepa-cache``."""
    run_fire(COMMANDS, "irepa-cache")


if __name__ == "__main__":
    main()
