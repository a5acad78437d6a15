"""The ADM evaluation suite's metric formulas on Inception features: FID/sFID, Inception Score,
k-NN precision and recall.

Definitions follow guided-diffusion's ``evaluations/evaluator.py`` (read, not copied):

* statistics: mean and ``np.cov(rowvar=False)`` (float64, ddof 1) of the features;
* Frechet distance: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with
  ``scipy.linalg.sqrtm`` of the product; when that is not finite, 1e-6 is added to both
  diagonals and it is recomputed; a complex result whose diagonal has an imaginary part above
  1e-3 is an error, else the real part is kept;
* Inception Score: softmax of the bias-free logits, split into consecutive chunks of 5000 images
  (so 10 splits for 50K samples, a shorter last chunk when N is not a multiple), per chunk
  ``exp(mean_i KL(p_i || mean p))``, then the mean over chunks;
* precision/recall (Kynkaanniemi et al., ADM's ``ManifoldEstimator``, k = 3): squared Euclidean
  distances ``max(|u|^2 - 2 u.v + |v|^2, 0)``; the radius of a point is the (k+1)-th smallest
  squared distance from it to its own set, itself included (so the k-th nearest other point;
  duplicates count as neighbours at distance 0; ties do not change the value); precision is the
  fraction of samples within (``<=``) some reference point's radius, recall the fraction of
  reference points within some sample's radius.

Known differences from the ADM code, all in numerics, none in definitions: distances here are
float64 (ADM computes them in float16 and falls back to float32 when not finite, so points within
~1e-3 relative of a radius can flip); the softmax and its logarithm are float64 (ADM: float32, where a
probability that underflows to 0 gives NaN); ADM's row/column batch sizes (10000) only bound memory
and do not change any value, so blocks here are sized to the memory at hand.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "IS_SPLIT_SIZE",
    "PR_NEIGHBOURS",
    "feature_statistics",
    "sqrtm_product",
    "frechet_distance",
    "inception_score",
    "pairwise_sq_distances",
    "manifold_radii",
    "precision_recall",
]

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
FID_EPS = 1e-6
_BLOCK_BYTES = 1 << 28  # one float64 distance block: 256 MiB

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_tensor(x: ArrayLike, device: Optional[Union[str, torch.device]], dtype=torch.float64) -> torch.Tensor:
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def feature_statistics(features: ArrayLike, device: Optional[Union[str, torch.device]] = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) float64 of features [N, D], as ``np.mean(axis=0)`` / ``np.cov(rowvar=False)``
    (centred, divided by N - 1), computed in float64 on ``device`` (default: the features')."""
    x = _as_tensor(features, device)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got {n}")
    mu = x.mean(dim=0)
    xc = x - mu
    sigma = (xc.T @ xc) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = FID_EPS) -> np.ndarray:
    """``scipy.linalg.sqrtm(sigma1 @ sigma2)`` the way ADM's FID takes it: when not finite, retry with
    ``eps`` on both diagonals; a complex result is accepted (real part) only when its diagonal's
    imaginary part is within 1e-3."""
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # ADM passes disp=False: no message
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular product; adding {eps} to the diagonal of both covariances", stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: matrix square root has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return covmean


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), ADM's formula (module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"FID: mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"FID: covariances {sigma1.shape} and {sigma2.shape} do not match means of length {mu1.shape[0]}")
    diff = mu1 - mu2
    covmean = sqrtm_product(sigma1, sigma2, eps)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: ArrayLike, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of bias-free logits [N, C]: consecutive splits of ``split_size`` images,
    per split exp(mean KL(p_i || mean_i p_i)), averaged over splits."""
    z = _as_tensor(logits, None)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"Inception Score needs logits [N, C] with N >= 1, got shape {tuple(z.shape)}")
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    scores = []
    for start in range(0, z.shape[0], split_size):
        lp, pp = logp[start:start + split_size], p[start:start + split_size]
        log_marginal = torch.log(pp.mean(dim=0, keepdim=True))
        kl = (pp * (lp - log_marginal)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores))


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(u), len(v)] as ADM writes them: max(|u|^2 - 2 u.v + |v|^2, 0)."""
    nu = (u * u).sum(dim=1, keepdim=True)
    nv = (v * v).sum(dim=1)[None, :]
    return torch.clamp(nu - 2.0 * (u @ v.T) + nv, min=0.0)


def _rows_per_block(cols: int) -> int:
    return max(1, _BLOCK_BYTES // (8 * max(1, cols)))


def manifold_radii(features: ArrayLike, k: int = PR_NEIGHBOURS,
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Radius [N] float64 of each point: the (k+1)-th smallest squared distance to its own set
    (itself included at 0), i.e. ADM's ``np.partition(..., k)[:, k]``."""
    x = _as_tensor(features, device)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall need more than k={k} feature vectors per set, got {n}")
    radii = torch.empty(n, dtype=torch.float64, device=x.device)
    step = _rows_per_block(n)
    for start in range(0, n, step):
        d = pairwise_sq_distances(x[start:start + step], x)
        radii[start:start + step] = d.kthvalue(k + 1, dim=1).values
    return radii


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` within (<=) the radius of at least one centre."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    step = _rows_per_block(centres.shape[0])
    for start in range(0, points.shape[0], step):
        d = pairwise_sq_distances(points[start:start + step], centres)
        inside[start:start + step] = (d <= radii[None, :]).any(dim=1)
    return float(inside.double().mean())


def precision_recall(ref_features: ArrayLike, sample_features: ArrayLike, k: int = PR_NEIGHBOURS,
                     device: Optional[Union[str, torch.device]] = None) -> tuple[float, float]:
    """ADM's improved precision and recall (k-NN manifolds, k = 3) of samples against a reference.

    precision = fraction of samples inside the reference manifold; recall = fraction of reference
    points inside the sample manifold. float64 distances on ``device``.
    """
    ref = _as_tensor(ref_features, device)
    smp = _as_tensor(sample_features, device if device is not None else ref.device)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"precision/recall: features must be [N, D] of one D, got {tuple(ref.shape)} and {tuple(smp.shape)}")
    ref_radii = manifold_radii(ref, k)
    smp_radii = manifold_radii(smp, k)
    precision = _coverage(smp, ref, ref_radii)
    recall = _coverage(ref, smp, smp_radii)
    return precision, recall
