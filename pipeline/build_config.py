"""``irepa-cache build`` options (:class:`BuildConfig`) and the parsing of encoder lists and weights.

Torch-free, so that the command line is checked before any heavy import.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .config import OptionError, check_fields, option, resolve
from .defaults import DEFAULT_ENCODER, DEFAULT_VAE

__all__ = ["BuildConfig", "split_names", "parse_weights", "build_config"]


@dataclass
class BuildConfig:
    """Run the VAE and vision encoder(s) over a dataset once and write a store.

    With no --data and no $IREPA_DATA, builds the embedded demo (and says so): the bundled sample
    photos, a tiny random VAE and a tiny random encoder of the named architecture.
    """

    data: str | None = option(None, "ImageFolder root, webdataset tar shards ('train-{000000..000146}.tar') "
                                    "or a .txt file list; default: $IREPA_DATA, else the bundled demo photos "
                                    "(tiny random models)", metavar="PATH", shown="$IREPA_DATA, else the demo")
    out: str | None = option(None, "store directory (default stores/<encoder names as typed, joined by +>, so that "
                                   "`irepa-cache build --encoder siglip` writes stores/siglip)", metavar="DIR",
                              shown="stores/<encoders>")
    encoder: list[str] | None = option(None, "registry name(s), aliases or raw timm ids, comma separated; all run "
                                             "on the same decoded batch", metavar="A,B", shown=DEFAULT_ENCODER)
    vae: str | None = option(None, "diffusers AutoencoderKL hub id or local folder, tiny (the demo's), or none "
                                   "(no latents: a pixel-only store, with --pixels)", metavar="ID", shown=DEFAULT_VAE)
    resolution: int = option(256, "ADM center-crop size (256 or 512)")
    encoder_config: str | None = option(None, "tiny: a reduced random-initialised encoder (tests, demos)",
                                        choices=("tiny",))
    weights: str | None = option(None, "local encoder checkpoint (safetensors or state dict): PATH, or "
                                       "name=PATH,name2=PATH2", metavar="PATH")
    latents_from: str | None = option(None, "reuse this store's VAE latents (same dataset and resolution); "
                                            "run only the encoders", metavar="STORE")
    flip: bool = option(False, "also store the horizontally flipped view")
    pixels: bool = option(False, "also store the exact uint8 ADM crop the encoders saw, [3, H, W] per sample "
                                 "(pixel-space objectives: --objective jit, repae); one copy, flipped on the fly")
    pixel_codec: str = option("none", "codec of the stored pixels: none (raw rows, the default: fastest to read, "
                                      "see docs/BENCHMARKS.md), zstd (zarr) or png (wds)",
                              choices=("none", "zstd", "png"))
    feature_dtype: str = option("float16", "feature storage: float16, or int8 (per-token scale, half the bytes)",
                                choices=("float16", "int8"))
    latent_dtype: str = option("float32", "posterior mean and std storage", choices=("float32", "float16"))
    cls: bool = option(False, "also store each encoder's CLS token")
    format: str = option("zarr", "zarr (random access) or wds (webdataset tar shards, streaming)",
                         choices=("zarr", "wds"))
    shard_size: int | None = option(None, "samples per shard file (the demo: 4; with --latents-from: that store's)",
                                    metavar="N", shown="1024")
    batch_size: int = option(64, "images per forward pass")
    num_workers: int = option(4, "image-decoding DataLoader workers")
    resume: bool = option(True, "finish an interrupted build in place; --noresume refuses an existing store")
    repair: bool = option(False, "verify every shard file first and rebuild the shards that fail (a flipped "
                                 "byte, a deleted file); the result equals an undamaged build")
    overwrite: bool = option(False, "delete the irepa store already at --out (another build's) and build it again")
    device: str | None = option(None, "torch device (default cuda:LOCAL_RANK when available, else cpu)")
    precision: str = option("bf16", "encoder precision on CUDA: bf16 autocast, fp16 autocast (the official iREPA "
                                    "ldm code's default), or fp32; the VAE always runs fp32 and CPU builds run fp32 "
                                    "throughout", choices=("bf16", "fp16", "fp32"))
    preprocess: str = option("irepa", "encoder preprocessing profile: irepa (what the official iREPA release "
                                      "computes, so the paper's numbers reproduce) or native (the encoder's own timm "
                                      "config); see docs/ENCODERS.md", choices=("irepa", "native"))
    pretrained: bool = option(True, "load the encoders' pretrained weights (false: random init)", hidden=True)
    progress: bool = option(True, "show a progress bar")

    def _check_pixels(self) -> None:
        """--pixels, --pixel-codec and --vae none fit together and the backend has the codec."""
        if self.vae == "none" and not self.pixels:
            raise OptionError("--vae none stores no latents; add --pixels (a pixel-only store), or give a VAE")
        if self.vae == "none" and self.latents_from:
            raise OptionError("--vae none (no latents) and --latents-from (borrow latents) contradict each other")
        if self.pixel_codec != "none" and not self.pixels:
            raise OptionError(f"--pixel-codec {self.pixel_codec} needs --pixels")
        if self.pixels:
            from irepa.stores import get_backend

            codecs = get_backend(self.format).pixel_codecs
            if self.pixel_codec not in codecs:
                raise OptionError(f"--pixel-codec {self.pixel_codec} is not available with --format {self.format} "
                                  f"(it has {', '.join(codecs)})")

    def __post_init__(self) -> None:
        check_fields(self)
        self._check_pixels()
        for name in ("shard_size", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.num_workers < 0:
            raise OptionError(f"--num-workers must be >= 0; got {self.num_workers}")
        if self.resolution <= 0 or self.resolution % 16:
            raise OptionError(f"--resolution {self.resolution} is not a positive multiple of 16")
        if self.resolution not in (256, 512) and not self.tiny:
            raise OptionError(f"--resolution {self.resolution}: the encoders' token grids are defined for 256 and 512 "
                              "px (16x16 / 32x32 SiT tokens); other sizes only with --encoder-config tiny")
        if self.repair and self.overwrite:
            raise OptionError("--repair keeps the store and rebuilds its damaged shards; --overwrite deletes it: "
                              "give one of them")

    @property
    def encoders(self) -> list[str]:
        """The encoder names as given (default: the default encoder)."""
        return list(self.encoder or [DEFAULT_ENCODER])

    @property
    def source(self) -> str | None:
        """The data to read: --data, else $IREPA_DATA, else None (the bundled demo)."""
        return self.data or os.environ.get("IREPA_DATA") or None

    @property
    def demo(self) -> bool:
        return self.source is None

    @property
    def tiny(self) -> bool:
        """Tiny random models: --encoder-config tiny, or the demo's default."""
        return self.encoder_config == "tiny" or self.demo

    @property
    def out_dir(self) -> str:
        """--out, else stores/<encoder names as typed, joined by +>."""
        if self.out:
            return self.out
        return "stores/" + "+".join(re.sub(r"[^A-Za-z0-9._+-]+", "_", e) for e in self.encoders)


def build_config(cfg: BuildConfig | None = None, **kwargs) -> BuildConfig:
    """A :class:`BuildConfig` from keyword arguments (the Python API), checked like the CLI's."""
    if cfg is not None:
        if kwargs:
            raise TypeError("pass a BuildConfig or keyword arguments, not both")
        return cfg
    return resolve(BuildConfig, kwargs)[0]


def split_names(value: str | Sequence[str] | None) -> list[str]:
    """``"a,b"``, ``("a", "b")`` or None -> a clean list of names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [v.strip() for v in items if v.strip()]


def parse_weights(weights: str | Sequence[str] | Mapping[str, str] | None, encoders: list[str],
                  flag: str = "--weights") -> dict[str, str]:
    """``--weights PATH`` (one encoder) or ``--weights name=PATH,name2=PATH2`` -> {encoder: path}."""
    if not weights:
        return {}
    if isinstance(weights, Mapping):
        return {str(k): str(v) for k, v in weights.items()}
    out: dict[str, str] = {}
    for item in split_names(weights):
        if "=" in item:
            name, path = item.split("=", 1)
            out[name.strip()] = path.strip()
        elif len(encoders) == 1:
            out[encoders[0]] = item
        else:
            raise ValueError(f"{flag} {item!r} is ambiguous with {len(encoders)} encoders {encoders}; "
                             f"write {flag} name=PATH,name2=PATH2")
    unknown = sorted(set(out) - set(encoders))
    if unknown:
        raise ValueError(f"{flag} names {unknown} that are not among the encoders {encoders}")
    return out
