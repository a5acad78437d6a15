"""The VAE used for latents: diffusers ``AutoencoderKL`` (SD-VAE) behind a small wrapper.

``load_vae(name_or_path)`` accepts

* a hub id (``stabilityai/sd-vae-ft-ema`` as in REPA, ``stabilityai/sd-vae-ft-mse`` as in
  iREPA) or a short alias (``sd-vae-ft-ema``/``ema``, ``sd-vae-ft-mse``/``mse``), loaded with
  ``AutoencoderKL.from_pretrained`` (hub cache / network, whatever diffusers can reach);
* a local folder with ``config.json`` and weights (a ``save_pretrained`` output);
* ``"tiny"`` (or ``"tiny:<seed>"``): a tiny randomly initialised ``AutoencoderKL`` with the
  SD-VAE interface (4 latent channels, downsampling factor 8, scaling factor 0.18215),
  deterministic for a seed; for tests and the offline demo.

``VaeEncoder.encode`` returns the posterior mean and std (``exp(0.5 * logvar)``) of
``latent_dist``, unscaled, as REPA's and EDM2's preprocessing keep them; the trainer draws
``z = mean + std * eps`` and applies the scaling itself.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .defaults import DEFAULT_VAE, SD_VAE_SCALE

__all__ = ["VAE_ALIASES", "TINY_VAE_CONFIG", "VaeEncoder", "load_vae", "state_dict_sha256"]

VAE_ALIASES = {
    "sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema",
    "ema": "stabilityai/sd-vae-ft-ema",
    "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse",
    "mse": "stabilityai/sd-vae-ft-mse",
}

# Same block structure as SD-VAE (4 levels -> factor 8, 4 latent channels), tiny widths.
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=256,
    scaling_factor=SD_VAE_SCALE,
)


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict: sorted names, dtype, shape and raw tensor bytes.

    Independent of device and of the order parameters were registered in; equal for two
    modules exactly when their weights (and persistent buffers) are bit-identical.
    """
    h = hashlib.sha256()
    sd = module.state_dict()
    for name in sorted(sd):
        t = sd[name].detach()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class VaeEncoder(nn.Module):
    """Wraps a diffusers ``AutoencoderKL``.

    Attributes: ``latent_channels`` (C), ``downsample`` (8 for SD-VAE), ``scaling_factor``
    and ``shift_factor`` (from the VAE config; 0.18215 and 0.0 for SD-VAE), ``id`` (what
    ``load_vae`` was given, normalised: hub id, absolute folder path, or "tiny[:seed]").
    """

    def __init__(self, vae: nn.Module, vae_id: str):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.id = vae_id
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        sf = getattr(cfg, "scaling_factor", None)
        self.scaling_factor = float(sf) if sf is not None else 1.0
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self._sha: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, 3, H, W] -> (mean, std), float32 [B, C, H/8, W/8] each.

        Pixels map to [-1, 1] as ``x / 127.5 - 1``; mean and std are the diagonal Gaussian
        posterior's (std = exp(0.5 * logvar), logvar clamped to [-30, 20] by diffusers).
        Runs in the VAE's own dtype (fp32 by default) even inside an autocast region, as REPA's
        preprocessing does: bf16 would perturb the mean by about as much as the posterior std.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"VAE {self.id}: expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"VAE {self.id}: image size {h}x{w} is not divisible by {self.downsample}")
        x = images.to(self.device, torch.float32) / 127.5 - 1.0
        with torch.autocast(self.device.type, enabled=False):
            dist = self.vae.encode(x.to(self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor, to_uint8: bool = True) -> torch.Tensor:
        """Unscaled latents [B, C, h, w] (undo ``(z - shift) * scale`` first) -> images.

        Returns uint8 [B, 3, 8h, 8w] as REPA's generate.py writes samples for FID
        (``clamp(255 * (x + 1) / 2, 0, 255)``, truncated) or, with ``to_uint8=False``, float32
        in about [-1, 1].
        """
        with torch.autocast(self.device.type, enabled=False):
            x = self.vae.decode(z.to(self.device, self.dtype)).sample.float()
        if not to_uint8:
            return x
        return torch.clamp(255.0 * (x + 1.0) / 2.0, 0, 255).to(torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(images)

    def weights_sha256(self) -> str:
        """Stable hash of the VAE weights (see ``state_dict_sha256``); cached."""
        if self._sha is None:
            self._sha = state_dict_sha256(self.vae)
        return self._sha

    def __repr__(self) -> str:
        return (f"VaeEncoder(id={self.id!r}, latent_channels={self.latent_channels}, "
                f"downsample={self.downsample}, scaling_factor={self.scaling_factor})")


def _tiny_vae(seed: int) -> nn.Module:
    from diffusers import AutoencoderKL

    devices: list = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    return vae


def load_vae(name_or_path: str | os.PathLike = DEFAULT_VAE, *,
             device: str | torch.device | None = None,
             dtype: torch.dtype = torch.float32, local_files_only: bool = False) -> VaeEncoder:
    """Load a VAE by hub id / alias, local folder, or ``"tiny[:seed]"`` (see module doc).

    ``local_files_only=True`` never touches the network: a hub id must already be in the hub cache.

    Hub loading goes through ``AutoencoderKL.from_pretrained`` and needs the hub or a filled
    hub cache; a failure is re-raised with the id and the alternatives in the message.
    """
    name = str(name_or_path)
    if name == "tiny" or name.startswith("tiny:"):
        seed_s = name.partition(":")[2] or "0"
        try:
            seed = int(seed_s)
        except ValueError:
            raise ValueError(f"VAE {name!r}: expected 'tiny' or 'tiny:<integer seed>'") from None
        vae = _tiny_vae(seed)
        vae_id = "tiny" if seed == 0 else f"tiny:{seed}"
    else:
        from diffusers import AutoencoderKL

        path = Path(name).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"VAE folder {path.resolve()}: no config.json (expected a diffusers "
                    "AutoencoderKL.save_pretrained folder)"
                )
            vae_id = str(path.resolve())
            source = vae_id
        else:
            vae_id = VAE_ALIASES.get(name, name)
            source = vae_id
            from .hub import hf_cached, require_available

            cached = hf_cached(source, ("config.json",))
            if not local_files_only:
                require_available(f"VAE {source}", cached, "pass --vae PATH (a local diffusers AutoencoderKL "
                                                           "folder, e.g. from save_pretrained) or --vae tiny")
            elif not cached:
                from .hub import ModelUnavailable

                raise ModelUnavailable(f"VAE {source} is not in the local hub cache (loading offline only here); "
                                       "pass --vae PATH (a local diffusers AutoencoderKL folder)")
        try:
            vae = AutoencoderKL.from_pretrained(source, torch_dtype=dtype, local_files_only=local_files_only)
        except Exception as exc:
            raise RuntimeError(
                f"could not load VAE {name!r} ({source}) with diffusers AutoencoderKL.from_pretrained: "
                f"{type(exc).__name__}: {exc}. Offline? Fill the hub cache on a connected machine, pass "
                "a local save_pretrained folder, or use 'tiny' for a random test VAE."
            ) from exc
    if next(vae.parameters()).dtype != dtype:
        vae = vae.to(dtype=dtype)
    if device is not None:
        vae = vae.to(device)
    return VaeEncoder(vae, vae_id)
