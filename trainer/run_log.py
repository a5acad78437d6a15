"""What a run writes as it goes: log lines (console and <out>/log.txt) and metrics.jsonl rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "MetricsLog"]


class RunLog:
    """``[irepa-train] ...`` lines on rank 0, echoed to ``<out>/log.txt``."""

    def __init__(self, main: bool, out: Path | None = None, prefix: str = "irepa-train"):
        self.main, self.out, self.prefix = main, out, prefix

    def __call__(self, msg: str) -> None:
        if not self.main:
            return
        line = f"[{self.prefix}] {msg}"
        print(line, flush=True)
        if self.out is not None:
            with open(self.out / "log.txt", "a") as f:
                f.write(line + "\n")


class MetricsLog:
    """JSON lines in ``<out>/metrics.jsonl`` (rank 0); on resume, lines after the resumed step go.
    The same rows go to TensorBoard (``--tensorboard``) and Weights & Biases (``--wandb``)."""

    def __init__(self, out: Path, start_step: int, cfg: Any = None):
        tensorboard = bool(getattr(cfg, "tensorboard", False))
        self.path = out / "metrics.jsonl"
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= start_step:
                        keep.append(line)
                except (ValueError, AttributeError):
                    continue
            from irepa.stores.manifest import atomic_write_bytes

            atomic_write_bytes(self.path, "".join(k + "\n" for k in keep).encode())
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception as e:  # noqa: BLE001
                print(f"[irepa-train] tensorboard unavailable ({e}); logging JSON lines only", flush=True)
        self.wandb = None
        if getattr(cfg, "wandb", False):
            import wandb  # optional extra; checked before the run started

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or out.name, dir=str(out),
                                    mode=cfg.wandb_mode, config=cfg.to_json(), id=_wandb_id(out), resume="allow")

    def write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=int(rec["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(out: Path) -> str:
    """One W&B run per run folder (a resume continues it): a stable id kept in <out>/wandb_id."""
    import uuid

    from irepa.stores.manifest import atomic_write_bytes

    p = out / "wandb_id"
    if not p.exists():
        atomic_write_bytes(p, (uuid.uuid4().hex[:16] + "\n").encode())
    return p.read_text().strip()
