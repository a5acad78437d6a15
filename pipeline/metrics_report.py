"""`irepa-cache metrics`: spatial-structure metrics of cached encoder features, as a report.

For each store and each encoder in it, a fixed-seed sample of images is read in batches, the
metrics of ``pipeline.spatial_metrics`` (LDS, CDS, RMSC, and SRSS with masks) are computed per
image on the raw patch tokens and after iREPA's spatial normalisation, and summarised as a mean
with a 95% confidence interval. The report is a terminal table (one row per store/encoder), a
JSON file with the summaries and the per-image values, and a PNG that puts the encoders side by
side. Given a table of FID per encoder, it adds each metric's Pearson and Spearman correlation
with FID over the encoders, as the paper's correlation figure does.

Confidence interval: normal approximation, mean +- 1.96 * sd / sqrt(n), with sd the sample
standard deviation (ddof=1) over the n images where the metric is finite (NaN images, e.g. SRSS
without a mask, are left out). It describes the sampling error of the mean over the store's
images, not the spread of individual images (that is ``sd``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from irepa.stores.manifest import atomic_open, atomic_write_bytes

from .spatial_metrics import DEFAULT_FAR, DEFAULT_MAX_DIST, DEFAULT_NEAR, spatial_metrics

__all__ = [
    "run_metrics",
    "summarize",
    "sample_indices",
    "read_fid_table",
    "read_fid_inputs",
    "fid_correlations",
    "load_masks",
    "format_table",
    "plot_report",
]

Z95 = 1.96
VARIANTS = ("raw", "snorm")
VARIANT_TITLES = {"raw": "raw", "snorm": "spatial-norm"}
BASE_METRICS = ("lds", "cds", "rmsc")


# ----------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict[str, Optional[float]]:
    """Mean, sd (ddof=1), n, and the 95% normal-approximation CI over the finite values."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "half_width": None, "ci_low": None, "ci_high": None}
    mean = float(arr.mean())
    if n < 2:
        return {"mean": mean, "sd": None, "n": n, "half_width": None, "ci_low": None, "ci_high": None}
    sd = float(arr.std(ddof=1))
    hw = Z95 * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "half_width": hw, "ci_low": mean - hw, "ci_high": mean + hw}


def sample_indices(num_samples: int, limit: Optional[int], seed: int = 0) -> np.ndarray:
    """Sorted sample indices: all of them when ``limit`` covers the store, else a seeded sample.

    The draw depends only on (num_samples, limit, seed), so stores of the same dataset are
    measured on the same images.
    """
    if limit is None or limit <= 0 or limit >= num_samples:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_samples, size=int(limit), replace=False)).astype(np.int64)


# ----------------------------------------------------------------------------- FID table


def read_fid_table(path: Union[str, Path]) -> dict[str, float]:
    """Read a user's encoder -> FID table: JSON {name: fid}, or CSV/TSV lines "name,fid".

    CSV/TSV: comma or tab separated, blank lines and lines starting with '#' skipped, a first
    line whose second field is not a number is taken as a header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID table {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"FID table {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"FID table {path}: expected a JSON object {{name: fid}}, got {type(data).__name__}")
        table = {}
        for name, value in data.items():
            try:
                table[str(name)] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"FID table {path}: FID of {name!r} is not a number: {value!r}") from None
        return table
    table: dict[str, float] = {}
    seen_data = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        delimiter = "\t" if "\t" in line else ","
        fields = [f.strip() for f in next(csv.reader(io.StringIO(line), delimiter=delimiter))]
        if len(fields) < 2 or not fields[0]:
            raise ValueError(f"FID table {path}, line {lineno}: expected 'name,fid', got {line!r}")
        try:
            fid = float(fields[1])
        except ValueError:
            if not seen_data and not table:
                seen_data = True  # header line
                continue
            raise ValueError(f"FID table {path}, line {lineno}: FID {fields[1]!r} is not a number") from None
        seen_data = True
        table[fields[0]] = fid
    if not table:
        raise ValueError(f"FID table {path} has no 'name,fid' rows")
    return table


def _eval_json_entry(path: Path) -> Optional[tuple[Optional[str], float]]:
    """(name, fid) of an ``irepa-eval`` result JSON, or None when the file is not one. The name is
    the encoder recorded in it, else the folder name of its store, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or "irepa_eval" not in data:
        return None
    fid = data.get("fid")
    if not isinstance(fid, (int, float)) or isinstance(fid, bool) or not math.isfinite(fid):
        raise ValueError(f"--fid {path}: this irepa-eval result has no FID (fid = {fid!r}); rerun irepa-eval with fid in --metrics")
    name = data.get("encoder") or (Path(str(data["store"])).name if data.get("store") else None)
    return (str(name) if name else None), float(fid)


def read_fid_inputs(spec: Union[str, Path, Sequence[Union[str, Path]]]) -> dict[str, float]:
    """The encoder -> FID table of ``--fid``, given as one of:

    - a table file (``read_fid_table``: JSON {name: fid} or CSV/TSV "name,fid");
    - one ``irepa-eval`` result JSON, named by the encoder it records (else its store's folder name);
    - a comma list (or list) of ``irepa-eval`` JSONs, each ``PATH`` or ``NAME=PATH`` (NAME wins over
      what the file records), one per encoder.
    """
    if isinstance(spec, (list, tuple)):
        items = [str(x).strip() for x in spec if str(x).strip()]
    else:
        p = Path(str(spec))
        if p.is_file():
            if _eval_json_entry(p) is None:
                return read_fid_table(p)
            items = [str(p)]
        else:
            items = [x.strip() for x in str(spec).split(",") if x.strip()]
    if not items:
        raise ValueError("--fid: empty; give a FID table or irepa-eval JSONs (NAME=PATH,...)")
    table: dict[str, float] = {}
    origin: dict[str, str] = {}
    for item in items:
        if Path(item).is_file():
            name, path = None, Path(item)
        elif "=" in item:
            name, raw = item.split("=", 1)
            name, path = name.strip(), Path(raw.strip())
            if not name:
                raise ValueError(f"--fid {item!r}: empty name before '='")
            if not path.is_file():
                raise FileNotFoundError(f"--fid {item!r}: {path} does not exist")
        else:
            raise FileNotFoundError(f"--fid {item!r}: no such file (expected a FID table, an irepa-eval JSON, "
                                    f"or NAME=PATH.eval.json, comma separated)")
        entry = _eval_json_entry(path)
        if entry is None:
            raise ValueError(f"--fid {path}: not an irepa-eval result JSON (a FID table must be given alone)")
        recorded, fid = entry
        name = name or recorded
        if not name:
            raise ValueError(f"--fid {path}: the result names no encoder or store; name it: --fid ENCODER={path}")
        if name in table:
            raise ValueError(f"--fid: two FID entries for {name!r} ({origin[name]} and {path}); "
                             f"name them: --fid NAME1=PATH1,NAME2=PATH2")
        table[name] = fid
        origin[name] = str(path)
    return table


def _match_fid(row: dict, table: dict[str, float]) -> Optional[str]:
    candidates = [row["name"], f"{row['store_label']}/{row['encoder']}", row["encoder"]]
    if row["store_encoders"] == 1:
        candidates += [row["store_label"], row["store"]]
    for c in candidates:
        if c in table:
            return c
    return None


def fid_correlations(rows: list[dict], table: dict[str, float]) -> dict[str, Any]:
    """Pearson and Spearman correlation (scipy) of each metric's mean with FID over the rows.

    Rows are matched to the table by their name, "store/encoder", the encoder name, or (for a
    store with one encoder) the store's folder name. Each FID entry is one point: rows matched to
    the same entry (one encoder cached in several stores) are averaged, never counted twice.
    Correlations need >= 3 such points with a finite mean; otherwise r and p are None with a note.
    """
    from scipy import stats

    groups: dict[str, list[dict]] = {}
    unmatched_rows = []
    for row in rows:
        key = _match_fid(row, table)
        if key is None:
            unmatched_rows.append(row["name"])
            continue
        groups.setdefault(key, []).append(row)
        row["fid"] = table[key]
    result: dict[str, Any] = {
        "values": {r["name"]: table[k] for k, rs in groups.items() for r in rs},
        "points": {k: [r["name"] for r in rs] for k, rs in groups.items()},
        "rows_without_fid": unmatched_rows,
        "unused_fid_entries": sorted(set(table) - set(groups)),
        "correlation": {},
    }
    metric_names = _metric_names(rows)
    for variant in VARIANTS:
        result["correlation"][variant] = {}
        for m in metric_names:
            pairs = []
            for key, rs in groups.items():
                vals = [r["metrics"][variant][m]["mean"] for r in rs]
                vals = [v for v in vals if v is not None and math.isfinite(v)]
                if vals:
                    pairs.append((float(np.mean(vals)), table[key]))
            entry: dict[str, Any] = {"n": len(pairs), "pearson_r": None, "pearson_p": None,
                                     "spearman_r": None, "spearman_p": None}
            if len(pairs) < 3:
                entry["note"] = f"needs >= 3 encoders with a FID and a finite {m}, got {len(pairs)}"
            else:
                xs = np.array([p[0] for p in pairs])
                ys = np.array([p[1] for p in pairs])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pr = stats.pearsonr(xs, ys)
                    sr = stats.spearmanr(xs, ys)
                entry.update(pearson_r=_finite(pr[0]), pearson_p=_finite(pr[1]),
                             spearman_r=_finite(sr[0]), spearman_p=_finite(sr[1]))
                if entry["pearson_r"] is None:
                    entry["note"] = f"{m} (or FID) is constant over the encoders"
            result["correlation"][variant][m] = entry
    return result


def _finite(x: Any) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- masks


def _mask_to_grid(mask: np.ndarray, grid: tuple[int, int], where: str) -> np.ndarray:
    """Boolean mask at any resolution -> [h*w] bool: a token is foreground when >= half its area is."""
    h, w = grid
    mask = np.asarray(mask)
    if mask.ndim == 1:
        if mask.size != h * w:
            raise ValueError(f"{where}: a flat mask must have h*w = {h * w} entries, got {mask.size}")
        return mask.astype(bool)
    if mask.ndim == 3 and mask.shape[-1] in (1, 3, 4):
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D mask, got shape {mask.shape}")
    fg = mask > (127 if mask.dtype == np.uint8 and mask.max() > 1 else 0)
    if fg.shape == (h, w):
        return fg.reshape(-1)
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(fg.astype(np.float32))[None, None], (h, w))
    return (pooled[0, 0] >= 0.5).numpy().reshape(-1)


def _mask_file_candidates(folder: Path, key: str) -> list[Path]:
    k = Path(key)
    return [folder / f"{key}.png", folder / k.with_suffix(".png"), folder / f"{k.stem}.png"]


def load_masks(spec: Union[str, Path], keys: Sequence[str], indices: Sequence[int],
               grid: tuple[int, int], num_samples: int, store: str = "",
               require_any: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Foreground masks for the given samples, as ([n, h*w] bool, [n] has_mask bool).

    ``spec`` is one of:
    - a folder of PNGs named by sample key: ``<key>.png``, ``<key without extension>.png`` or
      ``<file stem>.png`` (first found); white/nonzero is foreground;
    - a ``.npy`` array [N, H, W] (or [N, h*w]) aligned on the store's sample index (N = len(store));
    - a ``.npz`` with ``masks`` [M, H, W] and ``keys`` [M] (strings), matched by sample key.
    Masks must be drawn on the same (ADM center-cropped) image the features come from; any
    resolution is area-downsampled to the token grid. Samples without a mask get has_mask False;
    with ``require_any`` it is an error when none of the given samples has one.
    """
    spec = Path(spec)
    h, w = grid
    n = len(indices)
    out = np.zeros((n, h * w), dtype=bool)
    has = np.zeros(n, dtype=bool)
    if spec.is_dir():
        from PIL import Image

        for i, key in enumerate(keys):
            for cand in _mask_file_candidates(spec, str(key)):
                if cand.is_file():
                    with Image.open(cand) as im:
                        arr = np.asarray(im.convert("L"))
                    out[i] = _mask_to_grid(arr, grid, f"mask {cand}")
                    has[i] = True
                    break
        if require_any and not has.any():
            example = _mask_file_candidates(spec, str(keys[0]))[0] if len(keys) else spec
            raise ValueError(
                f"masks folder {spec}: no mask found for any of the {n} sampled images of store "
                f"{store} (looked for e.g. {example})"
            )
        return out, has
    if not spec.is_file():
        raise FileNotFoundError(f"masks {spec} is neither a folder of PNGs nor an array file")
    if spec.suffix == ".npy":
        arr = np.load(spec, mmap_mode="r", allow_pickle=False)
        if arr.shape[0] != num_samples:
            raise ValueError(
                f"masks {spec}: {arr.shape[0]} masks, but store {store} has {num_samples} samples "
                f"(a .npy mask array is aligned on the sample index)"
            )
        for i, idx in enumerate(indices):
            out[i] = _mask_to_grid(np.asarray(arr[int(idx)]), grid, f"masks {spec}[{int(idx)}]")
        has[:] = True
        return out, has
    if spec.suffix == ".npz":
        with np.load(spec, allow_pickle=False) as z:
            if "masks" not in z or "keys" not in z:
                raise ValueError(f"masks {spec}: a .npz needs arrays 'masks' and 'keys', has {sorted(z.files)}")
            arr, mkeys = z["masks"], [str(k) for k in z["keys"]]
        if len(mkeys) != arr.shape[0]:
            raise ValueError(f"masks {spec}: {len(mkeys)} keys for {arr.shape[0]} masks")
        pos = {k: j for j, k in enumerate(mkeys)}
        for i, key in enumerate(keys):
            j = pos.get(str(key))
            if j is not None:
                out[i] = _mask_to_grid(arr[j], grid, f"masks {spec}[{key!r}]")
                has[i] = True
        if require_any and not has.any():
            raise ValueError(f"masks {spec}: none of its keys match the {n} sampled images of store {store}")
        return out, has
    raise ValueError(f"masks {spec}: expected a folder of PNGs, a .npy or a .npz file")


# ----------------------------------------------------------------------------- store reading


def _refuse_featureless(reader, path: str) -> None:
    if not list(reader.encoders):
        msg = (f"store {path} holds no encoder features (no features/<encoder> arrays, e.g. a "
               f"latents-only store); spatial metrics need a store built with --encoder")
        from irepa.stores import StoreError

        raise StoreError(msg)


def _feature_batches(reader, indices: np.ndarray, batch_size: int) -> Iterator[dict]:
    """Yield {"index", "key", "features": {enc: float32 [b, T, D]}} over ``indices`` (sorted)."""
    if reader.random_access:
        for start in range(0, len(indices), batch_size):
            batch = reader.get_batch(indices[start:start + batch_size], with_latents=False)
            yield {"index": np.asarray(batch["index"]), "key": list(batch["key"]), "features": batch["features"]}
        return
    # Streaming backend: read only the shards that hold a sampled index, in order. (A random
    # sample of a large webdataset store touches most shards; zarr reads only the samples.)
    counts = np.asarray(reader.shard_sample_counts(), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    wanted = set(int(i) for i in indices)
    buf: list[dict] = []
    for shard in np.unique(np.searchsorted(offsets, indices, side="right") - 1):
        for sample in reader.iter_shard(int(shard)):
            idx = int(sample["index"])
            if idx in wanted:
                buf.append({"index": idx, "key": sample["key"], "features": sample["features"]})
                if len(buf) == batch_size:
                    yield _stack(buf)
                    buf = []
    if buf:
        yield _stack(buf)


def _stack(samples: list[dict]) -> dict:
    encs = samples[0]["features"].keys()
    return {
        "index": np.array([s["index"] for s in samples], dtype=np.int64),
        "key": [s["key"] for s in samples],
        "features": {e: np.stack([np.asarray(s["features"][e]) for s in samples]) for e in encs},
    }


def _encoder_grid(reader, enc: str) -> tuple[int, int]:
    grids = getattr(reader, "token_grids", None) or {}
    grid = grids.get(enc) or ((reader.manifest.get("encoders") or {}).get(enc) or {}).get("token_grid") \
        or reader.token_grid
    return int(grid[0]), int(grid[1])


def _store_rows(reader, path: str, limit: Optional[int], seed: int, gamma: float, masks: Optional[str],
                device: torch.device, batch_size: int, progress: bool) -> list[dict]:
    encoders = list(reader.encoders)
    n_store = len(reader)
    if n_store == 0:
        raise ValueError(f"store {path} has no valid samples")
    indices = sample_indices(n_store, limit, seed)
    grids = {e: _encoder_grid(reader, e) for e in encoders}
    per_image: dict[str, dict[str, dict[str, list]]] = {
        e: {v: {} for v in VARIANTS} for e in encoders
    }
    all_idx: list[np.ndarray] = []
    all_keys: list[str] = []
    has_mask_all: dict[str, list[np.ndarray]] = {e: [] for e in encoders}
    batches = _feature_batches(reader, indices, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=math.ceil(len(indices) / batch_size), desc=f"metrics {path}",
                       file=sys.stderr, leave=False)
    for batch in batches:
        all_idx.append(batch["index"])
        all_keys.extend(str(k) for k in batch["key"])
        batch_masks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for enc in encoders:
            feats = torch.from_numpy(np.ascontiguousarray(batch["features"][enc])).to(device)
            grid = grids[enc]
            if feats.ndim != 3 or feats.shape[1] != grid[0] * grid[1]:
                raise ValueError(
                    f"store {path}: features/{enc} have shape {tuple(feats.shape)}, expected "
                    f"[B, {grid[0] * grid[1]}, D] for its {grid[0]}x{grid[1]} token grid"
                )
            m = None
            if masks is not None:
                if grid not in batch_masks:  # one read per batch and grid, shared by encoders
                    batch_masks[grid] = load_masks(masks, batch["key"], batch["index"], grid, n_store,
                                                   path, require_any=False)
                mk, has = batch_masks[grid]
                has_mask_all[enc].append(has)
                m = torch.from_numpy(mk).to(device)
            for variant in VARIANTS:
                res = spatial_metrics(feats, grid, spatial_norm=(variant == "snorm"), gamma=gamma, masks=m)
                for name, val in res.items():
                    per_image[enc][variant].setdefault(name, []).append(val.double().cpu().numpy())
    if masks is not None:
        for enc in encoders:
            if not np.concatenate(has_mask_all[enc]).any():
                raise ValueError(f"masks {masks}: no mask found for any sampled image of store {path}")

    label = Path(path).name or str(path)
    rows = []
    for enc in encoders:
        pim = {v: {k: np.concatenate(vals) for k, vals in per_image[enc][v].items()} for v in VARIANTS}
        rows.append({
            "store": str(path),
            "store_label": label,
            "store_encoders": len(encoders),
            "encoder": enc,
            "grid": list(grids[enc]),
            "dim": int(reader.feature_dims.get(enc, 0)) if hasattr(reader, "feature_dims") else None,
            "store_samples": n_store,
            "num_images": int(len(indices)),
            "metrics": {v: {k: summarize(a) for k, a in pim[v].items()} for v in VARIANTS},
            "per_image": {
                "index": np.concatenate(all_idx).tolist(),
                "key": list(all_keys),
                **{v: {k: a.tolist() for k, a in pim[v].items()} for v in VARIANTS},
            },
        })
    return rows


def _name_rows(rows: list[dict]) -> None:
    """Row name: the encoder name when unique over all rows, else "store/encoder" (then the path)."""
    enc_count: dict[str, int] = {}
    for r in rows:
        enc_count[r["encoder"]] = enc_count.get(r["encoder"], 0) + 1
    for r in rows:
        r["name"] = r["encoder"] if enc_count[r["encoder"]] == 1 else f"{r['store_label']}/{r['encoder']}"
    names = [r["name"] for r in rows]
    for r in rows:
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['store']}/{r['encoder']}"


def _metric_names(rows: list[dict]) -> list[str]:
    present = set()
    for r in rows:
        present.update(r["metrics"]["raw"].keys())
    return [m for m in ("lds", "cds", "rmsc", "srss") if m in present]


# ----------------------------------------------------------------------------- output


def _fmt(summary: dict) -> str:
    if summary["mean"] is None:
        return "n/a"
    if summary["half_width"] is None:
        return f"{summary['mean']:.4f}"
    return f"{summary['mean']:.4f}±{summary['half_width']:.4f}"


def _render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in body)) if body else len(header[i]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def format_table(report: dict) -> str:
    """The terminal table: one row per store/encoder, metric means ± 95% CI half-width."""
    rows = report["rows"]
    metrics = _metric_names(rows)
    header = ["name", "n", "grid"] + [f"{m.upper()} {v}" for v in VARIANTS for m in metrics]
    body = [[r["name"], str(r["num_images"]), f"{r['grid'][0]}x{r['grid'][1]}"]
            + [_fmt(r["metrics"][v][m]) if m in r["metrics"][v] else "n/a" for v in VARIANTS for m in metrics]
            for r in rows]
    gamma = report["config"]["gamma"]
    text = [f"Spatial-structure metrics (mean ± 95% CI; raw = patch tokens, snorm = spatial norm, gamma {gamma})",
            _render(header, body)]
    fid = report.get("fid")
    if fid:
        cheader = ["metric", "variant", "n", "pearson r", "p", "spearman rho", "p"]
        cbody = []
        for v in VARIANTS:
            for m in metrics:
                c = fid["correlation"][v][m]
                f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
                cbody.append([m.upper(), v, str(c["n"]), f(c["pearson_r"]), f(c["pearson_p"]),
                              f(c["spearman_r"]), f(c["spearman_p"])])
        text += ["", f"Correlation with FID ({fid['source']})", _render(cheader, cbody)]
        if fid["rows_without_fid"]:
            text.append(f"rows without a FID entry: {', '.join(fid['rows_without_fid'])}")
        if fid["unused_fid_entries"]:
            text.append(f"FID entries matching no store/encoder: {', '.join(fid['unused_fid_entries'])}")
        shared = {k: names for k, names in fid["points"].items() if len(names) > 1}
        for k, names in shared.items():
            text.append(f"FID entry {k} matches {len(names)} rows ({', '.join(names)}): averaged into one point")
    return "\n".join(text)


def sample_count_text(rows: Sequence[dict]) -> str:
    """How many images the metrics were computed on, as the figure's title states it."""
    counts = sorted({int(r["num_images"]) for r in rows})
    if not counts:
        return "no images"
    if len(counts) == 1:
        return f"{counts[0]} images per store"
    return f"{counts[0]} to {counts[-1]} images per store"


def plot_report(report: dict, path: Union[str, Path]) -> Path:
    """Write :func:`report_figure` as a PNG (atomically)."""
    fig = report_figure(report)
    path = Path(path)
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    return path


def report_figure(report: dict):
    """Per metric, the encoders side by side (raw and spatial-norm bars, 95% CI error bars); with a
    FID table, a second row of metric-vs-FID scatters (marker = variant, with a legend) titled with
    Pearson r / Spearman rho. The title states how many images each store contributed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["rows"]
    metrics = _metric_names(rows)
    fid = report.get("fid")
    nrow = 2 if fid else 1
    fig = Figure(figsize=(4.2 * len(metrics), 3.6 * nrow + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    width = 0.38
    colors = {"raw": "#4C72B0", "snorm": "#DD8452"}
    for col, m in enumerate(metrics):
        ax = fig.add_subplot(nrow, len(metrics), col + 1)
        for k, v in enumerate(VARIANTS):
            means = [_nan(r["metrics"][v].get(m, {}).get("mean")) for r in rows]
            errs = [_nan(r["metrics"][v].get(m, {}).get("half_width"), 0.0) for r in rows]
            ax.bar(x + (k - 0.5) * width, means, width, yerr=errs, capsize=3, color=colors[v],
                   label=VARIANT_TITLES[v])
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(m.upper())
        ax.axhline(0, color="black", linewidth=0.6)
        if col == 0:
            ax.legend(fontsize=8)
        if fid:
            ax2 = fig.add_subplot(nrow, len(metrics), len(metrics) + col + 1)
            for v, marker in zip(VARIANTS, ("o", "s")):
                pts = [(r["metrics"][v][m]["mean"], r["fid"], r["name"]) for r in rows
                       if "fid" in r and m in r["metrics"][v] and r["metrics"][v][m]["mean"] is not None]
                if not pts:
                    continue
                ax2.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colors[v],
                            label=VARIANT_TITLES[v])
                if v == "raw":
                    for px, py, name in pts:
                        ax2.annotate(name, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
            c = fid["correlation"]["raw"][m]
            r_txt = "n/a" if c["pearson_r"] is None else f"{c['pearson_r']:.2f}"
            s_txt = "n/a" if c["spearman_r"] is None else f"{c['spearman_r']:.2f}"
            ax2.set_title(f"{m.upper()} vs FID (raw): r={r_txt}, rho={s_txt}", fontsize=9)
            ax2.set_xlabel(m.upper())
            ax2.set_ylabel("FID")
            if col == 0:
                ax2.legend(fontsize=7, title="marker", title_fontsize=7)
    fig.suptitle(f"Spatial structure of encoder features ({sample_count_text(rows)})", fontsize=10)
    fig.tight_layout()
    return fig


def _nan(x: Optional[float], default: float = float("nan")) -> float:
    return default if x is None else float(x)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ----------------------------------------------------------------------------- entry point


def run_metrics(
    stores: Union[str, Sequence[str]],
    limit: int = 4096,
    out: str = "metrics",
    fid: Optional[Union[str, Sequence[str]]] = None,
    masks: Optional[str] = None,
    seed: int = 0,
    device: Optional[str] = None,
    gamma: float = 1.0,
    batch_size: int = 256,
    progress: bool = True,
    echo: bool = True,
) -> dict:
    """Spatial-structure metrics (LDS, CDS, RMSC, SRSS) of each store's encoder patch features.

    Samples ``limit`` images per store (fixed seed, so stores of one dataset share the images),
    computes the metrics per image on the raw tokens and after iREPA's spatial normalisation, and
    writes OUT/metrics.json (summaries and per-image values), OUT/metrics.png (encoders side by
    side) and OUT/metrics.txt (the table, also printed). Means come with a 95% normal-approximation
    confidence interval, mean +- 1.96*sd/sqrt(n). Definitions: ``pipeline.spatial_metrics``.

    Args:
        stores: one or more store directories (each needs encoder features).
        limit: images sampled per store; 0 or >= the store size takes all.
        out: output folder for metrics.json, metrics.png and metrics.txt.
        fid: optional encoder -> FID: a table (JSON {name: fid} or CSV/TSV "name,fid"), or
            irepa-eval result JSONs (``a.eval.json,b.eval.json`` or ``ENC=a.eval.json,...``, see
            ``read_fid_inputs``); adds the Pearson and Spearman correlation of each metric with FID
            over the encoders.
        masks: optional foreground masks for SRSS: a folder of PNGs named by sample key, a .npy
            [N, H, W] aligned on the sample index, or a .npz with "masks" and "keys".
        seed: seed of the image sample.
        device: torch device for the metrics (default: cuda when available, else cpu).
        gamma: mean-removal weight of the spatial normalisation (iREPA's gamma).
        batch_size: images read from the store per batch.
        progress: show a progress bar on stderr.
        echo: print the table to stdout.

    Returns:
        The report (the content of metrics.json) with "files": {json, png, table} added.
    """
    if isinstance(stores, (str, Path)):
        stores = [stores]
    stores = [str(s) for s in stores]
    if not stores:
        raise ValueError("name at least one store")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fid_table = read_fid_inputs(fid) if fid else None  # fail before the long part
    from irepa.stores import open_store

    readers = []
    for path in stores:  # refuse any unusable store before the long part
        reader = open_store(path)
        _refuse_featureless(reader, path)
        readers.append(reader)
    rows: list[dict] = []
    for path, reader in zip(stores, readers):
        rows.extend(_store_rows(reader, path, limit, seed, gamma, masks, dev, batch_size, progress))
    _name_rows(rows)
    report: dict[str, Any] = {
        "config": {
            "stores": stores, "limit": limit, "seed": seed, "gamma": gamma, "masks": masks,
            "near": DEFAULT_NEAR, "far": DEFAULT_FAR, "max_dist": DEFAULT_MAX_DIST,
            "variants": {"raw": "patch tokens as stored",
                         "snorm": f"(x - {gamma}*mean_T(x)) / (std_T(x) + 1e-6) per image"},
            "ci": "95% normal approximation: mean +- 1.96*sd/sqrt(n), sd with ddof=1, over finite per-image values",
        },
        "rows": rows,
    }
    if fid_table is not None:
        report["fid"] = {"source": str(fid), **fid_correlations(rows, fid_table)}
    report = _jsonable(report)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "metrics.json"
    atomic_write_bytes(json_path, (json.dumps(report, indent=1, allow_nan=False) + "\n").encode("utf-8"))
    png_path = plot_report(report, out_dir / "metrics.png")
    table = format_table(report)
    table_path = out_dir / "metrics.txt"
    atomic_write_bytes(table_path, (table + "\n").encode("utf-8"))
    if echo:
        print(table)
        print(f"\nwrote {json_path}, {png_path}, {table_path}")
    report["files"] = {"json": str(json_path), "png": str(png_path), "table": str(table_path)}
    return report
