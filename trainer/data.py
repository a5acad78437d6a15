"""Streaming loader over a store: shuffling, DDP splitting, resumable positions, latent scaling.

Two sample orders, both a pure function of ``(seed, epoch)`` so that a resumed run sees the same
samples as an unbroken one:

* **index order** (zarr stores, and ``--online`` image sources): epoch ``e`` is a random
  permutation of all samples. The run walks an endless stream of positions; position ``p`` is
  sample ``perm_{p // N}[p % N]``. Global step ``g`` takes the ``B`` positions after the start;
  rank ``r`` takes its contiguous ``B / world`` slice and splits it into ``grad_accum``
  micro-batches. Every rank therefore sees a disjoint part of each global batch, the union is the
  global batch of a 1-process run with the same ``B``, and the position (samples consumed) is all a
  checkpoint must keep. Batches may straddle an epoch boundary (no sample is dropped).
  A DataLoader worker reads each micro-batch with one ``get_batch`` call.
* **stream order** (webdataset stores): epoch ``e`` permutes the shard list; rank ``r`` takes
  shards ``[r::world]``, and the rank's ``S`` logical streams (one per DataLoader worker) take
  ``[s::S]`` of those. Each stream reads its shards in order through a shuffle buffer and cuts
  micro-batches from its endless sample stream; the loader interleaves the streams round-robin.
  A checkpoint keeps the samples consumed per stream; resuming replays the current epoch of each
  stream (reads, no training) to rebuild the shuffle buffer exactly.

Flip stores: the view of sample ``i`` in epoch ``e`` is a fixed random bit of ``(seed, e, i)``.
Latents and features of the flipped view are stored; pixels are stored once, and a sample whose
flipped view is picked gets the stored crop mirrored horizontally (the image its flipped features
were computed from).

What a batch carries is the loader's ``inputs``: ``"latents"`` (cached posterior, float32) and/or
``"pixels"`` (uint8 [b, 3, H, W], the stored ADM crop), besides labels, indices and features.

Damaged data: the store's reader checks every byte it hands out (format 2 stores: a crc32c per
row or member) and stops with a one-line ``DamagedData``. With ``on_damage="skip"`` the loader
leaves damaged samples out of their micro-batch instead (the batch is that much smaller) and
lists their one-line messages in the batch's ``"damaged"`` (always present, usually empty), for
the trainer to count and log. The positions a checkpoint keeps stay those of the unbroken run as
long as the damage does not change.

Latents arrive as the cached posterior ``[2C, h, w]`` (mean, std); :func:`sample_posterior` draws
``z = mean + std * noise`` on the device and :class:`LatentNorm` scales it (``sd``: REPA's
``(z - shift) * scaling_factor``; ``stats``: per-channel ``(z - mean_c) / std_c`` from the
manifest's ``latent_stats``, as iREPA / REPA-E do).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

__all__ = [
    "mix_seed",
    "LoaderSpec",
    "IndexOrder",
    "epoch_order",
    "epoch_flips",
    "shuffle_buffer",
    "StoreBatches",
    "WdsStreams",
    "StoreLoader",
    "LatentNorm",
    "sample_posterior",
    "collate_samples",
]


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and platforms)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: Any) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(mix_seed(*parts))
    return g


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Sample order of one epoch (int64 [n])."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return torch.randperm(n, generator=_generator("order", seed, epoch)).numpy()


def epoch_flips(n: int, seed: int, epoch: int) -> np.ndarray:
    """Which view (False: stored image, True: flipped) sample ``i`` uses in ``epoch`` (bool [n])."""
    return torch.randint(0, 2, (n,), generator=_generator("flip", seed, epoch)).numpy().astype(bool)


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class LoaderSpec:
    """How one rank cuts the global batch: ``global_batch = world_size * grad_accum * micro``."""

    global_batch: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    grad_accum: int = 1
    shuffle: bool = True
    flip: bool = False          # pick a view per sample (store must hold flips)
    shuffle_buffer: int = 1000  # webdataset stores

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.world_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch size, world size and grad accumulation must be >= 1; got {self}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.global_batch % (self.world_size * self.grad_accum):
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by world size {self.world_size} x "
                f"grad accumulation {self.grad_accum}; pick a batch size that is")

    @property
    def rank_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def micro(self) -> int:
        return self.global_batch // (self.world_size * self.grad_accum)


# ----------------------------------------------------------------------------- index order


class IndexOrder:
    """Maps this rank's micro-batch ``j`` (counted from ``start`` samples consumed) to sample
    indices and views. Epoch orders are cached, two at a time."""

    def __init__(self, n: int, spec: LoaderSpec, start: int = 0):
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.spec, self.start = int(n), spec, int(start)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def positions(self, j: int) -> np.ndarray:
        """Stream positions of this rank's micro-batch ``j``."""
        s = self.spec
        step, m = divmod(int(j), s.grad_accum)
        first = self.start + step * s.global_batch + s.rank * s.rank_batch + m * s.micro
        return np.arange(first, first + s.micro, dtype=np.int64)

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray | None]:
        if e not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            flips = epoch_flips(self.n, self.spec.seed, e) if self.spec.flip else None
            self._cache[e] = (epoch_order(self.n, self.spec.seed, e, self.spec.shuffle), flips)
        return self._cache[e]

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(sample indices int64, flip bools or None) for stream positions."""
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.n)
        idx = np.empty(len(offsets), dtype=np.int64)
        flip = np.empty(len(offsets), dtype=bool) if self.spec.flip else None
        for e in np.unique(epochs):
            sel = epochs == e
            order, flips = self._epoch(int(e))
            idx[sel] = order[offsets[sel]]
            if flip is not None:
                flip[sel] = flips[idx[sel]]
        return idx, flip

    def batch(self, j: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.lookup(self.positions(j))


def _select_features(features: dict, encoders: Sequence[str]) -> dict:
    return {e: features[e] for e in encoders}


class _LazyStore:
    """A store opened lazily, once per process: DataLoader workers get a copy without the open
    reader (``__getstate__``) and reopen the store themselves. Needs ``path``, ``_opener``, ``_reader``
    (and ``on_damage``, ``read_checks`` for the default opener)."""

    path: Path
    _opener: Callable[[Path], Any] | None
    _reader: Any
    on_damage: str = "raise"
    read_checks: bool = True

    def reader(self):
        if self._reader is None:
            if self._opener is not None:
                self._reader = self._opener(self.path)
            else:
                from irepa.stores import open_store
                self._reader = open_store(self.path, on_damage=self.on_damage, read_checks=self.read_checks)
        return self._reader

    def _drain_damage(self) -> list[str]:
        """Messages of the samples the reader left out since the last batch (skip mode)."""
        r = self.reader()
        msgs = list(getattr(r, "damaged", ()))
        if msgs:
            r.damaged.clear()
        return msgs

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_reader"] = None
        return d


class StoreBatches(_LazyStore, Dataset):
    """Map-style dataset whose item ``j`` is this rank's micro-batch ``j`` of a zarr store, read
    with one ``get_batch`` call (inside a DataLoader worker). The store opens lazily per process."""

    def __init__(self, path: str | Path, order: IndexOrder, encoders: Sequence[str], length: int,
                 opener: Callable[[Path], Any] | None = None, on_damage: str = "raise", read_checks: bool = True,
                 inputs: Sequence[str] = ("latents",)):
        self.path, self.order, self.encoders, self.length = Path(path), order, list(encoders), int(length)
        self.inputs = _check_inputs(inputs)
        self._opener = opener
        self._reader = None
        self.on_damage, self.read_checks = on_damage, read_checks

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> dict:
        idx, flip = self.order.batch(j)
        # features stay float16 (the stored dtype; int8 is dequantised to it): half the bytes
        # between worker processes and no CPU upcast; the alignment loss promotes on the device
        b = self.reader().get_batch(idx, flip=flip, encoders=self.encoders, with_keys=False,
                                    features_dtype=np.float16, with_latents="latents" in self.inputs,
                                    with_pixels="pixels" in self.inputs)
        self._drain_damage()  # get_batch lists this batch's damage in b["damaged"]
        out = {
            "index": torch.as_tensor(np.asarray(b["index"], dtype=np.int64)),
            "label": torch.as_tensor(np.asarray(b["label"], dtype=np.int64)),
            "features": {e: torch.as_tensor(v) for e, v in _select_features(b["features"], self.encoders).items()},
            "damaged": list(b.get("damaged", [])),
        }
        if "latents" in self.inputs:
            out["latents"] = torch.as_tensor(np.asarray(b["latents"], dtype=np.float32))
        if "pixels" in self.inputs:
            out["pixels"] = torch.from_numpy(b["pixels"])  # uint8, mirrored where the flipped view was picked
        if "cls" in self.inputs:
            out["cls"] = {e: torch.as_tensor(v) for e, v in (b.get("cls") or {}).items() if e in self.encoders}
        return out


# ----------------------------------------------------------------------------- stream order


def shuffle_buffer(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream with a buffer of ``size``: once full, each new item swaps out a random
    buffered one. Output ``k`` comes from the first ``k + size`` inputs. ``size <= 1`` keeps order."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        out, buf[j] = buf[j], item
        yield out
    rng.shuffle(buf)
    yield from buf


#: what a batch can carry besides labels and features
INPUTS = ("latents", "pixels", "cls")  # "cls": the CLS token of each selected encoder that stores one


def _check_inputs(inputs: Sequence[str]) -> tuple[str, ...]:
    inputs = tuple(inputs)
    bad = [i for i in inputs if i not in INPUTS]
    if bad:
        raise ValueError(f"loader inputs {bad} unknown; expected any of {INPUTS}")
    return inputs


def collate_samples(samples: list[dict], encoders: Sequence[str], flip: bool,
                    features_dtype: Any = np.float16, on_damage: str = "raise",
                    inputs: Sequence[str] = ("latents",)) -> dict:
    """Stack per-sample dicts from ``iter_shard`` into a batch, picking each sample's view.

    Arrays may be numpy arrays or the lazy members of ``iter_shard(..., lazy=True)``, which are
    read straight into the batch (one read per member, no intermediate copy, and only the view
    the batch uses) after their checksum is checked. Features become ``features_dtype``
    (float16, like the zarr batches: the stored dtype of an fp16 store, half the bytes between
    processes; the alignment loss promotes on the device); latents float32. A member that fails
    its checksum raises DamagedData, or (on_damage="skip") leaves its sample out of the batch and
    its message in ``"damaged"``. ``inputs``: what to collate besides features ("latents",
    "pixels"); pixels are stored once and mirrored here for samples whose flipped view is picked."""
    from irepa.stores.errors import DamagedData

    inputs = _check_inputs(inputs)
    n = len(samples)
    views = ["_flip" if flip and bool(s.get("_flip", False)) else "" for s in samples]
    first = samples[0]
    lat = np.empty((n, *first["latents" + views[0]].shape), np.float32) if "latents" in inputs else None
    pix = np.empty((n, *first["pixels"].shape), np.uint8) if "pixels" in inputs else None
    feats = {e: np.empty((n, *first["features" + views[0]][e].shape), features_dtype) for e in encoders}
    cls_first = (first.get("cls" + views[0]) or {}) if "cls" in inputs else {}
    cls = {e: np.empty((n, *cls_first[e].shape), np.float32) for e in encoders if e in cls_first}
    keep = np.ones(n, dtype=bool)
    damaged: list[str] = []
    for i, (s, v) in enumerate(zip(samples, views)):
        try:
            if lat is not None:
                _put(lat, i, s["latents" + v], s, "latents" + v)
            if pix is not None:
                _put(pix, i, s["pixels"], s, "pixels")
                if v:
                    pix[i] = pix[i][..., ::-1]  # numpy copies overlapping operands first
            f = s["features" + v]
            for e in encoders:
                _put(feats[e], i, f[e], s, f"features{v}[{e!r}]")
            for e, arr in cls.items():
                _put(arr, i, s["cls" + v][e], s, f"cls{v}[{e!r}]")
        except DamagedData as err:
            if on_damage != "skip":
                raise
            keep[i] = False
            damaged.append(str(err))
    if not keep.all():
        samples = [s for s, k in zip(samples, keep) if k]
        lat = lat[keep] if lat is not None else None
        pix = pix[keep] if pix is not None else None
        feats = {e: v[keep] for e, v in feats.items()}
        cls = {e: v[keep] for e, v in cls.items()}
    out = {
        "index": torch.as_tensor(np.asarray([int(s["index"]) for s in samples], dtype=np.int64)),
        "label": torch.as_tensor(np.asarray([int(s["label"]) for s in samples], dtype=np.int64)),
        "features": {e: torch.from_numpy(v) for e, v in feats.items()},
        "damaged": damaged,
    }
    if lat is not None:
        out["latents"] = torch.from_numpy(lat)
    if pix is not None:
        out["pixels"] = torch.from_numpy(pix)
    if "cls" in inputs:
        out["cls"] = {e: torch.from_numpy(v) for e, v in cls.items()}
    return out


def _put(out: np.ndarray, i: int, value: Any, sample: dict, what: str) -> None:
    """out[i] = value (an array, or a lazy member read in place)."""
    if tuple(value.shape) != out.shape[1:]:
        where = getattr(value, "where", f"row {sample.get('row')}")
        raise ValueError(f"sample {sample.get('key', sample.get('index'))!r} ({where}): {what} has shape "
                         f"{tuple(value.shape)}, the batch's first sample {out.shape[1:]}")
    if hasattr(value, "read_into"):
        value.read_into(out[i])
    else:
        out[i] = value


class WdsStreams(_LazyStore, IterableDataset):
    """This rank's webdataset streams, as an endless iterator of micro-batches.

    ``consumed[s]`` samples of stream ``s`` were used before this loader started; ``rotation`` is
    the number of micro-batches delivered before, so that the round-robin continues where it was.
    With DataLoader workers, worker ``w`` runs stream ``(w + rotation) % S``; without workers the
    streams are interleaved in process.

    Shards are read lazily (``iter_shard(..., lazy=True)``): the shuffle buffer holds member
    references, and each batch reads its samples' payloads straight into the batch arrays. The
    buffer's bytes therefore wait in the page cache (a cold shard is read through into it as its
    headers are parsed), not in process memory; a page cache smaller than the shuffle windows of
    all workers makes those reads go to disk again, in shuffled order.
    """

    def __init__(self, path: str | Path, spec: LoaderSpec, encoders: Sequence[str], num_streams: int,
                 shard_counts: Sequence[int], consumed: Sequence[int], rotation: int,
                 opener: Callable[[Path], Any] | None = None, on_damage: str = "raise", read_checks: bool = True,
                 inputs: Sequence[str] = ("latents",)):
        self.path, self.spec, self.encoders = Path(path), spec, list(encoders)
        self.inputs = _check_inputs(inputs)
        self.on_damage, self.read_checks = on_damage, read_checks
        self.num_streams = int(num_streams)
        self.shard_counts = [int(c) for c in shard_counts]
        self.consumed = [int(c) for c in consumed]
        self.rotation = int(rotation)
        self._opener = opener
        self._reader = None
        if len(self.consumed) != self.num_streams:
            raise ValueError(f"consumed has {len(self.consumed)} entries for {self.num_streams} streams")

    def stream_shards(self, stream: int, epoch: int) -> list[int]:
        """Shards read by ``stream`` of this rank in ``epoch``, in reading order."""
        s = self.spec
        n = len(self.shard_counts)
        order = (torch.randperm(n, generator=_generator("shards", s.seed, epoch)).numpy()
                 if s.shuffle else np.arange(n))
        mine = order[s.rank::s.world_size]
        return [int(x) for x in mine[stream::self.num_streams]]

    def _epoch_samples(self, stream: int, epoch: int) -> Iterator[dict]:
        s = self.spec
        rng = np.random.default_rng(mix_seed("wds-buffer", s.seed, epoch, s.rank, stream))
        flips = epoch_flips(sum(self.shard_counts), s.seed, epoch) if s.flip else None
        reader = self.reader()

        def raw() -> Iterator[dict]:
            for shard in self.stream_shards(stream, epoch):
                # lazy: the shuffle buffer holds member references, not arrays; collate_samples
                # reads each chosen view straight into the batch (float16 features, as
                # StoreBatches: no CPU upcast, half the bytes between processes)
                for sample in reader.iter_shard(shard, features_dtype=np.float16, lazy=True,
                                                with_latents="latents" in self.inputs):
                    if flips is not None:
                        sample = dict(sample)
                        sample["_flip"] = bool(flips[int(sample["index"])])
                    yield sample

        size = s.shuffle_buffer if s.shuffle else 0
        yield from shuffle_buffer(raw(), size, rng)

    def samples(self, stream: int, skip: int) -> Iterator[dict]:
        """Endless sample stream of ``stream``, starting after ``skip`` samples."""
        epoch = 0
        while True:
            length = sum(self.shard_counts[i] for i in self.stream_shards(stream, epoch))
            if length == 0:
                raise ValueError(
                    f"store {self.path}: stream {stream} of rank {self.spec.rank} has no samples in epoch "
                    f"{epoch}; use fewer DataLoader workers or ranks")
            if skip >= length:  # skip whole epochs without reading them
                skip -= length
                epoch += 1
                continue
            it = self._epoch_samples(stream, epoch)
            for k, sample in enumerate(it):
                if k >= skip:
                    yield sample
            skip = 0
            epoch += 1

    def batches(self, stream: int) -> Iterator[dict]:
        it = self.samples(stream, self.consumed[stream])
        while True:
            chunk = [next(it) for _ in range(self.spec.micro)]
            b = collate_samples(chunk, self.encoders, self.spec.flip, on_damage=self.on_damage, inputs=self.inputs)
            b["damaged"] = self._drain_damage() + b["damaged"]
            yield b

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            if info.num_workers != self.num_streams:
                raise RuntimeError(f"{info.num_workers} workers for {self.num_streams} streams")
            yield from self.batches((info.id + self.rotation) % self.num_streams)
            return
        its = [self.batches(s) for s in range(self.num_streams)]
        k = self.rotation
        while True:
            yield next(its[k % self.num_streams])
            k += 1


# ----------------------------------------------------------------------------- loader


class StoreLoader:
    """This rank's micro-batches over a store, from a saved position, plus the position to save.

    ``state``: what :meth:`state_after` returned in an earlier run (None: start of the run).
    ``steps``: how many optimizer steps this loader will serve (``grad_accum`` micro-batches each).
    Batches are dicts ``{index, label, latents [b, 2C, h, w], features {enc: [b, T, D]}, damaged}``;
    ``inputs`` says which of ``latents`` and ``pixels`` (uint8 [b, 3, H, W]) they carry.
    ``kind`` is the store's ``reader.loader_kind``. ``on_damage``: "raise" (default) or "skip"
    (see the module docstring); ``read_checks=False`` turns the reader's checksums off (benchmarks).
    """

    def __init__(self, path: str | Path, *, kind: str, num_samples: int, spec: LoaderSpec,
                 encoders: Sequence[str], steps: int, state: dict | None = None, num_workers: int = 0,
                 shard_counts: Sequence[int] | None = None, pin_memory: bool = False,
                 opener: Callable[[Path], Any] | None = None, prefetch_factor: int = 2,
                 on_damage: str = "raise", read_checks: bool = True, inputs: Sequence[str] = ("latents",)):
        if kind not in ("index", "stream"):
            raise ValueError(f"unknown loader kind {kind!r}")
        if on_damage not in ("raise", "skip"):
            raise ValueError(f"on_damage must be 'raise' or 'skip', got {on_damage!r}")
        self.path, self.kind, self.spec = Path(path), kind, spec
        self.num_samples = int(num_samples)
        self.encoders = list(encoders)
        self.steps = int(steps)
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        state = dict(state or {})
        if state and state.get("kind", kind) != kind:
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} loader position, this store needs {kind!r}")
        if kind == "index":
            self.num_workers = int(num_workers)
            self.start = int(state.get("position", 0))
            if state and state.get("num_samples", self.num_samples) != self.num_samples:
                warnings.warn(f"store {path} now holds {self.num_samples} samples, the checkpoint saw "
                              f"{state['num_samples']}: the sample order differs from the unbroken run")
            self.order = IndexOrder(self.num_samples, spec, self.start)
            self.dataset = StoreBatches(path, self.order, encoders, self.steps * spec.grad_accum, opener,
                                        on_damage, read_checks, inputs)
        else:
            counts = list(shard_counts or [])
            per_rank = len(counts) // spec.world_size
            if per_rank < 1:
                raise ValueError(f"store {path} has {len(counts)} shards, fewer than the {spec.world_size} ranks; "
                                 "rebuild it with a smaller --shard-size or use the zarr backend")
            streams = int(state.get("streams", max(1, int(num_workers))))
            if streams > per_rank:
                warnings.warn(f"store {path}: {streams} DataLoader workers but only {per_rank} shards per rank; "
                              f"using {per_rank}")
                streams = per_rank
            if state and (state.get("world_size") != spec.world_size or state.get("micro") != spec.micro):
                warnings.warn(f"store {path}: resuming a webdataset stream with a different world size or "
                              "micro-batch; the sample order differs from the unbroken run")
            if state and streams != max(1, int(num_workers)) and int(num_workers) > 0:
                warnings.warn(f"--num-workers {num_workers} differs from the {streams} streams of the checkpoint; "
                              f"using {streams} workers so that the sample order continues")
            self.num_streams = streams
            self.num_workers = streams if int(num_workers) > 0 else 0
            self.consumed = [int(c) for c in state.get("consumed", [0] * streams)]
            self.delivered = int(state.get("delivered", 0))
            self.dataset = WdsStreams(path, spec, encoders, streams, counts, self.consumed,
                                      self.delivered % streams, opener, on_damage, read_checks, inputs)
        self._iter: Iterator[dict] | None = None

    def _make_iter(self) -> Iterator[dict]:
        kw: dict[str, Any] = dict(batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        if self.num_workers > 0:
            kw["prefetch_factor"] = self.prefetch_factor
        if self.kind == "index":
            return iter(DataLoader(self.dataset, shuffle=False, **kw))
        return iter(DataLoader(self.dataset, **kw))

    def __iter__(self) -> Iterator[dict]:
        return self._make_iter()

    def state_after(self, steps_done: int) -> dict:
        """The position after ``steps_done`` optimizer steps of this loader (JSON-able ints)."""
        s = self.spec
        if self.kind == "index":
            return {"kind": "index", "position": self.start + int(steps_done) * s.global_batch,
                    "num_samples": self.num_samples, "seed": s.seed}
        n = int(steps_done) * s.grad_accum
        S = self.num_streams
        consumed = list(self.consumed)
        for k in range(S):  # batch k of this loader came from stream (k + rotation) % S
            stream = (k + self.delivered) % S
            consumed[stream] += (n // S + (1 if k < n % S else 0)) * s.micro
        return {"kind": "stream", "streams": S, "consumed": consumed, "delivered": self.delivered + n,
                "world_size": s.world_size, "micro": s.micro, "seed": s.seed}


# ----------------------------------------------------------------------------- latents


def sample_posterior(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``mean + std * noise`` from a cached posterior ``[B, 2C, h, w]`` (mean, std on channels)."""
    mean, std = latents.chunk(2, dim=1)
    return mean + std * noise


class LatentNorm:
    """Latent scaling: ``sd`` = (z - shift) * scaling_factor; ``stats`` = (z - mean_c) / std_c."""

    MODES = ("sd", "stats")

    def __init__(self, mode: str, scale: Sequence[float] | float, bias: Sequence[float] | float):
        if mode not in self.MODES:
            raise ValueError(f"unknown --latent-norm {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        self.scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        self.bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)

    @classmethod
    def from_manifest(cls, manifest: dict, mode: str, store: str = "store") -> "LatentNorm":
        vae = manifest.get("vae") or {}
        if mode == "sd":
            sf = vae.get("scaling_factor")
            shift = vae.get("shift_factor") or 0.0
            from irepa.pipeline.defaults import SD_VAE_SCALE

            return cls("sd", SD_VAE_SCALE if sf is None else float(sf), float(shift))
        if mode == "stats":
            st = manifest.get("latent_stats") or {}
            if not st.get("mean") or not st.get("std"):
                raise ValueError(f"{store}: --latent-norm stats needs latent_stats (mean, std) in the manifest; "
                                 "this store has none; use --latent-norm sd")
            std = [float(v) for v in st["std"]]
            if min(std) <= 0:
                raise ValueError(f"{store}: latent_stats std has a non-positive entry {std}")
            return cls("stats", [1.0 / v for v in std], [float(v) for v in st["mean"]])
        raise ValueError(f"unknown --latent-norm {mode!r}; expected one of {cls.MODES}")

    def _shaped(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = t.to(like.device, like.dtype)
        return t.reshape(1, -1, 1, 1) if t.numel() > 1 else t.reshape(())

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._shaped(self.bias, z)) * self._shaped(self.scale, z)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x / self._shaped(self.scale, x) + self._shaped(self.bias, x)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "scale": self.scale.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentNorm":
        return cls(d["mode"], d["scale"], d["bias"])
