"""`irepa-eval`: FID, sFID, Inception Score, precision and recall of a samples .npz, as the ADM suite.

``irepa-eval samples/samples.npz --ref VIRTUAL_imagenet256_labeled.npz`` runs the ADM suite's
Inception-v3 (``trainer.inception``: torch-fidelity's port of the TF graph) over the samples
(uint8 [N, H, W, 3] under ``arr_0``) and, when needed, the reference images, then computes the
metrics with the ADM formulas (``trainer.fid``), prints a table and writes ``<samples>.eval.json``.

Reference (``--ref``):

* an ADM reference batch (.npz): ``mu``/``sigma`` and ``mu_s``/``sigma_s`` are read from it when
  present (as the ADM suite does); its ``arr_0`` images give the features for precision/recall
  (the ImageNet 256 batch holds 10,000 images: P/R is all samples against those 10,000);
* a .npz of images (``arr_0`` only) or a folder of images (read recursively, sorted, each ADM
  center-cropped to ``--resolution``, default the samples' resolution): statistics and P/R
  features are computed.

Image sources (the .npz reader, folders) are in ``trainer.eval_images``. What is computed from
reference images is cached next to the reference
(``<ref>.irepa-eval-<key>.npz``: ``mu``, ``sigma``, ``mu_s``, ``sigma_s``, ``pool``, ``meta``; no
pickle, written atomically), keyed by the sha256 of the reference's bytes (every file of a folder,
with its name), the crop resolution, and the network's weights hash. A cache file is itself a
valid ``--ref``.

Under ``torchrun`` each rank runs the network on a contiguous block of whole batches; features
are gathered in order on rank 0, which computes the metrics: the batches, hence the features, are
those of a one-process run. Feature extraction runs in fp32 with TF32 off and deterministic cuDNN.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from irepa.pipeline import dist as distributed
from irepa.pipeline.dist import Dist, comm_device, current
from irepa.stores.manifest import atomic_savez, atomic_write_bytes

from .eval_images import FolderImages, ImageSource, NpzImages, open_images
from .fid import (IS_SPLIT_SIZE, PR_NEIGHBOURS, feature_statistics, frechet_distance, inception_score,
                  precision_recall)
from .inception import POOL_DIM, SPATIAL_DIM, InceptionFeatures, cached_inception, exact_fp32, load_inception

__all__ = [
    "EvalConfig",
    "ReferenceStats",
    "NpzImages",
    "FolderImages",
    "load_reference_stats",
    "extract_features",
    "fid_of_images",
    "evaluate",
    "format_table",
    "default_out_path",
    "main",
]

METRICS = ("fid", "sfid", "is", "pr")
EVAL_FORMAT = 1
CACHE_FORMAT = "irepa-eval-ref-v1"


# ----------------------------------------------------------------------------- config


from irepa.trainer.config import EvalConfig  # noqa: E402  (the options live with the other commands')


def _parse_metrics(value: Union[str, Sequence[str]]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    items = [m.strip().lower() for m in items if str(m).strip()]
    if items == ["all"]:
        return list(METRICS)
    bad = [m for m in items if m not in METRICS]
    if bad or not items:
        raise ValueError(f"--metrics {value!r}: expected a comma list of {', '.join(METRICS)} (or all)")
    return [m for m in METRICS if m in items]


# ----------------------------------------------------------------------------- distributed


def _current_dist(device: torch.device, distributed: bool = True) -> Dist:
    """The initialised process group's view (a one-process view when not ``distributed``)."""
    return current(device) if distributed else Dist(0, 1, 0, device)


def _broadcast_flag(d: Dist, value: bool) -> bool:
    if not d.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([1 if value else 0], dtype=torch.int64, device=comm_device(d))
    dist.broadcast(t, src=0)
    return bool(t.item())


def _gather_rows(d: Dist, x: torch.Tensor, to_all: bool = False) -> Optional[torch.Tensor]:
    """Concatenate every rank's rows in rank order on rank 0 (on every rank with ``to_all``)."""
    if not d.enabled:
        return x
    import torch.distributed as dist

    dev = comm_device(d)
    xs = x.to(dev).contiguous()
    count = torch.tensor([xs.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(count) for _ in range(d.world_size)]
    dist.all_gather(counts, count)
    counts_i = [int(c.item()) for c in counts]
    most = max(counts_i)
    padded = torch.zeros((most, *xs.shape[1:]), dtype=xs.dtype, device=dev)
    padded[: xs.shape[0]] = xs
    if to_all:
        parts = [torch.empty_like(padded) for _ in range(d.world_size)]
        dist.all_gather(parts, padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(d.world_size)] if d.main else None
        dist.gather(padded, parts, dst=0)
        if not d.main:
            return None
    return torch.cat([p[:c] for p, c in zip(parts, counts_i)]).to(x.device)


# ----------------------------------------------------------------------------- features


def _batch_range(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's [start, stop): a contiguous block of whole batches, so every batch holds the
    same images as in a one-process run."""
    batches = math.ceil(n / batch_size) if n else 0
    per = math.ceil(batches / world) if batches else 0
    start = min(n, rank * per * batch_size)
    stop = min(n, (rank + 1) * per * batch_size)
    return start, stop


def _forward_batches(network: InceptionFeatures, batches: Iterable[Union[np.ndarray, torch.Tensor]],
                     device: torch.device, nhwc: bool, bar=None) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"pool": [], "spatial": [], "logits": []}
    with exact_fp32():
        for batch in batches:
            x = torch.as_tensor(batch)
            if x.ndim != 4 or x.dtype != torch.uint8:
                raise ValueError(f"images must be uint8 [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
            if nhwc:
                x = x.permute(0, 3, 1, 2)
            if x.shape[0] == 0:
                continue
            feats = network(x.to(device, non_blocking=True).contiguous())
            for k in out:
                out[k].append(feats[k])
            if bar is not None:
                bar.update(x.shape[0])
    dims = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "logits": network.extractor.fc.out_features}
    return {k: torch.cat(v) if v else torch.zeros((0, dims[k]), device=device) for k, v in out.items()}


def extract_features(source: ImageSource, network: InceptionFeatures, batch_size: int = 200,
                     progress: bool = False, desc: str = "inception", num_workers: Optional[int] = None,
                     distributed: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """Inception features {"pool", "spatial", "logits"} [N, D] float32 of every image of ``source``
    in order. Under an initialised process group (unless not ``distributed``) each rank runs its
    block of whole batches and rank 0 returns the gathered features (other ranks return None)."""
    device = next(network.parameters()).device
    d = _current_dist(device, distributed)
    start, stop = _batch_range(len(source), batch_size, d.rank, d.world_size)
    bar = None
    if progress and d.main:
        from tqdm import tqdm

        bar = tqdm(total=stop - start, unit="img", desc=desc, file=sys.stderr, leave=False)
    try:
        mine = _forward_batches(network, source.iter_batches(start, stop, batch_size, num_workers), device,
                                nhwc=True, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    if not d.enabled:
        return mine
    gathered = {k: _gather_rows(d, v) for k, v in mine.items()}
    return gathered if d.main else None


# ----------------------------------------------------------------------------- reference


@dataclass
class ReferenceStats:
    """What the metrics need from a reference: FID and sFID statistics (float64) and the pool
    features of its images for precision/recall (float32), with where each came from."""

    path: str
    mu: Optional[np.ndarray] = None
    sigma: Optional[np.ndarray] = None
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    pool: Optional[np.ndarray] = None
    num_images: Optional[int] = None
    resolution: Optional[tuple[int, int]] = None
    statistics: str = "computed"
    cache_file: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"path": self.path, "statistics": self.statistics, "images": self.num_images,
                "resolution": list(self.resolution) if self.resolution else None,
                "cache_file": self.cache_file, "has_spatial": self.mu_s is not None,
                "has_pr_features": self.pool is not None}


def _check_stats(path: str, name: str, mu: np.ndarray, sigma: np.ndarray, dim: int) -> None:
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"--ref {path}: '{name}' statistics have shapes {list(mu.shape)} / {list(sigma.shape)}, "
                         f"expected [{dim}] / [{dim}, {dim}]")


def _cache_path(ref: Path, key: str) -> Path:
    name = ref.name.rstrip("/") or "ref"
    return ref.parent / f"{name}.irepa-eval-{key[:16]}.npz"


def _cache_key(content: str, weights_sha256: str) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "inputs": content, "network": weights_sha256,
                       "features": ["pool_3", "mixed_6/conv[..., :7]"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(path: Path, key: str) -> Optional[dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != key:
                return None
            return {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")} | {"meta": meta}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def load_reference_stats(
    ref: Union[str, Path],
    network: Optional[InceptionFeatures] = None,
    *,
    inception_weights: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    batch_size: int = 200,
    resolution: int = 0,
    num_workers: int = 4,
    cache: bool = True,
    need_pr: bool = True,
    progress: bool = False,
    distributed: bool = True,
) -> Optional[ReferenceStats]:
    """Reference statistics for FID/sFID (and pool features for precision/recall when ``need_pr``).

    ``ref``: an ADM reference .npz (``mu``/``sigma``/``mu_s``/``sigma_s`` read as is), a .npz of
    images (``arr_0``), a folder of images (ADM crop to ``resolution``), or an irepa-eval cache
    file. What must be computed from images uses ``network`` (default: :func:`load_inception` with
    ``inception_weights`` on ``device``) and is cached next to ``ref`` when ``cache``. Under an
    initialised process group all ranks must call it and rank 0 gets the result, others None;
    ``distributed=False`` computes on this process alone.
    """
    path = Path(ref)
    spath = str(ref)
    stats: dict[str, Optional[np.ndarray]] = {"mu": None, "sigma": None, "mu_s": None, "sigma_s": None}
    images: Optional[ImageSource] = None
    from_file = False
    if path.is_dir():
        images = FolderImages(path, resolution, num_workers)
    elif path.is_file():
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--ref {path}: not a readable .npz ({exc})") from None
        if not hasattr(z, "files"):
            raise ValueError(f"--ref {path}: expected a .npz (mu/sigma and/or arr_0), got a single array")
        with z:
            keys = set(z.files)
            if "mu" in keys:
                if "sigma" not in keys:
                    raise ValueError(f"--ref {path}: has 'mu' but no 'sigma'")
                stats["mu"], stats["sigma"] = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
                _check_stats(spath, "mu/sigma", stats["mu"], stats["sigma"], POOL_DIM)
                from_file = True
                if "mu_s" in keys and "sigma_s" in keys:
                    stats["mu_s"], stats["sigma_s"] = z["mu_s"].astype(np.float64), z["sigma_s"].astype(np.float64)
                    _check_stats(spath, "mu_s/sigma_s", stats["mu_s"], stats["sigma_s"], SPATIAL_DIM)
            pool_in_file = z["pool"].astype(np.float32) if "pool" in keys and "meta" in keys else None
        if "arr_0" in keys:
            images = NpzImages(path)
        elif "mu" not in keys:
            raise ValueError(f"--ref {path}: expected ADM reference statistics (mu, sigma, mu_s, sigma_s) and/or "
                             f"images (arr_0); it has {', '.join(sorted(keys)) or 'nothing'}")
        if pool_in_file is not None and images is None:  # an irepa-eval cache file given as --ref
            out = ReferenceStats(spath, pool=pool_in_file, num_images=len(pool_in_file), statistics="file",
                                 **stats)
            return out
    else:
        raise FileNotFoundError(f"--ref {path} does not exist")

    spatial_missing = stats["mu_s"] is None
    need_images = stats["mu"] is None or spatial_missing or need_pr
    out = ReferenceStats(spath, statistics="file" if from_file else "computed", **stats)
    if not need_images:
        return out
    if images is None:
        if need_pr:
            out.notes.append("reference has no images (arr_0): no precision/recall")
        if spatial_missing:
            out.notes.append("reference has no spatial statistics (mu_s/sigma_s) and no images: no sFID")
        return out
    if len(images) < 2:
        raise ValueError(f"--ref {path}: {len(images)} image(s); statistics need at least 2")

    if network is None:
        network = load_inception(inception_weights, distributed.from_env(None if device is None else str(device)).device)
    dev = next(network.parameters()).device
    d = _current_dist(dev, distributed)
    out.num_images = len(images)
    out.resolution = images.resolution

    cached = None
    cfile = None
    if d.main and cache:
        key = _cache_key(images.content_key(), network.weights_sha256)
        cfile = _cache_path(path, key)
        if cfile.is_file():
            cached = _read_cache(cfile, key)
    hit = _broadcast_flag(d, cached is not None)
    if hit:
        if not d.main:
            return None
        computed = cached
        out.cache_file = str(cfile)
    else:
        feats = extract_features(images, network, batch_size, progress, desc=f"reference {path.name}",
                                 num_workers=num_workers, distributed=distributed)
        if not d.main:
            return None
        mu, sigma = feature_statistics(feats["pool"])
        mu_s, sigma_s = feature_statistics(feats["spatial"])
        computed = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s,
                    "pool": feats["pool"].cpu().numpy().astype(np.float32)}
        if cfile is not None:
            meta = {"key": key, "format": CACHE_FORMAT, "reference": str(path), "images": len(images),
                    "resolution": list(images.resolution), "network": network.network,
                    "weights_sha256": network.weights_sha256}
            try:
                atomic_savez(cfile, meta=np.array(json.dumps(meta, sort_keys=True)), **computed)
                out.cache_file = str(cfile)
            except OSError as exc:
                warnings.warn(f"could not cache reference statistics at {cfile}: {exc}", stacklevel=2)
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        if getattr(out, k) is None:  # the file's own statistics win, as in the ADM suite
            setattr(out, k, np.asarray(computed[k], np.float64))
    if need_pr:
        out.pool = np.asarray(computed["pool"], np.float32)
    if from_file and spatial_missing:
        out.statistics = "file (mu/sigma); mu_s/sigma_s computed from arr_0"
    elif not from_file:
        out.statistics = "cache" if hit else "computed"
    return out


# ----------------------------------------------------------------------------- training-time FID


def fid_of_images(
    images: Union[torch.Tensor, np.ndarray, Iterable[Union[torch.Tensor, np.ndarray]]],
    ref: Optional[Union[ReferenceStats, str, Path]],
    device: Optional[Union[str, torch.device]] = None,
    *,
    network: Optional[InceptionFeatures] = None,
    inception_weights: Optional[str] = None,
    batch_size: int = 200,
    gather: bool = False,
) -> float:
    """FID of uint8 images [N, 3, H, W] (a tensor/array, or an iterable of such batches) against
    ``ref`` (:class:`ReferenceStats` from :func:`load_reference_stats`, or a path to load).

    For training-time tracking (FID-K). The network defaults to a cached :func:`load_inception` of
    ``inception_weights`` on ``device``. With ``gather`` (under an initialised process group) every
    rank passes its own images, features are gathered and every rank gets the same FID; without
    it, each call scores the images it is given.
    """
    dev = distributed.from_env(None if device is None else str(device)).device
    if network is None:
        network = cached_inception(inception_weights, str(dev))
    dev = next(network.parameters()).device
    if ref is not None and not isinstance(ref, ReferenceStats):
        ref = load_reference_stats(ref, network, batch_size=batch_size, need_pr=False, distributed=gather)
    if isinstance(images, (torch.Tensor, np.ndarray)):
        arr = torch.as_tensor(images)
        batches: Iterable = (arr[i:i + batch_size] for i in range(0, arr.shape[0], batch_size))
    else:
        batches = images
    pool = _forward_batches(network, batches, dev, nhwc=False)["pool"]
    d = _current_dist(dev, gather)
    if d.enabled:
        pool = _gather_rows(d, pool)
    value, error = float("nan"), None
    if d.main:
        try:
            if ref is None or ref.mu is None:
                raise ValueError(f"reference {getattr(ref, 'path', ref)} has no FID statistics (mu/sigma)")
            mu, sigma = feature_statistics(pool)
            value = frechet_distance(mu, sigma, ref.mu, ref.sigma)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are released
            error = exc
    if d.enabled:
        value = _broadcast_float(d, value)
    if error is not None:
        raise error
    if not math.isfinite(value):
        raise ValueError("fid_of_images failed on rank 0 (see its error)")
    return value


def _broadcast_float(d: Dist, value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=comm_device(d))
    dist.broadcast(t, src=0)
    return float(t.item())


# ----------------------------------------------------------------------------- provenance


def _run_provenance(samples: Path) -> dict[str, Optional[str]]:
    """Store and encoder of the run that made the samples, from an irepa-train args.json in the
    samples' folder or its parent (``irepa-sample --out RUN/samples`` puts them there)."""
    base = samples if samples.is_dir() else samples.parent
    for folder in (base, base.parent):
        args_file = folder / "args.json"
        if not args_file.is_file():
            continue
        try:
            args = json.loads(args_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(args, dict):
            continue
        store = args.get("cache")
        encoder = None
        encs = args.get("encoders")
        if isinstance(encs, str):
            encs = [e for e in encs.split(",") if e]
        if isinstance(encs, list) and len(encs) == 1:
            encoder = str(encs[0])
        elif store:
            man = Path(store) / "manifest.json"
            if not man.is_absolute() and not man.is_file():
                man = folder / man
            try:
                names = list((json.loads(man.read_text(encoding="utf-8")).get("encoders") or {}).keys())
            except (OSError, json.JSONDecodeError, AttributeError):
                names = []
            if len(names) == 1:
                encoder = names[0]
        return {"run": str(folder), "store": str(store) if store else None, "encoder": encoder}
    return {"run": None, "store": None, "encoder": None}


# ----------------------------------------------------------------------------- evaluate


def default_out_path(samples: Union[str, Path]) -> Path:
    """``samples/samples.npz`` -> ``samples/samples.eval.json``; a folder ``imgs`` -> ``imgs.eval.json``."""
    p = Path(samples)
    if p.is_dir():
        return p.parent / f"{p.name}.eval.json"
    return p.with_suffix(".eval.json") if p.suffix == ".npz" else p.with_name(p.name + ".eval.json")


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("irepa")
    except Exception:  # noqa: BLE001 - not installed (a bare checkout)
        return "unknown"


def evaluate(cfg: EvalConfig) -> Optional[dict]:
    """Score ``cfg.samples`` against ``cfg.ref``: print a table, write the JSON (rank 0), return it
    (None on other ranks). Checks every input before any network work."""
    metrics = _parse_metrics(cfg.metrics)
    if not cfg.samples:
        raise ValueError("name the samples: irepa-eval SAMPLES.npz --ref REF.npz")
    needs_ref = metrics != ["is"]
    if not cfg.ref and needs_ref:
        raise ValueError("--ref is required (only --metrics is goes without): an ADM reference batch .npz, "
                         "a .npz of images or a folder of images")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size {cfg.batch_size}: must be >= 1")
    samples_path = Path(cfg.samples)
    ref_path = Path(cfg.ref) if needs_ref else None
    if ref_path is not None and not ref_path.exists():
        raise FileNotFoundError(f"--ref {ref_path} does not exist")
    out_path = Path(cfg.out) if cfg.out else default_out_path(samples_path)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"--out {out_path}: folder {out_path.parent} does not exist")
    probe = open_images(samples_path, cfg.resolution, cfg.num_workers, "samples")
    resolution = cfg.resolution or probe.resolution[0]
    if isinstance(probe, NpzImages) and cfg.resolution and probe.resolution != (cfg.resolution, cfg.resolution):
        warnings.warn(f"--resolution {cfg.resolution} only crops folders; {probe.describe()} is used as is",
                      stacklevel=2)
    n = len(probe)
    if n < 2 and ("fid" in metrics or "sfid" in metrics):
        raise ValueError(f"{probe.describe()}: FID needs at least 2 images")
    if n <= PR_NEIGHBOURS and "pr" in metrics:
        raise ValueError(f"{probe.describe()}: precision/recall need more than {PR_NEIGHBOURS} images "
                         f"(leave pr out of --metrics)")
    if n < 1:
        raise ValueError(f"{probe.describe()}: no images")
    provenance = _run_provenance(samples_path)
    encoder = cfg.encoder or provenance["encoder"]

    import torch.distributed as dist

    created = not (dist.is_available() and dist.is_initialized())
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ValueError(f"--device {cfg.device!r}: expected auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
    d = distributed.setup(cfg.device)
    try:
        network = load_inception(cfg.inception_weights, d.device)
        ref = None
        if ref_path is not None:
            ref = load_reference_stats(ref_path, network, batch_size=cfg.batch_size, resolution=resolution,
                                       num_workers=cfg.num_workers, cache=cfg.ref_cache, need_pr="pr" in metrics,
                                       progress=cfg.progress)
        feats = extract_features(probe, network, cfg.batch_size, cfg.progress, desc=f"samples {samples_path.name}",
                                 num_workers=cfg.num_workers)
        if not d.main:
            return None
        result = _score(cfg, metrics, feats, ref, network, probe, d)
        result.update({"encoder": encoder, "store": provenance["store"], "run": provenance["run"]})
        if cfg.save_features:
            arrays = {k: v.cpu().numpy() for k, v in feats.items()}
            if ref is not None and ref.pool is not None:
                arrays["ref_pool"] = ref.pool
            atomic_savez(Path(cfg.save_features), **arrays)
            result["features_file"] = str(cfg.save_features)
        result["file"] = str(out_path)
        _atomic_write_text(out_path, json.dumps(result, indent=1, allow_nan=False) + "\n")
        print(format_table(result))
        print(f"wrote {out_path}")
        return result
    finally:
        if isinstance(probe, NpzImages):
            probe.close()
        if created:
            distributed.teardown(d)


def _score(cfg: EvalConfig, metrics: list[str], feats: dict[str, torch.Tensor], ref: Optional[ReferenceStats],
           network: InceptionFeatures, samples: ImageSource, d: Dist) -> dict:
    notes = list(ref.notes) if ref is not None else []
    values: dict[str, Optional[float]] = {"fid": None, "sfid": None, "inception_score": None,
                                          "precision": None, "recall": None}
    if "fid" in metrics and ref is not None and ref.mu is not None:
        mu, sigma = feature_statistics(feats["pool"])
        values["fid"] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    if "sfid" in metrics and ref is not None and ref.mu_s is not None:
        mu_s, sigma_s = feature_statistics(feats["spatial"])
        values["sfid"] = frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s)
    if "is" in metrics:
        values["inception_score"] = inception_score(feats["logits"], IS_SPLIT_SIZE)
    if "pr" in metrics and ref is not None and ref.pool is not None:
        values["precision"], values["recall"] = precision_recall(torch.as_tensor(ref.pool).to(d.device),
                                                                 feats["pool"], PR_NEIGHBOURS, device=d.device)
    if ref is not None and ref.resolution and tuple(ref.resolution) != tuple(samples.resolution):
        notes.append(f"reference images are {ref.resolution[0]}x{ref.resolution[1]}, samples "
                     f"{samples.resolution[0]}x{samples.resolution[1]} (both are resized to 299 by the network)")
    if len(samples) < 50000 and values["fid"] is not None:
        notes.append(f"FID of {len(samples)} samples (the papers report FID-50K; FID is biased upward for small N)")
    return {
        "irepa_eval": EVAL_FORMAT,
        **{k: _finite_or_none(v) for k, v in values.items()},
        "samples": {"path": str(cfg.samples), "count": len(samples), "resolution": list(samples.resolution)},
        "reference": ref.describe() if ref is not None else {"path": cfg.ref or None},
        "network": network.describe(),
        "settings": {"metrics": metrics, "batch_size": cfg.batch_size, "world_size": d.world_size,
                     "device": str(d.device), "is_split_size": IS_SPLIT_SIZE, "pr_k": PR_NEIGHBOURS,
                     "definitions": "ADM evaluation suite (guided-diffusion evaluations/evaluator.py)"},
        "notes": notes,
        "irepa_version": _package_version(),
    }


def format_table(result: dict) -> str:
    """The terminal table of one :func:`evaluate` result."""
    def fmt(v: Optional[float], spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    rows = [("FID", fmt(result["fid"], ".4f")), ("sFID", fmt(result["sfid"], ".4f")),
            ("Inception Score", fmt(result["inception_score"], ".3f")),
            ("Precision", fmt(result["precision"], ".4f")), ("Recall", fmt(result["recall"], ".4f"))]
    s, r = result["samples"], result["reference"]
    head = [f"samples   {s['path']} ({s['count']} images, {s['resolution'][0]}x{s['resolution'][1]})"]
    if r.get("path"):
        head.append(f"reference {r['path']} (statistics: {r.get('statistics', 'n/a')}"
                    + (f"; {r['images']} images for P/R" if r.get("images") and r.get("has_pr_features") else "")
                    + ")")
    else:
        head.append("reference none")
    if result.get("encoder") or result.get("store"):
        head.append(f"run       encoder {result.get('encoder') or '?'}, store {result.get('store') or '?'}")
    width = max(len(k) for k, _ in rows)
    lines = head + ["", f"{'metric'.ljust(width)}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    net = result["network"]
    lines += ["", f"network   {net['name']}, weights sha256 {str(net['weights_sha256'])[:16]}"]
    lines += [f"note      {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


class TrainingFid:
    """FID-K during training (``irepa-train --eval-every N --eval-ref REF --eval-samples K``).

    Every rank samples its share of K images with the EMA model exactly as ``irepa-sample`` does
    (image i from ``(seed, i)``, the preview sampler settings), decodes them, and the Inception
    features are gathered so that every rank gets the FID of all K. The Inception network and the
    reference statistics load at the first evaluation."""

    def __init__(self, cfg: Any, objective: Any, ema: Any, extra: dict, log: Any):
        self.cfg, self.objective, self.ema, self.extra, self.log = cfg, objective, ema, extra, log
        self.network = self.ref = self.decode = None

    def __call__(self, step: int) -> dict:
        """``{"step", "fid_<K>", "eval_samples"}`` for metrics.jsonl (every rank gets the same)."""
        from irepa.trainer.sample import generate, rank_share

        cfg, obj = self.cfg, self.objective
        d = _current_dist(obj.device)
        if self.network is None:
            self.network = load_inception(cfg.eval_inception_weights, obj.device)
            self.ref = load_reference_stats(cfg.eval_ref, self.network, need_pr=False, progress=False)
            self.decode = obj.decoder(cfg.vae, self.extra, offline=True)
        mine = rank_share(int(cfg.eval_samples), d.rank, d.world_size)
        images = generate(obj, self.ema, self.decode, mine, cfg.seed,
                          method=cfg.sample_method or obj.preview_sampling["method"],
                          steps=cfg.sample_steps or obj.preview_sampling["steps"], cfg_scale=cfg.sample_cfg)
        value = fid_of_images(torch.from_numpy(images).permute(0, 3, 1, 2), self.ref, network=self.network,
                              gather=True)
        self.log(f"step {step}: FID-{cfg.eval_samples} {value:.3f} against {cfg.eval_ref}")
        return {"step": step, f"fid_{cfg.eval_samples}": value, "eval_samples": int(cfg.eval_samples)}


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m irepa.trainer.evaluate`` / ``torchrun ... -m irepa.trainer.evaluate``: ``irepa-eval``."""
    from irepa.trainer.cli import eval_main

    eval_main(argv)


if __name__ == "__main__":
    main()
