"""The ADM evaluation suite's Inception-v3, from torch-fidelity, with the three outputs the metrics use.

The ADM suite (guided-diffusion ``evaluations/evaluator.py``) runs TensorFlow's 2015-12-05 Inception
graph (``classify_image_graph_def.pb``) on uint8 images as float [0, 255], which resizes them to
299x299 (TF1 bilinear) and reads three tensors:

* ``pool_3:0`` [N, 2048]: FID, precision/recall;
* ``mixed_6/conv:0`` [N, 17, 17, 192], of which the first 7 channels, flattened in NHWC order
  (index = (row * 17 + col) * 7 + channel): sFID, 2023 dims;
* ``softmax/logits/MatMul``: pool_3 times the logits weight, *without* the bias, softmaxed for the
  Inception Score (1008 classes).

torch-fidelity's ``inception-v3-compat`` (``FeatureExtractorInceptionV3``) is a port of that graph
(TF1-exact bilinear resize, TF padding/pooling quirks, weights converted from the same graph). It
exposes ``2048`` (= pool_3) and ``logits_unbiased`` (= the MatMul) but not the spatial tensor
(torch-fidelity issue #40), so a forward hook reads it: the graph's ``mixed_6`` is the port's
``Mixed_6d`` (torch-fidelity's weight-conversion table maps ``mixed_6/conv/*`` to
``Mixed_6d.branch1x1.*``) and ``mixed_6/conv:0`` is that branch's ReLU output, i.e. the output of
the ``Mixed_6d.branch1x1`` module.

Weights: ``--inception-weights PATH`` (a torch-fidelity state dict, loaded with
``weights_only=True``), else ``$IREPA_INCEPTION``, else torch-fidelity's own download location in the
torch hub cache. Nothing is downloaded here: when none exists, :class:`InceptionWeightsMissing`
names the file to fetch and the flag. ``"random"`` builds a seeded random-initialised network for
tests (its numbers mean nothing).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

__all__ = [
    "INCEPTION_URL",
    "INCEPTION_FILENAME",
    "INCEPTION_SHA256_PREFIX",
    "POOL_DIM",
    "SPATIAL_DIM",
    "LOGITS_DIM",
    "InceptionWeightsMissing",
    "InceptionFeatures",
    "resolve_inception_weights",
    "load_inception",
    "cached_inception",
    "exact_fp32",
]

#: torch-fidelity's converted weights of TF's inception-2015-12-05 graph (the graph ADM uses).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[1]
#: torch.hub's file-name convention: the hex after the last '-' is a prefix of the file's sha256.
INCEPTION_SHA256_PREFIX = "6726825d"
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023
LOGITS_DIM = 1008
NETWORK_NAME = "inception-v3-compat"
RANDOM = "random"


class InceptionWeightsMissing(FileNotFoundError):
    """No Inception weights on this machine (and nothing is downloaded). One line, says what to do."""


def _hub_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def resolve_inception_weights(weights: Optional[str] = None) -> str:
    """The weights file to load: ``weights``, else ``$IREPA_INCEPTION``, else torch-fidelity's file in
    the torch hub cache; ``"random"`` passes through. Raises :class:`InceptionWeightsMissing`."""
    if weights is not None and str(weights) == RANDOM:
        return RANDOM
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing(f"--inception-weights {p}: no such file (fetch {INCEPTION_URL})")
        return str(p)
    env = os.environ.get("IREPA_INCEPTION")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing(f"IREPA_INCEPTION={p}: no such file (fetch {INCEPTION_URL})")
        return str(p)
    cached = _hub_cache_file()
    if cached.is_file():
        return str(cached)
    raise InceptionWeightsMissing(
        f"Inception weights not found: fetch {INCEPTION_URL} and pass --inception-weights PATH "
        f"(or put it at {cached})"
    )


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class _NoLoad:
    """Sentinel state dict: tells the extractor subclass to skip its constructor's weight loading."""


def _extractor_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Extractor(FeatureExtractorInceptionV3):
        # The constructor always loads weights (a download when no path is given, else an unrestricted
        # torch.load). We build it with the sentinel and load the state dict ourselves afterwards.
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: D401
            if state_dict is _NoLoad:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return _Extractor


def _build_extractor() -> nn.Module:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: _NoLoad  # no download: weights are loaded below
    try:
        return _extractor_class()(NETWORK_NAME, ["2048", "logits_unbiased"])
    finally:
        fe.load_state_dict_from_url = original


def _random_init(net: nn.Module, seed: int) -> None:
    """Seeded He-normal convs, unit BN, small fc: features that vary with the image (the default
    init makes them vanish through the 90-odd layers). For tests only."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05, generator=g)
            nn.init.normal_(m.bias, std=0.05, generator=g)


class InceptionFeatures(nn.Module):
    """uint8 images [N, 3, H, W] (any H, W) -> {"pool": [N, 2048], "spatial": [N, 2023],
    "logits": [N, 1008]} float32, as the ADM suite's pool_3, mixed_6/conv[..., :7] and
    softmax/logits/MatMul.

    Attributes: ``weights`` (the file, or "random"), ``weights_sha256`` (or "random-seed<k>"),
    ``network`` (a description with the torch-fidelity version).
    """

    def __init__(self, extractor: nn.Module, weights: str, weights_sha256: str):
        super().__init__()
        self.extractor = extractor
        self.weights = weights
        self.weights_sha256 = weights_sha256
        import torch_fidelity

        self.network = f"{NETWORK_NAME} (torch-fidelity {torch_fidelity.__version__})"
        self._spatial: Optional[torch.Tensor] = None
        extractor.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def _grab_spatial(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        # mixed_6/conv:0 is NHWC in the graph; ADM keeps channels [:7] and flattens.
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception input must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self._spatial = None
        pool, logits = self.extractor(images)
        spatial, self._spatial = self._spatial, None
        if spatial is None or spatial.shape[1] != SPATIAL_DIM:
            raise RuntimeError(f"mixed_6/conv hook returned {None if spatial is None else tuple(spatial.shape)}")
        return {"pool": pool.float(), "spatial": spatial, "logits": logits.float()}

    def describe(self) -> dict:
        return {"name": self.network, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "outputs": {"pool": "pool_3 [2048]", "spatial": "mixed_6/conv[..., :7] NHWC-flattened [2023]",
                            "logits": "softmax/logits/MatMul (no bias) [1008]"}}


def load_inception(weights: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                   seed: int = 0) -> InceptionFeatures:
    """Build the ADM Inception (torch-fidelity ``inception-v3-compat``) on ``device``, eval mode, fp32.

    ``weights``: a state-dict file, None (``$IREPA_INCEPTION``, then the torch hub cache), or
    "random" (seeded random init, tests only). Raises :class:`InceptionWeightsMissing` when no
    file is found.
    """
    path = resolve_inception_weights(weights)
    net = _build_extractor()
    if path == RANDOM:
        _random_init(net, seed)
        digest = f"random-seed{seed}"
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise ValueError(f"--inception-weights {path}: not a loadable state dict ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise ValueError(f"--inception-weights {path}: not torch-fidelity Inception-v3 weights "
                             f"({str(exc).splitlines()[0]})") from None
        digest = _sha256(path)
        if not digest.startswith(INCEPTION_SHA256_PREFIX):
            warnings.warn(f"{path}: sha256 {digest[:12]}... is not torch-fidelity's {INCEPTION_FILENAME}; "
                          "numbers will not be comparable with the ADM suite", stacklevel=2)
    net.float().requires_grad_(False).eval()
    return InceptionFeatures(net, path, digest).to(device).eval()


@functools.lru_cache(maxsize=2)
def cached_inception(weights: Optional[str], device: str, seed: int = 0) -> InceptionFeatures:
    """:func:`load_inception`, kept for reuse (training-time FID calls it every few thousand steps)."""
    return load_inception(weights, device, seed)


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Full fp32 and deterministic kernels while features are computed: TF32 off (PyTorch enables
    it for cuDNN convolutions by default, which would change the features), cuDNN deterministic,
    no autotuning. Restores the previous settings."""
    b = torch.backends
    saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark)
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = False, False
    b.cudnn.deterministic, b.cudnn.benchmark = True, False
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark = saved
