"""Benchmark 3: the trainer's loader over a zarr and a webdataset store vs a plain read.

Writes a zarr store and a wds store of the same ``N`` samples at real per-sample sizes (SD-VAE
latents mean+std 8x32x32 float32, one ViT-B encoder 16x16x768 fp16: what a 256 px DINOv2-B
store holds), then reads them three ways:

* ``loader``  ``trainer.data.StoreLoader`` exactly as ``irepa-train`` builds it (zarr: index
  order, one ``get_batch`` per micro-batch; wds: stream order through the shuffle buffer), with
  0 and W DataLoader workers, timed from creating the loader until ``--samples`` samples (one
  epoch) have been delivered, worker start-up and shuffle-buffer fill included;
* ``get_batch fp32 / fp16`` (zarr) the reader alone, no DataLoader, features upcast to float32
  on the CPU (what the loader asks for) or left fp16 (``features_dtype``; upcast on the GPU);
* ``plain``   every file of the store read whole with ``numpy.fromfile`` (the bytes on disk, in
  file order, no decoding): what the disk and page cache can give;

each with the page cache warm (files read once before) and cold (``posix_fadvise(DONTNEED)`` on
every file first; works without root, drops clean pages on Linux; "cold" is only as cold as the
kernel honours it). MB/s counts the store's bytes per sample (apparent file sizes / N) times
samples delivered, so loader and plain figures measure the same bytes.

Read-time checks: every loader (and zarr ``get_batch`` fp16) measurement is also taken with the
reader's checksums turned off (``read_checks=False``: no crc32c of rows, shard indexes or tar
members), interleaved with the checked runs (on, off, off, on, ...; median of ``--repeats``), and
the table "Cost of the read-time checks" gives both times and the checks' share of the loader's.

The demand line is what one GPU trainer consumes: ``--consume IMG_PER_S`` (for example the
``cached`` img/s of ``bench.train_step --real``), or by default an estimate for SiT-B/2 on one
H200: FLOPs of a SiT-B/2 training step (counted on the meta device) at 40% of 989 TFLOPS bf16.

    python -m bench.loader
    python -m bench.loader --samples 4096 --workers 0,8 --consume 1800
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import add_common_args, print_ratios, print_table, setup, write_json

H200_BF16_DENSE = 989e12
ASSUMED_MFU = 0.40


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=512, help="samples in each store and read per measurement (default 512)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch of the loader (default 32)")
    p.add_argument("--workers", default=None, help="comma list of DataLoader worker counts (default 0,<cpu count>)")
    p.add_argument("--shard-size", type=int, default=128, help="samples per store shard (default 128)")
    p.add_argument("--dim", type=int, default=768, help="encoder feature dim (default 768)")
    p.add_argument("--grid", type=int, default=16, help="token grid side (default 16: 256 px)")
    p.add_argument("--consume", type=float, default=None,
                   help="img/s one GPU trainer consumes (default: SiT-B/2 FLOP estimate on an H200)")
    p.add_argument("--workdir", default=None, help="where to write the stores (default: system temp)")
    add_common_args(p, repeats=1, warmup=0)
    return p.parse_args(argv)


def store_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def drop_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(files: list[Path]) -> tuple[float, int]:
    t0 = time.perf_counter()
    total = 0
    for f in files:
        total += np.fromfile(f, dtype=np.uint8).nbytes
    return time.perf_counter() - t0, total


def loader_read(path: Path, workers: int, batch: int, samples: int, enc: str,
                checks: bool = True, inputs: tuple[str, ...] = ("latents",)) -> tuple[float, int]:
    """Seconds from creating the loader to holding ``samples`` samples (one epoch of the store).

    Worker start-up and the webdataset shuffle-buffer fill (the trainer's default 1000 samples)
    are included: timing only after the first batch would leave out most of the reading, which
    happens while the buffer fills. ``checks=False`` turns the reader's checksums off; ``inputs``
    is what the objective reads beside the features (``("pixels",)`` for JiT / REPA-E).
    """
    from irepa.stores import open_store
    from irepa.trainer.data import LoaderSpec, StoreLoader

    reader = open_store(path)
    n_batches = max(1, samples // batch)
    kind = reader.loader_kind
    counts = reader.shard_sample_counts() if kind == "stream" else None
    t0 = time.perf_counter()
    loader = StoreLoader(path, kind=kind, num_samples=len(reader), spec=LoaderSpec(global_batch=batch, seed=0),
                         encoders=[enc], steps=n_batches, num_workers=workers, shard_counts=counts,
                         read_checks=checks, inputs=inputs)
    it = iter(loader)
    got = 0
    for _ in range(n_batches):
        got += int(next(it)[inputs[0]].shape[0])
    dt = time.perf_counter() - t0
    del it
    return dt, got


def reader_read(path: Path, batch: int, samples: int, enc: str, fp16: bool,
                checks: bool = True) -> tuple[float, int] | None:
    """Random-access stores only: ``StoreReader.get_batch`` called directly in a random order (no
    DataLoader), features kept fp16 when ``fp16`` (the reader's ``features_dtype``; None if it has
    none). ``checks=False`` turns the reader's checksums off."""
    import inspect

    from irepa.stores import open_store

    reader = open_store(path, read_checks=checks)
    kw = {"encoders": [enc], "with_keys": False}
    if fp16:
        if "features_dtype" not in inspect.signature(reader.get_batch).parameters:
            return None
        kw["features_dtype"] = np.float16
    order = np.random.default_rng(0).permutation(len(reader))
    reader.get_batch(order[:batch], **kw)
    t0 = time.perf_counter()
    got = 0
    for s in range(batch, min(samples, len(reader)) - batch + 1, batch):
        b = reader.get_batch(order[s:s + batch], **kw)
        got += len(b["index"])
    return time.perf_counter() - t0, got


def crc_and_copy_rate(nbytes: int = 1 << 19, reps: int = 400) -> tuple[float, float]:
    """GB/s of the read-time checksum (``irepa.stores.checksum.crc32c``) and of a plain memcpy
    over one buffer (best of three, interleaved)."""
    from irepa.stores.checksum import crc32c

    x = np.frombuffer(np.random.default_rng(0).bytes(nbytes), dtype=np.uint8).copy()
    y = np.empty_like(x)
    best = [0.0, 0.0]
    for _ in range(3):
        for i, f in enumerate((lambda: crc32c(x), lambda: np.copyto(y, x))):
            f()
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            best[i] = max(best[i], nbytes * reps / (time.perf_counter() - t0) / 1e9)
    return best[0], best[1]


def trainer_demand() -> tuple[float, str]:
    """img/s of SiT-B/2 training on one H200 at ASSUMED_MFU (FLOPs counted on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from irepa.trainer.models import build_sit

    with torch.device("meta"):
        m = build_sit("SiT-B/2", input_size=32, z_dims=[768], projector="conv")
        x, t, y = torch.randn(2, 4, 32, 32), torch.rand(2), torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as fc:
        v, h = m(x, t, y)
        (v.float().sum() + h.float().sum()).backward()
    per_img = fc.get_total_flops() / 2
    rate = ASSUMED_MFU * H200_BF16_DENSE / per_img
    return rate, (f"SiT-B/2 step {per_img / 1e9:.0f} GFLOP/img at {ASSUMED_MFU:.0%} of H200 bf16 "
                  f"{H200_BF16_DENSE / 1e12:.0f} TFLOPS")


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    N, B, S, D, G = args.samples, args.batch, args.shard_size, args.dim, args.grid
    if args.smoke:
        N, B, S, D, G = 16, 4, 8, 32, 4
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [0, min(8, os.cpu_count() or 1)]
    if args.smoke:
        workers = [0, 1]
    from irepa.stores import open_store
    from irepa.stores.testing import make_synthetic_store

    work = Path(tempfile.mkdtemp(prefix="irepa-bench-loader-", dir=args.workdir))
    enc = "dinov2-vit-b"
    rows, records = [], []
    try:
        stores = {}
        for fmt in ("zarr", "wds"):
            t0 = time.perf_counter()
            stores[fmt] = make_synthetic_store(work / fmt, num_samples=N, encoders={enc: D}, grid=(G, G),
                                               latent_channels=4, format=fmt, shard_size=S, num_classes=1000)
            print(f"# wrote {fmt} store of {N} samples in {time.perf_counter() - t0:.1f} s")
        print(f"# {N} samples, latents 8x{2 * G}x{2 * G} float32 + features {G * G}x{D} fp16 per sample, "
              f"{S} per shard, loader micro-batch {B}")
        crc_gbs, copy_gbs = crc_and_copy_rate()
        from irepa.stores.checksum import IMPLEMENTATION as CRC_IMPL

        print(f"# this host, one core, 512 KiB buffer: crc32c ({CRC_IMPL}) {crc_gbs:.1f} GB/s, memcpy {copy_gbs:.1f} GB/s "
              "(the read-time checks cost about one crc32c pass over every byte read)")
        checks_rows: list[dict] = []

        def both(measure, prep) -> tuple[tuple[float, int], float]:
            """(median seconds and samples with checks, median seconds without), interleaved."""
            on, off = [], []
            for rep in range(max(1, args.repeats)):
                for checks in ((True, False) if rep % 2 == 0 else (False, True)):
                    prep()
                    dt, got = measure(checks)
                    (on if checks else off).append((dt, got))
            return (statistics.median(d for d, _ in on), on[0][1]), statistics.median(d for d, _ in off)

        for fmt, path in stores.items():
            files = store_files(path)
            store_bytes = sum(f.stat().st_size for f in files)
            per_sample = store_bytes / N
            random_access = open_store(path).random_access
            for cache in ("warm", "cold"):
                def prep():
                    if cache == "cold":
                        drop_cache(files)
                    else:
                        plain_read(files)
                prep()
                dt, nbytes = plain_read(files)
                rec = dict(format=fmt, cache=cache, reader="plain", workers=None, samples=N,
                           seconds=dt, samples_per_s=N / dt, mb_per_s=nbytes / dt / 1e6)
                records.append(rec)
                for w in workers:
                    (dt, got), dt_off = both(lambda c: loader_read(path, w, B, N, enc, c), prep)
                    records.append(dict(format=fmt, cache=cache, reader="loader", workers=w, samples=got, seconds=dt,
                                        samples_per_s=got / dt, mb_per_s=got * per_sample / dt / 1e6))
                    checks_rows.append(dict(format=fmt, cache=cache, reader=f"loader, {w} workers", workers=w,
                                            seconds_on=dt, seconds_off=dt_off, cost=dt / dt_off - 1))
                if random_access:
                    for fp16 in (False, True):
                        if fp16:
                            res = both(lambda c: reader_read(path, B, N, enc, True, c), prep)
                            (dt, got), dt_off = res
                            checks_rows.append(dict(format=fmt, cache=cache, reader="get_batch fp16", workers=None,
                                                    seconds_on=dt, seconds_off=dt_off, cost=dt / dt_off - 1))
                        else:
                            prep()
                            res = reader_read(path, B, N, enc, fp16)
                            if res is None:
                                continue
                            dt, got = res
                        records.append(dict(format=fmt, cache=cache, reader="get_batch " + ("fp16" if fp16 else "fp32"),
                                            workers=None, samples=got, seconds=dt, samples_per_s=got / dt,
                                            mb_per_s=got * per_sample / dt / 1e6))
            for r in records:
                if r["format"] == fmt:
                    r["bytes_per_sample"] = per_sample
        for r in records:
            rows.append([r["format"], r["cache"], r["reader"] if r["workers"] is None else f"loader, {r['workers']} workers",
                         r["samples"], f"{r['samples_per_s']:.0f}", f"{r['mb_per_s']:.0f}"])
        print_table(["store", "page cache", "read", "samples", "samples/s", "MB/s"], rows,
                    title="Loader vs plain read of the same bytes")
        print_table(["store", "page cache", "read", "checks on (s)", "checks off (s)", "cost of the checks"],
                    [[c["format"], c["cache"], c["reader"], f"{c['seconds_on']:.3f}", f"{c['seconds_off']:.3f}",
                      f"{100 * c['cost']:+.1f}%"] for c in checks_rows],
                    title=f"Cost of the read-time checks (crc32c), median of {max(1, args.repeats)} interleaved runs")
        if args.consume:
            demand, how = args.consume, "given with --consume"
        else:
            demand, how = trainer_demand()
        print(f"demand: one GPU trainer consumes {demand:.0f} img/s ({how})")
        ratios = []
        for fmt in stores:
            for cache in ("warm", "cold"):
                plain = next(r for r in records if r["format"] == fmt and r["cache"] == cache and r["reader"] == "plain")
                best = max((r for r in records if r["format"] == fmt and r["cache"] == cache and r["reader"] == "loader"),
                           key=lambda r: r["samples_per_s"])
                ratios.append((f"{fmt} {cache}: loader ({best['workers']} workers)/plain MB/s",
                               best["mb_per_s"] / plain["mb_per_s"], "goal >= 0.8"))
                ratios.append((f"{fmt} {cache}: loader samples/s / GPU demand", best["samples_per_s"] / demand,
                               "goal: several x"))
                c = next(c for c in checks_rows if c["format"] == fmt and c["cache"] == cache
                         and c["workers"] == best["workers"])
                ratios.append((f"{fmt} {cache}: loader time checks on / off ({best['workers']} workers)",
                               c["seconds_on"] / c["seconds_off"], "goal <= 1.05"))
        print_ratios(ratios)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload = dict(bench="loader", samples=N, batch=B, workers=workers, records=records, checks=checks_rows,
                   crc32c_gb_per_s=crc_gbs, memcpy_gb_per_s=copy_gbs)
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
