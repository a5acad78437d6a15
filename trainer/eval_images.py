"""Image sources for irepa-eval: a .npz's uint8 ``arr_0`` read by slices, or a folder of images
ADM-center-cropped; both yield uint8 NHWC batches of a [start, stop) range, in order, and a content
key (sha256 of the bytes) for the reference cache."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["NpzImages", "FolderImages", "ImageSource", "open_images", "sha256_file"]


def sha256_file(path: Union[str, Path], h: Optional[Any] = None) -> Any:
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h


class NpzImages:
    """uint8 [N, H, W, 3] images under ``key`` of a .npz, read by slices without loading the file.

    Uncompressed members (``np.savez``, the ADM suite's files) are memory-mapped; compressed ones
    are streamed.
    """

    def __init__(self, path: Union[str, Path], key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        member = f"{key}.npy"
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{self.path}: not a readable .npz ({exc})") from None
        with zf:
            if member not in zf.namelist():
                names = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
                raise ValueError(f"{self.path}: no '{key}' array of images (arrays: {', '.join(names) or 'none'})")
            info = zf.getinfo(member)
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"{self.path}: '{key}' uses .npy format {version}; expected 1.0 or 2.0")
                self._array_start = f.tell()
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{self.path}: '{key}' must be uint8 [N, H, W, 3] (NHWC, as the ADM suite), "
                             f"got {dtype} {list(shape)}")
        if fortran:
            raise ValueError(f"{self.path}: '{key}' is stored in Fortran order; save it C-contiguous")
        self.shape = tuple(int(s) for s in shape)
        self._item = int(np.prod(self.shape[1:]))
        self._compressed = info.compress_type != zipfile.ZIP_STORED
        self._info = info
        self._mm: Optional[np.ndarray] = None
        self._stream = None
        self._pos = 0
        if not self._compressed and self.shape[0] > 0:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError(f"{self.path}: corrupt zip local header for {member}")
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
            offset = info.header_offset + 30 + name_len + extra_len + self._array_start
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images [start, stop) as a uint8 array [b, H, W, 3] (a copy)."""
        stop = min(stop, len(self))
        if start >= stop:
            return np.zeros((0, *self.shape[1:]), np.uint8)
        if self._mm is not None:
            return np.array(self._mm[start:stop])
        if self._stream is None or start < self._pos:
            self.close()
            self._zip = zipfile.ZipFile(self.path)
            self._stream = self._zip.open(self._info)
            self._stream.read(self._array_start)
            self._pos = 0
        skip = (start - self._pos) * self._item
        while skip > 0:
            got = self._stream.read(min(skip, 1 << 24))
            if not got:
                raise ValueError(f"{self.path}: '{self.key}' is truncated")
            skip -= len(got)
        want = (stop - start) * self._item
        data = self._stream.read(want)
        if len(data) != want:
            raise ValueError(f"{self.path}: '{self.key}' is truncated (image {start + len(data) // self._item})")
        self._pos = stop
        return np.frombuffer(data, np.uint8).reshape(stop - start, *self.shape[1:]).copy()

    def iter_batches(self, start: int, stop: int, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray]:
        for s in range(start, stop, batch_size):
            yield self.read(s, min(s + batch_size, stop))

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._zip.close()
            self._stream = None

    def content_key(self) -> str:
        return "npz:" + sha256_file(self.path).hexdigest()

    def describe(self) -> str:
        return f"{self.path} ({len(self)} images, {self.shape[1]}x{self.shape[2]})"


class _DecodeFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], resolution: int):
        self.paths = list(paths)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from irepa.pipeline.transforms import DecodeError, decode_and_crop

        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                return decode_and_crop(f.read(), self.resolution, path), None
        except (DecodeError, OSError) as exc:
            return None, f"{path}: {getattr(exc, 'reason', None) or exc}"


def _collate(items: list) -> tuple[Optional[np.ndarray], Optional[str]]:
    for _, err in items:
        if err is not None:
            return None, err
    return np.stack([a for a, _ in items]), None


class FolderImages:
    """Every image file under a folder (recursive, sorted by relative path), each decoded to RGB and
    ADM center-cropped to ``resolution`` (``pipeline.transforms``); decoded in DataLoader workers."""

    def __init__(self, root: Union[str, Path], resolution: int, num_workers: int = 4):
        from irepa.pipeline.sources import IMG_EXTENSIONS

        self.path = Path(root)
        if resolution <= 0:
            raise ValueError(f"{self.path}: a folder of images needs --resolution (the ADM center-crop size)")
        self.resolution_px = int(resolution)
        self.num_workers = int(num_workers)
        rel = []
        for dirpath, _, names in os.walk(self.path, followlinks=True):
            for n in names:
                if n.lower().endswith(IMG_EXTENSIONS):
                    rel.append(os.path.relpath(os.path.join(dirpath, n), self.path).replace(os.sep, "/"))
        rel.sort()
        if not rel:
            raise ValueError(f"{self.path}: no image files ({', '.join(IMG_EXTENSIONS)})")
        self.files = rel

    def __len__(self) -> int:
        return len(self.files)

    @property
    def resolution(self) -> tuple[int, int]:
        return self.resolution_px, self.resolution_px

    def iter_batches(self, start: int, stop: int, batch_size: int, num_workers: Optional[int] = None
                     ) -> Iterator[np.ndarray]:
        workers = self.num_workers if num_workers is None else num_workers
        workers = max(0, min(workers, os.cpu_count() or 1))
        ds = _DecodeFiles([str(self.path / f) for f in self.files[start:stop]], self.resolution_px)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             collate_fn=_collate)
        for arr, err in loader:
            if err is not None:
                raise ValueError(f"cannot read image {err}")
            yield arr

    def content_key(self) -> str:
        h = hashlib.sha256()
        for rel in self.files:
            h.update(rel.encode() + b"\0")
            sha256_file(self.path / rel, h)
            h.update(b"\0")
        return f"folder@{self.resolution_px}:" + h.hexdigest()

    def describe(self) -> str:
        return f"{self.path}/ ({len(self)} images, ADM center crop {self.resolution_px})"


ImageSource = Union[NpzImages, FolderImages]


def open_images(path: Union[str, Path], resolution: int, num_workers: int, what: str) -> ImageSource:
    p = Path(path)
    if p.is_dir():
        return FolderImages(p, resolution, num_workers)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    return NpzImages(p)
