"""Benchmark 4: ``irepa-cache build`` throughput, split into its decode-bound and model-bound parts.

Makes an ImageFolder of ``N`` JPEGs (random crops of the bundled photos at ImageNet's typical
500x375 with film grain, quality 95, about ImageNet's bytes per file), then measures images/s of

* ``decode``     the build's own decode path alone: ``DataLoader(pipeline.transforms.DecodeDataset)``
  with the build's batch sampler, for each number of decode workers;
* ``model``      the build's model path alone: ``pipeline.build._encode_batch`` (host->device copy,
  VAE posterior + encoder tokens under inference mode and bf16 autocast on CUDA, device->host
  numpy) on an already decoded batch;
* ``build``      ``pipeline.build.build_store`` end to end (decode workers, models, StoreWriter),
  run on ``N`` and ``2N`` images; the rate is ``N / (t(2N) - t(N))`` so that model loading and
  the store's setup and finalisation are not counted.

The FLOP bound: FLOPs of one image through the VAE encoder and the encoder (torch's
FlopCounterMode, 2 per multiply-add) against the accelerator's dense bf16 peak (H100/H200: 989
TFLOPS; ``--peak-tflops`` to set it); model-bound images/s over ``peak / FLOPs`` is the fraction
of the bound reached (goal on GPU: at least 0.5). ``--profile`` prints torch.profiler's top
operators of the model part (where the time goes when the goal is missed).

Models are random-initialised at real sizes (SD-VAE from its config, written as a diffusers
folder so ``build_store`` loads it like a real one; timm encoders with ``pretrained=False``).

    python -m bench.build                       # CPU-sized: 128 px, 4/8 images
    python -m bench.build --real --images 1024 --workers 4,8,16
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (add_common_args, count_flops, make_vae, print_ratios, print_table, setup, sync,
                          time_interleaved, write_json)

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}

SIZES = {
    "smoke": dict(resolution=64, images=8, batch=4, vae="tiny", encoder_config="tiny", workers=[0, 1]),
    "cpu": dict(resolution=128, images=4, batch=2, vae="sd-random", encoder_config=None, workers=[0, 2]),
    "real": dict(resolution=256, images=1024, batch=128, vae="sd-random", encoder_config=None, workers=[4, 8, 16]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="real sizes (GPU): 256 px, SD-VAE + encoders, 1024 images")
    p.add_argument("--images", type=int, default=None, help="N: images in the folder (the build also runs on 2N)")
    p.add_argument("--batch", type=int, default=None, help="build batch size")
    p.add_argument("--workers", default=None, help="comma list of decode worker counts")
    p.add_argument("--encoders", default="dinov2-vit-b", help="comma list of encoders run together (default dinov2-vit-b)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: by GPU name)")
    p.add_argument("--no-build", action="store_true", help="skip the end-to-end build_store runs")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of the model part")
    add_common_args(p, repeats=3, warmup=1)
    return p.parse_args(argv)


def _make_images(root: str, start: int, stop: int, seed: int, classes: int) -> None:
    from PIL import Image

    from irepa.pipeline.sources import default_sample_source

    photos = [Image.open(p).convert("RGB") for p in default_sample_source().paths]
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        im = photos[i % len(photos)]
        w, h = im.size
        s = rng.uniform(0.5, 1.0)
        cw, ch = max(16, int(w * s)), max(16, int(h * s))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((500, 375), Image.BICUBIC)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        # film-grain noise: photos upscaled from the small bundled ones are smoother than
        # ImageNet's, and JPEG decode time grows with the bytes to entropy-decode
        arr = np.asarray(out, dtype=np.float32) + rng.normal(0.0, 8.0, (375, 500, 3)).astype(np.float32)
        out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = Path(root) / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        out.save(d / f"img_{i:06d}.JPEG", quality=95)


def make_image_folder(root: Path, n: int, seed: int = 0, classes: int = 4) -> Path:
    """``n`` JPEGs of 500x375 (random crops/flips of the bundled photos plus grain, about ImageNet's
    100-110 KB per file) in ``classes`` folders,
    written by several processes when ``n`` is large."""
    procs = min(os.cpu_count() or 1, max(1, n // 64))
    if procs <= 1:
        _make_images(str(root), 0, n, seed, classes)
        return root
    import concurrent.futures as cf
    import multiprocessing as mp

    step = -(-n // procs)
    with cf.ProcessPoolExecutor(procs, mp_context=mp.get_context("fork")) as ex:
        list(ex.map(_make_images, [str(root)] * procs, range(0, n, step),
                    [min(n, a + step) for a in range(0, n, step)], [seed] * procs, [classes] * procs))
    return root


def link_first(src: Path, dst: Path, n: int) -> Path:
    """An ImageFolder at ``dst`` holding (hard links to) the first ``n`` images of ``src``."""
    files = sorted(src.rglob("*.JPEG"), key=lambda p: p.name)[:n]
    for f in files:
        d = dst / f.parent.name
        d.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, d / f.name)
        except OSError:
            shutil.copy2(f, d / f.name)
    return dst


def decode_rate(folder: Path, resolution: int, batch: int, workers: int, limit: int | None = None) -> float:
    """images/s of the build's decode DataLoader alone (worker start-up included, as in a build)."""
    from torch.utils.data import DataLoader

    from irepa.pipeline.sources import open_source
    from irepa.pipeline.transforms import DecodeDataset

    source = open_source(str(folder))
    n = len(source) if limit is None else min(limit, len(source))
    batches = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    loader = DataLoader(DecodeDataset(source, resolution), batch_sampler=batches, num_workers=workers)
    t0 = time.perf_counter()
    got = 0
    for b in loader:
        got += int(b["image"].shape[0])
    return got / (time.perf_counter() - t0)


def peak_flops(dev: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given * 1e12, f"{given:.0f} TFLOPS (given)"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for k, v in PEAK_BF16.items():
            if k in name:
                return v, f"{v / 1e12:.0f} TFLOPS bf16 dense ({name})"
        return None, f"unknown peak for {name}; pass --peak-tflops"
    return None, "CPU: no FLOP bound (pass --peak-tflops to compare)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = setup(args)
    size_name = "smoke" if args.smoke else ("real" if args.real else "cpu")
    size = dict(SIZES[size_name])
    N = args.images or size["images"]
    B = args.batch or size["batch"]
    R = size["resolution"]
    workers = [int(w) for w in args.workers.split(",")] if args.workers else size["workers"]
    workers = [w for w in workers if w <= (os.cpu_count() or 1)] or [0]
    enc_names = [e.strip() for e in args.encoders.split(",") if e.strip()]
    print(f"# sizes: {size_name}; {R} px, build batch {B}, N = {N} images (500x375 JPEG q95), "
          f"encoders {enc_names}, VAE {size['vae']}, decode workers {workers}")
    work = Path(tempfile.mkdtemp(prefix="irepa-bench-build-"))
    rows, ratios = [], []
    rec: dict = dict(bench="build", size=size_name, resolution=R, images=N, batch=B, workers=workers)
    try:
        t0 = time.perf_counter()
        folder_2n = make_image_folder(work / "images_2n", 2 * N)
        folder_n = link_first(folder_2n, work / "images_n", N)
        jpeg_bytes = sum(f.stat().st_size for f in folder_2n.rglob("*.JPEG")) / (2 * N)
        print(f"# made {2 * N} JPEGs in {time.perf_counter() - t0:.1f} s, {jpeg_bytes / 1e3:.0f} KB each on average "
              "(ImageNet train: about 110 KB)")

        # ---- decode-bound
        dec = {}
        for w in workers:
            decode_rate(folder_n, R, B, w, limit=min(N, 2 * B))  # warm the page cache and imports
            dec[w] = decode_rate(folder_2n, R, B, w)
            rows.append(["decode only", f"{w} workers", f"{dec[w]:.1f}", ""])
        rec["decode"] = dec

        # ---- model-bound
        from irepa.pipeline.build import _encode_batch
        from irepa.pipeline.encoders import load_encoder
        from bench.common import sample_images

        vae = make_vae(size["vae"]).eval().to(dev)
        encs = {n: load_encoder(n, resolution=R, pretrained=False, config=size["encoder_config"]).eval().to(dev)
                for n in enc_names}
        images = sample_images(R, B)
        if dev.type == "cuda":
            images = images.pin_memory()
        tt = time_interleaved({"model": lambda: _encode_batch(images, vae, encs, dev, False),
                               "vae": lambda: _encode_batch(images, vae, {}, dev, False)},
                              dev, args.warmup, args.repeats)
        t_model, t_vae = tt["model"], tt["vae"]
        model_rate = B / t_model.median
        rows.append(["model only (VAE + encoders)", f"batch {B}", f"{model_rate:.1f}", ""])
        rows.append(["  of which VAE", f"batch {B}", f"{B / t_vae.median:.1f}", ""])
        one = images[:1].to(dev)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

        def fwd_one():
            with torch.inference_mode(), amp:
                vae.encode(one)
                for e in encs.values():
                    e(one)

        flops = count_flops(fwd_one)
        achieved = flops * model_rate
        peak, peak_how = peak_flops(dev, args.peak_tflops)
        bound = peak / flops if peak else None
        rec.update(model_rate=model_rate, vae_rate=B / t_vae.median, flops_per_image=flops,
                   achieved_tflops=achieved / 1e12, peak=peak, bound_rate=bound)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                _encode_batch(images, vae, encs, dev, False)
                sync(dev)
            key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            print("\n### Profile of the model part (top operators by self time)\n")
            try:
                print(prof.key_averages().table(sort_by=key, row_limit=15))
            except Exception:  # noqa: BLE001 - older torch names the column cuda_time_total
                print(prof.key_averages().table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total",
                                                row_limit=15))
        del vae, encs
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        # ---- end to end
        build_rate = None
        if not args.no_build:
            from irepa.pipeline.build import build_store
            from bench.common import save_random_sd_vae

            try:  # diffusers' from_pretrained nags about `accelerate` on every load
                from diffusers.utils import logging as dlog
                dlog.set_verbosity_error()
            except ImportError:
                pass

            vae_arg = "tiny" if size["vae"] == "tiny" else save_random_sd_vae(str(work / "sd-vae-random"))
            w_build = max(workers)
            times = {}
            for tag, folder in (("n", folder_n), ("2n", folder_2n)):
                t0 = time.perf_counter()
                build_store(data=str(folder), out=str(work / f"store-{tag}"), encoder=enc_names, vae=vae_arg,
                            resolution=R, encoder_config=size["encoder_config"], pretrained=False,
                            shard_size=max(B, 1), batch_size=B, num_workers=w_build, resume=False,
                            device=str(dev), progress=False)
                sync(dev)
                times[tag] = time.perf_counter() - t0
                shutil.rmtree(work / f"store-{tag}", ignore_errors=True)
            build_rate = N / max(times["2n"] - times["n"], 1e-9)
            rows.append(["irepa-cache build (end to end)", f"{w_build} workers", f"{build_rate:.1f}",
                         f"t(N) {times['n']:.1f} s, t(2N) {times['2n']:.1f} s"])
            rec.update(build_rate=build_rate, build_times=times, build_workers=w_build)

        print_table(["part", "setting", "images/s", "note"], rows, title="Build throughput")
        print(f"FLOPs per image: {flops / 1e9:.1f} G (VAE encoder + {', '.join(enc_names)} at {R} px); "
              f"model part achieves {achieved / 1e12:.2f} TFLOPS; peak: {peak_how}")
        best_dec = max(dec.values())
        ratios.append(("decode (best workers) / model images/s", best_dec / model_rate,
                       ">1: the models are the bottleneck, <1: decoding is"))
        if build_rate is not None:
            ratios.append(("build / min(decode, model) images/s", build_rate / min(best_dec, model_rate),
                           "how close the pipelined build gets to its slower part"))
        if bound:
            ratios.append(("model images/s / FLOP bound", model_rate / bound, "goal >= 0.5 on GPU"))
            if build_rate is not None:
                ratios.append(("build images/s / FLOP bound", build_rate / bound, "end to end"))
        print_ratios(ratios)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, rec)
    return rec


if __name__ == "__main__":
    main()
