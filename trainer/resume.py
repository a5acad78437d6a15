"""A run folder is one experiment: what a resumed run must share with the run that wrote the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from irepa.pipeline.config import OptionError

__all__ = ["RESUME_FREE", "check_resume"]

#: options that may change when a run resumes: where and how it runs, not what it trains
RESUME_FREE = frozenset({
    "steps", "out", "resume", "cache", "data", "vae", "encoder_weights", "init_from", "init_from_partial",
    "ckpt_every", "sample_every", "log_every", "sample_n", "sample_steps", "sample_method", "sample_cfg",
    "num_workers", "device", "progress", "verify", "tensorboard", "wandb", "wandb_project", "wandb_name",
    "wandb_mode", "compile", "precision", "fused_align", "attn", "grad_accum", "online",
    "eval_every", "eval_ref", "eval_samples", "skip_damaged",
})


def _describe_store(ident: dict) -> str:
    encs = ", ".join(f"{n} ({e.get('timm_id')}, weights {str(e.get('weights_sha256'))[:12]})"
                     for n, e in (ident.get("encoders") or {}).items()) or "no encoders"
    return f"{ident.get('store') or 'online'} (fingerprint {str(ident.get('fingerprint'))[:16]}..., {encs})"


def check_resume(ckpt: dict, ckpt_file: Path, args_now: dict, identity_now: dict) -> None:
    """Refuse to resume ``ckpt`` with another dataset or encoders (by fingerprint and weights hashes,
    whatever the store is called now) or with any option outside :data:`RESUME_FREE` changed."""
    extra = ckpt.get("extra") or {}
    then = json.loads(extra["identity"]) if "identity" in extra else None
    if then is not None:
        same_data = then.get("fingerprint") == identity_now.get("fingerprint")
        enc_then = {n: (e.get("timm_id"), e.get("weights_sha256")) for n, e in (then.get("encoders") or {}).items()}
        enc_now = {n: (e.get("timm_id"), e.get("weights_sha256"))
                   for n, e in (identity_now.get("encoders") or {}).items()}
        if not same_data or enc_then != enc_now:
            raise OptionError(f"cannot resume {ckpt_file} on other data: it was trained on store "
                              f"{_describe_store(then)}; this run reads {_describe_store(identity_now)}. "
                              "A run folder is one experiment: use a new --out")
    args_then = ckpt.get("args") or {}
    changed = sorted(k for k in set(args_then) | set(args_now) if k not in RESUME_FREE and k in args_then
                     and k in args_now and json.dumps(args_then[k]) != json.dumps(args_now[k]))
    if changed:
        diffs = "; ".join(f"--{k.replace('_', '-')} {args_then[k]!r} -> {args_now[k]!r}" for k in changed[:8])
        raise OptionError(f"cannot resume {ckpt_file}: the run now asks for other settings ({diffs}). A run folder "
                          "is one experiment: pass the original values (or --config <run>/args.json) or use a new --out")
