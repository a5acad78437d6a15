"""Training checkpoints: atomic writes, pickle-free loads, RNG state as tensors.

A checkpoint is one ``torch.save`` file that ``torch.load(weights_only=True)`` can read back:
only tensors, numbers, strings, lists and dicts. Run arguments and the model config travel as
JSON strings; RNG states (torch, CUDA, numpy, python ``random``) as tensors. Files are written
under a temporary name, fsynced and renamed, so a crash never leaves a half-written checkpoint
under the final name. Files live in ``<out>/checkpoints/<step:07d>.pt``.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irepa.stores.lock import pid_alive

FORMAT = "irepa-train-checkpoint-v1"
_CKPT_RE = re.compile(r"^(\d{7,})\.pt$")
_TMP_RE = re.compile(r"^\.(\d{7,})\.pt\.tmp-(\d+)$")  # what atomic_torch_save writes before its rename


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Folder that holds a run's checkpoints."""
    return Path(out) / "checkpoints"


def checkpoint_path(out: str | os.PathLike, step: int) -> Path:
    """Path of the checkpoint for ``step`` inside run folder ``out``."""
    return checkpoint_dir(out) / f"{int(step):07d}.pt"


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint of a run, oldest first."""
    d = checkpoint_dir(out)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run folder, or None."""
    found = list_checkpoints(out)
    return found[-1][1] if found else None




def clean_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary checkpoint files (``.NNNNNNN.pt.tmp-PID``) a killed run left in
    ``out/checkpoints``; return what was removed. A resumed run calls it before training.

    Files of a process that is still running on this host (another run writing into the same
    folder) are left alone; the temporaries of this process are removed (none is being written
    while a run resumes)."""
    d = checkpoint_dir(out)
    if not d.is_dir():
        return []
    removed = []
    for p in sorted(d.iterdir()):
        m = _TMP_RE.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and pid_alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary name in the same folder, fsync, then rename over ``path``."""
    from irepa.stores.manifest import atomic_open

    path = Path(path)
    with atomic_open(path, tmp=path.with_name(f".{path.name}.tmp-{os.getpid()}")) as f:
        torch.save(obj, f)
    return path


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict[str, Any]:
    """Every global RNG the training process touches, as tensors and ints (no pickle)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": "none" if py_gauss is None else float(py_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         int(state["numpy_pos"]), int(state["numpy_has_gauss"]),
                         float(state["numpy_cached_gauss"])))
    gauss = state["python_gauss"]
    random.setstate((int(state["python_version"]),
                     tuple(int(v) for v in state["python_state"].tolist()),
                     None if gauss == "none" else float(gauss)))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].cpu(), i)


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(path: str | os.PathLike, *, step: int, model: dict, ema: dict | None,
                    optimizer: dict | None, args: dict, model_config: dict,
                    data_state: dict | None = None, extra: dict | None = None,
                    more: dict | None = None) -> Path:
    """Write one training checkpoint atomically.

    ``args`` and ``model_config`` must be JSON-serialisable; they are stored as JSON strings so the
    file loads with ``weights_only=True``. ``data_state`` holds the loader position (ints only).
    ``more`` adds state dicts beside the main ones (further EMAs, an objective's extra modules and
    optimizers: ``{"emas": [...], "modules": {name: sd}, "optimizers": {name: sd}}``).
    """
    obj = {
        "format": FORMAT,
        "step": int(step),
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "args": json.dumps(args, sort_keys=True),
        "model_config": json.dumps(model_config, sort_keys=True),
        "data_state": json.dumps(data_state or {}, sort_keys=True),
        "rng": capture_rng_state(),
        "extra": extra or {},
        **(more or {}),
    }
    return atomic_torch_save(obj, path)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or is not a training checkpoint."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint with ``weights_only=True``; JSON fields come back as dicts."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"checkpoint {path} cannot be read with weights_only=True: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an irepa training checkpoint (expected format {FORMAT!r}); "
            "to start from a REPA/iREPA release checkpoint use --init-from")
    for key in ("args", "model_config", "data_state"):
        obj[key] = json.loads(obj[key])
    return obj


def load_foreign_checkpoint(path: str | os.PathLike) -> dict:
    """Load a REPA / iREPA release or training checkpoint (or ours) with ``weights_only=True``.

    Their training checkpoints keep ``args`` as an ``argparse.Namespace``; it is allow-listed
    (no other Python object is), so the load stays pickle-free for anything else. Our own
    checkpoints give ``{"model", "ema"}``; safetensors files their tensors.
    """
    import argparse

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "format" in obj and "model" in obj:  # our own checkpoint
        return {k: obj[k] for k in ("model", "ema") if obj.get(k) is not None}
    return obj
