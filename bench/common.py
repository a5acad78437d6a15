"""Shared helpers for the benchmarks: timing, peak memory, tables, machine description.

Every figure a benchmark reports as a ratio is taken in one process run, so that both sides of
the ratio see the same machine state. Timing: ``warmup`` untimed calls, then ``repeats`` timed
calls, each bracketed by ``torch.cuda.synchronize`` on a GPU; the median is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from irepa.pipeline.defaults import SD_VAE_SCALE

__all__ = [
    "add_common_args", "setup", "resolve_device", "sync", "time_fn", "time_interleaved", "Timing",
    "peak_memory", "saved_tensor_bytes", "print_table", "print_ratios", "machine_line",
    "fmt_bytes", "fmt_s", "write_json", "SD_VAE_CONFIG", "make_vae", "save_random_sd_vae",
    "count_flops", "sample_images",
]


def add_common_args(p: argparse.ArgumentParser, repeats: int = 5, warmup: int = 2) -> argparse.ArgumentParser:
    """Flags every bench shares: --smoke, --device, --repeats, --warmup, --threads, --json."""
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and 1 repeat: checks that the bench runs (used by the tests)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed repetitions, median reported (default {repeats})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up calls (default {warmup})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads / --smoke to the process and return the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.repeats, args.warmup = 1, min(args.warmup, 1)
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"# {machine_line(dev)}")
    print(f"# command: {' '.join([os.path.basename(sys.executable), '-m', _module_name()] + sys.argv[1:])}")
    return dev


@dataclasses.dataclass
class StepSizes:
    """What a step benchmark runs: the size table's row and the flags applied to it."""

    name: str            # smoke | real | cpu
    table: dict          # the row of the benchmark's SIZES (a copy)
    batch: int           # --batch, else the row's
    models: list         # [(model name, overrides)]: --models picks from the row's (unknown ones: no overrides)
    encoders: list[str]  # --encoders, else the row's
    precision: str       # "bf16 autocast" on CUDA with --precision bf16, else "fp32"


def step_sizes(args: argparse.Namespace, dev: torch.device, sizes: dict[str, dict]) -> StepSizes:
    """Pick ``sizes["smoke" | "real" | "cpu"]`` from ``--smoke`` / ``--real`` and apply
    ``--batch``, ``--models``, ``--encoders`` and ``--precision`` (the step benchmarks' common start)."""
    name = "smoke" if args.smoke else ("real" if args.real else "cpu")
    table = dict(sizes[name])
    models = table["models"]
    if args.models:
        want = [m.strip() for m in args.models.split(",")]
        models = [(m, dict(next((o for n, o in models if n == m), {}))) for m in want]
    encoders = [e.strip() for e in args.encoders.split(",")] if args.encoders else table["encoders"]
    precision = "bf16 autocast" if dev.type == "cuda" and args.precision == "bf16" else "fp32"
    return StepSizes(name, table, args.batch or table["batch"], models, encoders, precision)


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]


def machine_line(dev: torch.device | None = None) -> str:
    """One line: CPU model, cores, GPU (if used), torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"cpu: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if dev is not None and dev.type == "cuda":
        parts.append(f"gpu: {torch.cuda.get_device_name(dev)}")
    else:
        parts.append("gpu: none used")
    parts.append(f"torch {torch.__version__}")
    return "machine: " + "; ".join(parts)


def sync(dev: torch.device | str | None) -> None:
    if dev is not None and torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


@dataclass
class Timing:
    """Seconds per call: every timed repetition and their median."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repetitions were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0


def time_fn(fn: Callable[[], Any], dev: torch.device | str | None, warmup: int = 2, repeats: int = 5) -> Timing:
    """Median wall time of ``fn()`` after ``warmup`` untimed calls (GPU-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(max(1, repeats)):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return Timing(times)


def time_interleaved(fns: dict[str, Callable[[], Any]], dev: torch.device | str | None, warmup: int = 2,
                     repeats: int = 5) -> dict[str, Timing]:
    """Time several functions round-robin (A B C A B C ...), median per function.

    Interleaving makes the ratios between them fair on a machine whose load changes while the
    bench runs (other jobs on a shared CPU, GPU clocks).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(dev)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[k].append(time.perf_counter() - t0)
    return {k: Timing(v) for k, v in times.items()}


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()):
    """Count the bytes autograd saves for backward inside the block (unique storages).

    ``exclude``: tensors whose storages do not count (inputs and parameters that are alive
    anyway). Yields a dict whose ``"bytes"`` is filled in as the block runs. This is the memory
    held between forward and backward, which is what a recomputing (fused) op saves; it is
    the CPU stand-in for a GPU allocator peak.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    box = {"bytes": 0}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            box["bytes"] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield box


def peak_memory(fn: Callable[[], Any], dev: torch.device, exclude: Iterable[torch.Tensor] = ()) -> tuple[int, str]:
    """Peak extra memory of one ``fn()`` call and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call ("allocator
    peak"). CPU: bytes autograd saved for backward during the call ("saved tensors"), since the
    CPU allocator keeps no statistics.
    """
    exclude = list(exclude)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base, "cuda allocator peak"
    with saved_tensor_bytes(exclude) as box:
        fn()
    return box["bytes"], "autograd saved tensors"


#: stabilityai/sd-vae-ft-ema's AutoencoderKL config (what REPA uses), for a random-initialised
#: real-size VAE where no hub is reachable: timing needs the architecture, not the weights.
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
    latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=SD_VAE_SCALE,
)


def make_vae(kind: str, seed: int = 0):
    """``pipeline.vae.VaeEncoder`` around a random SD-VAE (``"sd-random"``) or ``"tiny"``."""
    from irepa.pipeline.vae import VaeEncoder, load_vae

    if kind == "tiny":
        return load_vae("tiny")
    if kind != "sd-random":
        raise ValueError(f"unknown bench VAE {kind!r} (sd-random | tiny)")
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    return VaeEncoder(vae, "sd-vae-config/random-init")


def save_random_sd_vae(folder: str, kind: str = "sd-random") -> str:
    """Write a random VAE as a diffusers folder, so ``irepa-cache build --vae FOLDER`` can load it."""
    make_vae(kind).vae.save_pretrained(folder)
    return folder


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (torch.utils.flop_counter: matmuls and convolutions, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def sample_images(resolution: int, n: int) -> torch.Tensor:
    """``n`` ADM-cropped uint8 images [n, 3, R, R] from the repository's bundled photos (cycled)."""
    import numpy as np

    from irepa.pipeline.sources import default_sample_source
    from irepa.pipeline.transforms import decode_and_crop

    src = default_sample_source()
    imgs = [decode_and_crop(src.read_bytes(i), resolution) for i in range(len(src))]
    arr = np.stack([imgs[i % len(imgs)].transpose(2, 0, 1) for i in range(n)])
    return torch.from_numpy(np.ascontiguousarray(arr))


def fmt_bytes(n: float) -> str:
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """Markdown table (pastes into docs/BENCHMARKS.md as is)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n### {title}\n")
    else:
        print()
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def print_ratios(ratios: Sequence[tuple[str, float | None, str]]) -> None:
    """The closing block of every bench: ``name = value  (goal / meaning)``."""
    print("\nratios:")
    width = max(len(n) for n, _, _ in ratios) if ratios else 0
    for name, value, note in ratios:
        if value is None:
            v = "n/a"
        elif 0.99 <= abs(value) <= 1.01:
            v = f"{value:.6f}"
        else:
            v = f"{value:.4g}"
        print(f"  {name.ljust(width)} = {v}" + (f"   ({note})" if note else ""))
    sys.stdout.flush()


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
