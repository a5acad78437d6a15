"""Spatial-structure metrics of patch-token grids: LDS, CDS, RMSC, SRSS (iREPA, arXiv 2512.10794).

iREPA argues that what makes an encoder a good REPA target is the spatial structure of its patch
tokens (how token similarity falls off with distance on the grid), not its global accuracy. Its
appendix B defines four self-similarity metrics on the cosine kernel K(t, t') between tokens t, t'
of one image, with d(t, t') the Manhattan distance on the h x w token grid:

- **LDS** (local vs. distant similarity): mean K over 4-neighbour pairs (d = 1) minus mean K over
  all pairs with d >= 6. Both means are pooled over pairs (not averaged per distance first).
- **CDS** (correlation decay slope): the correlogram g(delta) = mean K over pairs at d = delta is
  computed for delta = 1..8 (each distance one point, equally weighted), a least-squares line
  g ~ a + b*delta is fitted, and CDS = -b.
- **RMSC** (RMS spatial contrast): tokens are first L2-normalised, then centred on their token
  mean, RMSC = sqrt(mean_t ||x_hat_t - mean_t' x_hat_t'||^2). (Normalise, then centre, as the
  paper writes it; equals sqrt(1 - ||mean_t x_hat_t||^2) when no token is zero.)
- **SRSS** (semantic-region self-similarity), only with a foreground mask: for every anchor token
  in the foreground, mean K to foreground tokens at 1 <= d <= 1 minus mean K to background tokens
  at d >= 6; the image's score is the mean over anchors that have both kinds of partner (NaN when
  none do, e.g. an empty or full mask).

Defaults: near = 1 (4-neighbours), far = 6 and CDS over distances 1..8 are exactly what the
official iREPA metrics code (``metrics/spatial_metrics.py`` of the release) computes, so the
numbers are comparable with its figures. The paper's text writes LDS with an H/2 radius; that
form is not what the released code (nor its figures) uses, so it is not offered as a preset:
``near`` / ``far`` stay parameters for other experiments.
- The paper's SRSS samples anchor/positive/negative triplets inside a SAM2 object mask; here the
  expectation is computed exactly over all anchors and partners of a user-given mask.
- Distances that do not exist on a small grid are skipped: CDS fits the distances 1..8 that the
  grid has (NaN with fewer than two); LDS is NaN when no pair reaches d >= far (grids with
  h + w - 2 < far, e.g. 3x3). A 16x16 grid (DINOv2 at 224 px, /16 encoders at 256 px) has all.

Spatial normalisation (``spatial_norm=True``) is iREPA's per-image layer applied before the
metrics: x <- (x - gamma * mean_T(x)) / (std_T(x) + 1e-6), std with Bessel's correction as
``torch.std`` (the released training code's convention).

Implementation: tokens are L2-normalised once, the cosine matrix [b, T, T] comes from one ``bmm``
per chunk of images, and the per-distance sums from one matmul against a one-hot table of the
(clamped) Manhattan distance, built once per grid and device. Chunks of the batch bound the
[b, T, T] memory (``chunk_bytes``). Work is done in float32 (float64 input stays float64).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "METRICS",
    "infer_grid",
    "manhattan_distance",
    "spatial_normalize",
    "correlogram",
    "spatial_metrics",
]

METRICS = ("lds", "cds", "rmsc", "srss")
DEFAULT_NEAR = 1
DEFAULT_FAR = 6
DEFAULT_MAX_DIST = 8
DEFAULT_CHUNK_BYTES = 256 * 2**20

GridLike = Optional[Union[int, Sequence[int]]]


def infer_grid(num_tokens: int, grid: GridLike = None) -> tuple[int, int]:
    """Return (h, w) for ``num_tokens`` tokens: ``grid`` if given (checked), else a square grid."""
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"cannot infer the token grid: {num_tokens} tokens is not a square number; "
                f"pass grid=(h, w) with h * w == {num_tokens}"
            )
        return side, side
    if isinstance(grid, int):
        h, w = grid, grid
    else:
        if len(grid) != 2:
            raise ValueError(f"grid must be (h, w), got {tuple(grid)!r}")
        h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1 or h * w != num_tokens:
        raise ValueError(f"grid {h}x{w} does not match {num_tokens} tokens (h * w must equal T)")
    return h, w


_DIST_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def manhattan_distance(h: int, w: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Manhattan distance between the tokens of an h x w grid (row-major), int64 [T, T], cached."""
    key = (h, w, str(torch.device(device)))
    dist = _DIST_CACHE.get(key)
    if dist is None:
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([ii.reshape(-1), jj.reshape(-1)], dim=1)
        dist = (coords[:, None, :] - coords[None, :, :]).abs().sum(-1).to(device)
        _DIST_CACHE[key] = dist
    return dist


_BIN_CACHE: dict[tuple, torch.Tensor] = {}


def _distance_bins(h: int, w: int, top: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One-hot [T*T, top+1] of min(d, top): column k sums pairs at d == k (k < top) or d >= top."""
    key = (h, w, top, str(device), dtype)
    onehot = _BIN_CACHE.get(key)
    if onehot is None:
        d = manhattan_distance(h, w, "cpu").reshape(-1).clamp(max=top)
        onehot = F.one_hot(d, top + 1).to(device=device, dtype=dtype)
        _BIN_CACHE[key] = onehot
    return onehot


def spatial_normalize(x: torch.Tensor, gamma: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalisation per image over tokens: (x - gamma*mean_T) / (std_T + eps).

    ``x`` is [B, T, D]; std is over tokens with Bessel's correction (``torch.std`` default).
    """
    _check_tokens(x)
    x = _compute_dtype(x)
    x = x - gamma * x.mean(dim=1, keepdim=True)
    return x / (x.std(dim=1, keepdim=True) + eps)


def _check_tokens(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(
            f"expected patch tokens as a tensor [B, T, D], got "
            f"{type(x).__name__} with shape {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[1] < 2 or x.shape[2] < 1:
        raise ValueError(f"expected at least 2 tokens and 1 channel, got shape {tuple(x.shape)}")


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise tokens; a zero token stays zero (cosine 0 with every token)."""
    return F.normalize(x, dim=-1, eps=1e-12)


def _chunk_size(batch: int, tokens: int, chunk_bytes: int, per_matrix: int) -> int:
    per_image = per_matrix * tokens * tokens * 8
    return max(1, min(batch, chunk_bytes // max(per_image, 1)))


def correlogram(tokens: torch.Tensor, grid: GridLike = None, max_dist: int = DEFAULT_MAX_DIST,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Mean cosine over token pairs at Manhattan distance 0..max_dist, [B, max_dist + 1].

    Distances that the grid lacks are NaN. Column 0 is the self-similarity (1 for nonzero tokens).
    """
    _check_tokens(tokens)
    h, w = infer_grid(tokens.shape[1], grid)
    x = _compute_dtype(tokens)
    top = max_dist + 1
    onehot = _distance_bins(h, w, top, x.device, x.dtype)
    counts = onehot.sum(0)
    out = []
    step = _chunk_size(x.shape[0], x.shape[1], chunk_bytes, 1)
    for start in range(0, x.shape[0], step):
        u = _unit(x[start:start + step])
        gram = torch.bmm(u, u.transpose(1, 2))
        out.append(gram.reshape(gram.shape[0], -1) @ onehot)
    sums = torch.cat(out)[:, :top]
    return sums / counts[:top].where(counts[:top] > 0, torch.full_like(counts[:top], float("nan")))


def spatial_metrics(
    tokens: torch.Tensor,
    grid: GridLike = None,
    spatial_norm: bool = False,
    gamma: float = 1.0,
    masks: Optional[torch.Tensor] = None,
    near: int = DEFAULT_NEAR,
    far: int = DEFAULT_FAR,
    max_dist: int = DEFAULT_MAX_DIST,
    device: Optional[Union[str, torch.device]] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """LDS, CDS, RMSC (and SRSS when ``masks`` is given) per image of ``tokens`` [B, T, D].

    Args:
        tokens: patch tokens [B, T, D], row-major over an h x w grid (any float dtype).
        grid: (h, w) or a side length; inferred as a square when None.
        spatial_norm: apply iREPA's spatial normalisation (``spatial_normalize``) first.
        gamma: the mean-removal weight of the spatial normalisation.
        masks: foreground masks, bool or 0/1, [B, T] or [B, h, w]; adds "srss".
        near: LDS / SRSS "near" pairs are 1 <= d <= near (1: 4-neighbours).
        far: LDS / SRSS "far" pairs are d >= far.
        max_dist: CDS fits the correlogram at distances 1..max_dist.
        device: where to compute (default: the tokens' device); results come back there too.
        chunk_bytes: memory bound for the [b, T, T] similarity matrices of one chunk.

    Returns:
        {"lds", "cds", "rmsc"[, "srss"]: Tensor [B]} on the compute device; NaN where a metric is
        undefined for the grid or mask (see the module docstring).
    """
    _check_tokens(tokens)
    if not (1 <= near < far):
        raise ValueError(f"need 1 <= near < far, got near={near}, far={far}")
    if max_dist < 1:
        raise ValueError(f"max_dist must be >= 1, got {max_dist}")
    B, T, _ = tokens.shape
    h, w = infer_grid(T, grid)
    x = tokens if device is None else tokens.to(device)
    x = spatial_normalize(x, gamma) if spatial_norm else _compute_dtype(x)
    dev, dtype = x.device, x.dtype

    fg = None
    if masks is not None:
        fg = torch.as_tensor(masks, device=dev)
        if fg.ndim == 3 and tuple(fg.shape[1:]) == (h, w):
            fg = fg.reshape(fg.shape[0], T)
        if fg.ndim != 2 or tuple(fg.shape) != (B, T):
            raise ValueError(
                f"masks must be [B, T] = [{B}, {T}] or [B, h, w] = [{B}, {h}, {w}], "
                f"got {tuple(fg.shape)}"
            )
        fg = fg.to(torch.bool).to(dtype)

    # Bins of min(d, top): 0 (self), 1..top-1 exactly, top = "d >= top". top > max(max_dist, far).
    top = max(max_dist, far) + 1
    onehot = _distance_bins(h, w, top, dev, dtype)
    counts = onehot.sum(0)  # ordered pairs per bin
    near_cnt = counts[1:near + 1].sum()
    far_cnt = counts[far:].sum()
    deltas = [d for d in range(1, max_dist + 1) if counts[d] > 0]
    nan = torch.tensor(float("nan"), device=dev, dtype=dtype)
    if fg is not None:
        dist = manhattan_distance(h, w, dev)
        pos_d = ((dist >= 1) & (dist <= near)).to(dtype)
        neg_d = (dist >= far).to(dtype)

    out: dict[str, list[torch.Tensor]] = {k: [] for k in METRICS}
    step = _chunk_size(B, T, chunk_bytes, 2 if fg is None else 4)
    for start in range(0, B, step):
        u = _unit(x[start:start + step])
        b = u.shape[0]
        gram = torch.bmm(u, u.transpose(1, 2))  # [b, T, T] cosines
        sums = gram.reshape(b, T * T) @ onehot  # [b, top + 1]

        near_mean = sums[:, 1:near + 1].sum(1) / near_cnt
        far_mean = sums[:, far:].sum(1) / far_cnt if far_cnt > 0 else nan.expand(b)
        out["lds"].append(near_mean - far_mean)

        if len(deltas) >= 2:
            dvec = torch.tensor(deltas, device=dev, dtype=dtype)
            g = sums[:, deltas] / counts[deltas]
            dc = dvec - dvec.mean()
            slope = ((g - g.mean(1, keepdim=True)) * dc).sum(1) / (dc * dc).sum()
            out["cds"].append(-slope)
        else:
            out["cds"].append(nan.expand(b))

        centred = u - u.mean(dim=1, keepdim=True)
        out["rmsc"].append(centred.square().sum(-1).mean(1).sqrt())

        if fg is not None:
            f = fg[start:start + step]
            bg = 1.0 - f
            pos_sum = torch.bmm(gram * pos_d, f.unsqueeze(-1)).squeeze(-1)  # [b, T]
            neg_sum = torch.bmm(gram * neg_d, bg.unsqueeze(-1)).squeeze(-1)
            pos_cnt = f @ pos_d  # pos_d, neg_d are symmetric
            neg_cnt = bg @ neg_d
            valid = (f > 0) & (pos_cnt > 0) & (neg_cnt > 0)
            delta = pos_sum / pos_cnt.clamp(min=1) - neg_sum / neg_cnt.clamp(min=1)
            n_valid = valid.sum(1)
            srss = (delta * valid).sum(1) / n_valid.clamp(min=1)
            out["srss"].append(torch.where(n_valid > 0, srss, nan))

    return {k: torch.cat(v) for k, v in out.items() if v}
