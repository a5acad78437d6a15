"""Parts of REPA-E (end-to-end VAE + SiT) that are not the step itself.

REPA-E ("REPA-E: Unlocking VAE for End-to-End Tuning with Latent Diffusion Transformers", Leng et
al. 2025; release ``End2End-Diffusion/REPA-E``) trains the VAE with L1 + LPIPS + KL + a hinge GAN
and the REPA alignment loss back-propagated through a frozen SiT. Where each part comes from:

* **VAE**: diffusers ``AutoencoderKL`` (loaded with :func:`irepa.pipeline.vae.load_vae`, trainable).
* **LPIPS**: the ``lpips`` package (optional extra ``repae``), VGG trunk, its shipped v0.1 linear
  layers. The VGG16 ImageNet trunk is read from a local file (:func:`build_lpips`); nothing is
  downloaded. The release uses the same network (taming-transformers' copy of LPIPS).
* **Discriminator**: :class:`PatchDiscriminator`, the pix2pix / taming ``NLayerDiscriminator``
  written small here (same layers, init and parameter names ``main.*`` as the release's).
* **Batch norm**: :class:`SyncableBatchNorm2d`, a ``BatchNorm2d`` whose training-mode statistics
  can span every DDP rank. ``torch.nn.SyncBatchNorm`` refuses CPU tensors (gloo), so it cannot
  serve the project's CPU multi-process runs; this one all-reduces the per-channel sums (and,
  in backward, their gradients) with ``torch.distributed.all_reduce`` on any backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "REPAE_EXTRA_HINT",
    "require_lpips",
    "SyncableBatchNorm2d",
    "set_bn_sync",
    "PatchDiscriminator",
    "load_discriminator",
    "hinge_d_loss",
    "build_lpips",
    "lpips_trunk_path",
    "default_vgg16_path",
    "sit_hidden_at_depth",
    "frozen",
    "decode_to_uint8",
]

REPAE_EXTRA_HINT = "pip install 'irepa[repae]'"


class MissingExtra(ImportError, ValueError):
    """An optional package a flag needs (a one-line user error in the CLIs)."""


def require_lpips():
    """Import ``lpips`` or raise a one-line :class:`MissingExtra` naming the optional extra."""
    if importlib.util.find_spec("lpips") is None:
        raise MissingExtra("--objective repae needs the optional extra 'repae' (the lpips package): "
                           f"{REPAE_EXTRA_HINT}")
    import lpips

    return lpips


# ----------------------------------------------------------------------------- batch norm


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the incoming gradients (every rank's
    loss depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.clone()
        dist.all_reduce(g)
        return g


class SyncableBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` (same buffers, same state-dict keys) with optional cross-rank statistics.

    Training mode computes the batch statistics from per-channel sums of ``x`` and ``x**2``
    accumulated in float64; with ``sync=True`` under an initialised process group of more than one
    rank those sums (and the element count) are all-reduced first, differentiably, so N ranks
    with B/N samples each normalise exactly as one rank with B samples (up to float64 rounding of
    the sums). The running statistics follow torch's rule (momentum, unbiased variance). Eval
    mode is plain ``BatchNorm2d`` on the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 sync: bool = False):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        self.sync = bool(sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        C = x.shape[1]
        xf = x.float()
        s1 = xf.sum(dim=(0, 2, 3), dtype=torch.float64)
        s2 = (xf * xf).sum(dim=(0, 2, 3), dtype=torch.float64)
        n = torch.full((1,), float(x.numel() // C), dtype=torch.float64, device=x.device)
        stats = torch.cat([s1, s2, n])
        if self.sync and _dist_world() > 1:
            stats = _AllReduceSum.apply(stats)
        s1, s2, count = stats[:C], stats[C:2 * C], stats[2 * C]
        mean = s1 / count
        var = (s2 / count - mean * mean).clamp_min(0.0)
        with torch.no_grad():  # tensor ops only: no host sync on GPU
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as torch does
                m = 1.0 / self.num_batches_tracked.to(torch.float64)
            else:
                m = torch.tensor(float(self.momentum), dtype=torch.float64, device=x.device)
            unbiased = var.detach() * (count / (count - 1.0).clamp_min(1.0))
            self.running_mean.copy_(((1 - m) * self.running_mean.double() + m * mean.detach()).to(self.running_mean.dtype))
            self.running_var.copy_(((1 - m) * self.running_var.double() + m * unbiased).to(self.running_var.dtype))
        invstd = torch.rsqrt(var + self.eps).to(xf.dtype)
        y = (xf - mean.to(xf.dtype).view(1, C, 1, 1)) * invstd.view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return y.to(x.dtype)


def set_bn_sync(module: nn.Module, sync: bool) -> int:
    """Switch cross-rank statistics on/off for every :class:`SyncableBatchNorm2d` in ``module``;
    returns how many there are."""
    n = 0
    for m in module.modules():
        if isinstance(m, SyncableBatchNorm2d):
            m.sync = bool(sync)
            n += 1
    return n


# ----------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix ``NLayerDiscriminator``, as taming / REPA-E use it).

    Conv 4x4/2 + LeakyReLU(0.2), then ``layers - 1`` blocks of Conv 4x4/2 (no bias) + BatchNorm +
    LeakyReLU doubling the width up to 8x, one more such block with stride 1, and a 4x4/1 conv to
    one logit per patch. Conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02) and biases 0
    (taming's ``weights_init``). Parameter names ``main.N.*`` equal the release's, so its
    discriminator checkpoints load. ``steps`` (a buffer, checkpointed) counts the discriminator
    phase's micro-batches; the REPA-E objective derives the GAN schedule's step from it.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1 or channels < 1:
            raise ValueError(f"discriminator needs layers >= 1 and channels >= 1; got {layers}, {channels}")
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride=2, padding=1, bias=False),
                    SyncableBatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        prev, mult = mult, min(2 ** layers, 8)
        seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride=1, padding=1, bias=False),
                SyncableBatchNorm2d(channels * mult), nn.LeakyReLU(0.2),
                nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*seq)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def load_discriminator(disc: PatchDiscriminator, path: str | os.PathLike) -> None:
    """Load discriminator weights (``main.*`` keys; a plain state dict or a checkpoint holding
    ``"discriminator"``, as the release's files are), with ``weights_only=True``; every ``main.*``
    key must be there and fit."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--disc-weights {p}: no such file")
    sd = _load_state(p)
    if isinstance(sd.get("discriminator"), dict):
        sd = sd["discriminator"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = disc.state_dict()
    wanted = {k for k in own if k.startswith("main.")}
    missing = sorted(wanted - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [k for k in wanted & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"--disc-weights {p} does not fit a PatchGAN with these --disc-layers / --disc-channels: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {shapes[:4]}")
    disc.load_state_dict({k: v for k, v in sd.items() if k in wanted}, strict=False)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


# ----------------------------------------------------------------------------- LPIPS

#: torchvision's file name for the ImageNet VGG16 weights (what ``vgg16(weights=...)`` caches)
VGG16_FILE = "vgg16-397923af.pth"


def default_vgg16_path() -> Path:
    """Where torchvision caches the ImageNet VGG16 weights: ``<torch hub dir>/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _load_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"LPIPS weights {path}: expected a state dict, got {type(obj).__name__}")
    return obj


def lpips_trunk_path(weights: str | None, net: str = "vgg") -> Path:
    """The local file :func:`build_lpips` reads the trunk from (error naming what to do if none)."""
    if net not in ("vgg", "alex", "squeeze"):
        raise ValueError(f"LPIPS net must be vgg, alex or squeeze; got {net!r}")
    if weights is None:
        if net != "vgg":
            raise ValueError(f"LPIPS net {net!r} needs --lpips-weights PATH (a torchvision {net} state dict)")
        path = default_vgg16_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS needs the ImageNet VGG16 weights offline and {path} does not exist: copy torchvision's "
                f"{VGG16_FILE} there or pass --lpips-weights PATH ('random' only for tests)")
        return path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--lpips-weights {path}: no such file")
    return path


def build_lpips(weights: str | None = None, net: str = "vgg") -> nn.Module:
    """LPIPS from the ``lpips`` package, offline: frozen, eval mode.

    The linear calibration layers are the package's own v0.1 files. The trunk (``net``: vgg as the
    release, or alex / squeeze) comes from ``weights``:

    * a torchvision state dict of that network (keys ``features.N.*``; for vgg torchvision's
      ``vgg16-397923af.pth``) or a full LPIPS state dict (keys ``net.sliceK.N.*``, ``lin*``),
      ``.pth`` / ``.pt`` / ``.safetensors``;
    * None: torchvision's cache file for vgg (:func:`default_vgg16_path`), which must exist;
    * ``"random"``: a randomly initialised trunk (tests only).
    """
    lpips = require_lpips()
    path = lpips_trunk_path(weights, net) if weights != "random" else None
    with warnings.catch_warnings():  # torchvision's deprecation notice for lpips' `pretrained=`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, pnet_tune=False, verbose=False)
    if weights != "random":
        sd = _load_state(path)
        trunk = model.net.state_dict()
        if any(k.startswith("net.") for k in sd):
            wanted = {f"net.{k}" for k in trunk}
            missing = sorted(wanted - set(sd))
            if missing:
                raise ValueError(f"LPIPS weights {path}: missing trunk keys {missing[:4]}...")
            model.load_state_dict({k: v for k, v in sd.items() if k in model.state_dict()}, strict=False)
        else:
            mapped = {}
            for k in trunk:  # sliceK.N.weight <- features.N.weight
                src = "features." + k.split(".", 1)[1]
                if src not in sd:
                    raise ValueError(f"LPIPS weights {path}: no {src!r} (expected a torchvision {net} state "
                                     "dict with features.N.* keys, or a full LPIPS state dict)")
                mapped[k] = sd[src]
            model.net.load_state_dict(mapped, strict=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- SiT and VAE helpers


def sit_hidden_at_depth(sit: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                        force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens after block ``sit.encoder_depth`` of :class:`irepa.trainer.models.SiT`, without
    running the later blocks (REPA-E's ``align_only`` shortcut for the VAE step); equal to the
    ``h`` that ``sit(x, t, y)`` returns."""
    tokens = sit.x_embedder(x) + sit.pos_embed.to(x.dtype)
    c = sit.t_embedder(t.reshape(-1)) + sit.y_embedder(y, sit.training, force_drop_ids)
    for block in sit.blocks[: sit.encoder_depth]:
        tokens = block(tokens, c)
    return tokens


@contextlib.contextmanager
def frozen(module: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Within the block, ``module``'s parameters do not require grad (so a graph built here never
    reaches them) and, with ``eval_mode``, it is in eval mode; both are restored afterwards."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    was = module.training
    for p in params:
        p.requires_grad_(False)
    if eval_mode:
        module.eval()
    try:
        yield module
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        module.train(was)


@torch.no_grad()
def decode_to_uint8(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> uint8 images [B, 3, H, W] through a diffusers ``AutoencoderKL`` in eval
    mode and its own dtype (the mode is restored), as ``VaeEncoder.decode`` writes them
    (``clamp(255 * (x + 1) / 2)``, truncated)."""
    p = next(vae.parameters())
    was = vae.training
    vae.eval()
    try:
        with torch.autocast(p.device.type, enabled=False):
            x = vae.decode(z.to(p.device, p.dtype)).sample.float()
    finally:
        vae.train(was)
    return torch.clamp(255.0 * (x + 1.0) / 2.0, 0, 255).to(torch.uint8)
