"""Image decoding and the ADM center crop, plus the DataLoader dataset that runs them in workers.

What the build does to every source image, in order:

1. ``load_rgb(bytes)``: decode with PIL and convert to 8-bit RGB (rules below). Anything that
   cannot be decoded raises :class:`DecodeError` with a specific ``reason``; the build keeps the
   row, zero-fills it and records the reason in the manifest.
2. ``center_crop_adm(image, size)``: the ADM / REPA center crop (guided-diffusion's
   ``center_crop_arr``): halve with a BOX filter while the short side is at least ``2 * size``,
   scale with BICUBIC so that the short side is exactly ``size``, then crop the center.
   Images smaller than ``size`` are upsampled by the same bicubic step.

Colour-mode rules of ``load_rgb`` (REPA and ADM call ``convert("RGB")`` on every image; we do
the same wherever that is lossless in intent, so ImageNet stores match theirs byte for byte):

* ``RGB`` as is; ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``: ``convert("RGB")``.
* Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry): the alpha channel is
  dropped, like REPA/ADM's ``convert("RGB")`` (colour under transparent pixels is kept, no
  compositing on a background). This keeps the pixels identical to the reference recipe.
* High bit depth, where PIL's ``convert`` would clip everything above 255 to white:
  ``I;16*`` is scaled by 255/65535; ``I`` (32-bit int, what some readers return for 16-bit
  files) is scaled by 255/65535 when its maximum exceeds 255, else taken as 8-bit;
  ``F`` (float) is scaled by 255 when its values lie in [0, 1], else clipped to [0, 255].
* EXIF orientation is not applied (neither ADM nor REPA applies it).

PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched: truncated files are errors.
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DecodeError",
    "load_rgb",
    "center_crop_adm",
    "decode_and_crop",
    "DecodeDataset",
    "collate_decoded",
]


class DecodeError(Exception):
    """An input that cannot be turned into an RGB image.

    ``reason`` is a short, specific, human-readable string ("empty file", "not an image: ...",
    "truncated image: ...", ...) that the build writes into ``manifest["skipped"]``.
    """

    def __init__(self, reason: str, name: str | None = None):
        self.reason = reason
        self.name = name
        super().__init__(f"{name}: {reason}" if name else reason)


def _scale_to_uint8(arr: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit RGB (rules in the module docstring)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16"):
        gray = _scale_to_uint8(np.asarray(im), 255.0 / 65535.0)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and int(arr.max()) > 255:
            gray = _scale_to_uint8(np.clip(arr, 0, 65535), 255.0 / 65535.0)
        else:
            gray = _scale_to_uint8(arr, 1.0)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        finite = arr[np.isfinite(arr)]
        if finite.size and float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0:
            arr = arr * 255.0
        gray = _scale_to_uint8(np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0), 1.0)
        return Image.fromarray(gray, mode="L").convert("RGB")
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA":
        # we deliberately drop alpha like the reference recipe does.
        warnings.simplefilter("ignore", UserWarning)
        try:
            return im.convert("RGB")
        except (ValueError, OSError) as exc:
            raise DecodeError(f"unsupported colour mode {mode}: {exc}") from exc


def _failure_reason(exc: Exception) -> str:
    """Classify a PIL open/load failure: truncated data vs. otherwise corrupt data."""
    msg = str(exc)
    low = msg.lower()
    if "truncated" in low or "broken data stream" in low or "premature end" in low:
        return f"truncated image: {msg}"
    if isinstance(exc, OSError):
        return f"corrupt image: {msg}"
    return f"corrupt image: {type(exc).__name__}: {msg}"


def load_rgb(data: bytes, name: str | None = None) -> Image.Image:
    """Decode image bytes into a fully loaded 8-bit RGB PIL image.

    ``name`` is only used in the exception message. Raises :class:`DecodeError` with reason
    "empty file", "not an image: cannot identify image file", "truncated image: <detail>",
    "image too large: <detail>", "corrupt image: <detail>" or "unsupported colour mode ...".
    """
    if data is None or len(data) == 0:
        raise DecodeError("empty file", name)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image: cannot identify image file", name) from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large: {exc}", name) from exc
    except Exception as exc:  # any other header parsing failure
        raise DecodeError(_failure_reason(exc), name) from exc
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large: {exc}", name) from exc
    except Exception as exc:
        raise DecodeError(_failure_reason(exc), name) from exc
    try:
        return _to_rgb(im)
    except DecodeError as exc:
        raise DecodeError(exc.reason, name) from exc


def center_crop_adm(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM / REPA center crop of a PIL image to ``image_size`` x ``image_size``.

    While the short side is >= 2 * image_size, halve both sides (floor) with a BOX filter;
    then resize with BICUBIC so that the short side is image_size (long side rounded with
    Python's ``round``); then cut the centred square (offset = (side - image_size) // 2).
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    im = pil_image
    while min(im.size) >= 2 * image_size:
        w, h = im.size
        im = im.resize((w // 2, h // 2), resample=Image.Resampling.BOX)
    w, h = im.size
    scale = image_size / min(w, h)
    new_size = (round(w * scale), round(h * scale))
    im = im.resize(new_size, resample=Image.Resampling.BICUBIC)
    w, h = im.size
    left = (w - image_size) // 2
    top = (h - image_size) // 2
    return im.crop((left, top, left + image_size, top + image_size))


def decode_and_crop(data: bytes, image_size: int, name: str | None = None) -> np.ndarray:
    """``load_rgb`` then ``center_crop_adm``; returns uint8 [H, W, 3]. Raises DecodeError."""
    im = center_crop_adm(load_rgb(data, name), image_size)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (image_size, image_size, 3):  # defensive: would be a bug above
        raise DecodeError(f"unexpected decoded shape {arr.shape}", name)
    return arr


class _Source(Protocol):
    keys: list[str]

    def __len__(self) -> int: ...

    def read_bytes(self, row: int) -> bytes: ...


class DecodeDataset(torch.utils.data.Dataset):
    """Map-style dataset over a source (see ``pipeline.sources``) for DataLoader workers.

    Item ``i`` is source row ``rows[i]`` (all rows by default, or the rows of one shard).
    Returns ``{"row": int, "image": uint8 tensor [3, S, S], "ok": bool, "reason": str}``;
    an undecodable input gives a zero image, ``ok=False`` and the DecodeError reason.
    A file that cannot be read (missing, a broken symbolic link) is not a data error: the source's
    SourceError names it and the build stops (from a DataLoader worker too:
    ``irepa.stores.one_line`` recovers its one-line message from torch's re-raised error).
    """

    def __init__(self, source: _Source, image_size: int, rows: Sequence[int] | None = None):
        self.source = source
        self.image_size = int(image_size)
        self.rows = list(range(len(source))) if rows is None else [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        data = self.source.read_bytes(row)
        try:
            arr = decode_and_crop(data, self.image_size, name=self.source.keys[row])
        except DecodeError as exc:
            image = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
            return {"row": row, "image": image, "ok": False, "reason": exc.reason}
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return {"row": row, "image": image, "ok": True, "reason": ""}


def collate_decoded(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate DecodeDataset items: row int64 [B], image uint8 [B, 3, S, S], ok bool [B],
    reason list[str] (empty string for decoded rows)."""
    return {
        "row": torch.tensor([it["row"] for it in items], dtype=torch.int64),
        "image": torch.stack([it["image"] for it in items]),
        "ok": torch.tensor([bool(it["ok"]) for it in items], dtype=torch.bool),
        "reason": [str(it["reason"]) for it in items],
    }
