"""What a store holds: the layout (shapes, dtypes, options), its array list, int8 quantisation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import StoreError
from .manifest import FEATURE_DTYPES, LATENT_DTYPES, PIXEL_CODECS

# zarr node names may not contain "/" or start with "__"; keep encoder names portable.
_ENCODER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass
class StoreLayout:
    """Shapes and options of a store; the writer derives every array from it.

    latent_channels2 is 2C (posterior mean and std stacked on channels), latent_hw the latent
    grid, encoders maps encoder name -> (T, D) tokens and dim. latent_channels2 = 0: a store
    without latents (a pixel-only store, `--vae none`; latent_hw is then ignored).

    pixel_hw (H, W): also store `pixels` [N, 3, H, W] uint8, the ADM crop the encoders saw,
    channels first (the order readers return and encoders take, so a raw row is read straight
    into a batch). One copy: the flipped view is made by readers, never stored. pixel_codec:
    "none" (raw rows), "zstd" (zarr's zstd codec on each row, zarr only) or "png" (one PNG
    member per sample, webdataset only); see docs/BENCHMARKS.md for why "none" is the default.
    """

    num_rows: int
    shard_size: int
    latent_channels2: int
    latent_hw: tuple[int, int]
    encoders: dict[str, tuple[int, int]] = field(default_factory=dict)
    feature_dtype: str = "float16"
    latent_dtype: str = "float32"
    with_cls: bool = False
    flip: bool = False
    write_latents: bool = True
    pixel_hw: tuple[int, int] | None = None
    pixel_codec: str = "none"

    def __post_init__(self) -> None:
        self.latent_hw = tuple(int(v) for v in self.latent_hw)  # type: ignore[assignment]
        self.encoders = {str(k): (int(v[0]), int(v[1])) for k, v in dict(self.encoders).items()}
        if self.num_rows < 0:
            raise StoreError(f"StoreLayout: num_rows must be >= 0, got {self.num_rows}")
        if self.shard_size <= 0:
            raise StoreError(f"StoreLayout: shard_size must be > 0, got {self.shard_size}")
        if self.pixel_hw is not None:
            self.pixel_hw = tuple(int(v) for v in self.pixel_hw)  # type: ignore[assignment]
            if len(self.pixel_hw) != 2 or min(self.pixel_hw) <= 0:
                raise StoreError(f"StoreLayout: pixel_hw must be (H, W) > 0, got {self.pixel_hw}")
        if self.pixel_codec not in PIXEL_CODECS:
            raise StoreError(f"StoreLayout: pixel_codec must be one of {PIXEL_CODECS}, got {self.pixel_codec!r}")
        if self.latent_channels2 == 0:  # no latents: a pixel-only store
            if self.pixel_hw is None:
                raise StoreError("StoreLayout: a store without latents (latent_channels2=0) must hold pixels "
                                 "(pixel_hw); otherwise it has nothing to train on")
            if not self.write_latents:
                raise StoreError("StoreLayout: write_latents=False (latents borrowed from another store) needs "
                                 "their latent_channels2 and latent_hw, not 0")
        else:
            if self.latent_channels2 < 0 or self.latent_channels2 % 2:
                raise StoreError(
                    f"StoreLayout: latent_channels2 must be a positive even number (mean and std of C "
                    f"channels), got {self.latent_channels2}"
                )
            if len(self.latent_hw) != 2 or min(self.latent_hw) <= 0:
                raise StoreError(f"StoreLayout: latent_hw must be (h, w) > 0, got {self.latent_hw}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise StoreError(f"StoreLayout: feature_dtype must be one of {FEATURE_DTYPES}, got {self.feature_dtype!r}")
        if self.latent_dtype not in LATENT_DTYPES:
            raise StoreError(f"StoreLayout: latent_dtype must be one of {LATENT_DTYPES}, got {self.latent_dtype!r}")
        for name, (t, d) in self.encoders.items():
            if not _ENCODER_NAME.fullmatch(name):
                raise StoreError(
                    f"StoreLayout: encoder name {name!r} must start with a letter or digit and use only "
                    "letters, digits and . _ + -"
                )
            if t <= 0 or d <= 0:
                raise StoreError(f"StoreLayout: encoder {name!r} needs T > 0 and D > 0, got ({t}, {d})")

    @property
    def has_latents(self) -> bool:
        """Whether the store has latents (its own or borrowed with `--latents-from`)."""
        return self.latent_channels2 > 0

    @property
    def stores_latents(self) -> bool:
        """Whether this store writes a `latents` array itself."""
        return self.has_latents and self.write_latents

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        return (self.latent_channels2, *self.latent_hw) if self.has_latents else None

    @property
    def pixel_shape(self) -> tuple[int, int, int] | None:
        """(3, H, W) of the stored pixels, or None."""
        return (3, *self.pixel_hw) if self.pixel_hw is not None else None

    @property
    def num_shards(self) -> int:
        return (self.num_rows + self.shard_size - 1) // self.shard_size

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every stored array: name -> (shape with N first, dtype), in a fixed order."""
        n = self.num_rows
        specs: dict[str, tuple[tuple[int, ...], str]] = {
            "labels": ((n,), "int64"),
            "keys": ((n,), "string"),
        }
        if self.pixel_hw is not None:  # one copy: readers flip it for the flipped view
            specs["pixels"] = ((n, 3, *self.pixel_hw), "uint8")
        views = [""] + (["flip/"] if self.flip else [])
        for v in views:
            if self.stores_latents:
                specs[f"{v}latents"] = ((n, *self.latent_shape), self.latent_dtype)
            for enc, (t, d) in self.encoders.items():
                specs[f"{v}features/{enc}"] = ((n, t, d), self.feature_dtype)
                if self.feature_dtype == "int8":
                    specs[f"{v}feature_scales/{enc}"] = ((n, t), "float32")
                if self.with_cls:
                    specs[f"{v}cls/{enc}"] = ((n, d), "float16")
        return specs


def token_grid_for(name: str, tokens: int, given: object = None) -> list[int]:
    """The (h, w) token grid of an encoder: as given, else the square root of T."""
    if given is not None:
        h, w = (int(v) for v in given)  # type: ignore[union-attr]
        if h * w != tokens:
            raise StoreError(f"encoder {name!r}: token_grid {h}x{w} does not match T={tokens} tokens")
        return [h, w]
    r = math.isqrt(tokens)
    if r * r != tokens:
        raise StoreError(
            f"encoder {name!r}: T={tokens} tokens is not a square grid; pass info['encoders']"
            f"['{name}']['token_grid'] = [h, w]"
        )
    return [r, r]


def wds_member_names(encoders: list[str]) -> dict[str, str]:
    """Encoder name -> tar member-safe name (lowercase [a-z0-9_], unique, in the given order).

    webdataset splits member names at the first dot and lowercases suffixes, so '.', '-' and
    capitals cannot appear in the encoder part of a member name.
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in encoders:
        base = re.sub(r"[^a-z0-9_]", "_", name.lower()) or "enc"
        m, i = base, 2
        while m in used:
            m, i = f"{base}_{i}", i + 1
        used.add(m)
        out[name] = m
    return out


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: s = max|x| / 127 over the last axis, q = round(x / s).

    Returns (q int8 [..., D], s float32 [...]); an all-zero token gets s = 0 and q = 0.
    """
    x = np.asarray(x, dtype=np.float32)
    s = (np.abs(x).max(axis=-1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1.0))
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, s


def dequantize_int8(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """float32 features from int8 tokens and their per-token scales."""
    return q.astype(np.float32) * np.asarray(s, dtype=np.float32)[..., None]
