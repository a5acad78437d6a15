"""``--online``: latents and encoder features computed from images at every step (REPA's way).

The baseline the cache is measured against. Images come from ``--data`` or from the source the
store was built from (its manifest's ``build_args.data``, checked against the store's dataset
fingerprint). Each micro-batch is decoded and ADM-cropped in DataLoader workers
(``pipeline.transforms``), then on the device the VAE gives the posterior (mean, std) and every
encoder its patch tokens, exactly as ``irepa-cache build`` computes them. The batch then goes
through the same loss code as a cached one (the objective's phase module), in the same sample order
(:class:`irepa.trainer.data.IndexOrder` over the store's sample indices).

Pixel objectives (``inputs`` with ``"pixels"``: JiT, REPA-E) get the decoded ADM crop itself as
``pixels`` (uint8 [b, 3, R, R], mirrored for a flipped view, as a pixel store's loader gives it)
and no VAE is loaded unless the objective also asks for ``latents``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from irepa.pipeline.build import encoder_autocast
from irepa.trainer.data import IndexOrder, LoaderSpec

__all__ = ["OnlineSource", "ImageBatches"]

from irepa.pipeline.defaults import BUNDLED, DEFAULT_ENCODER, DEFAULT_VAE, SD_VAE_SCALE


class ImageBatches(Dataset):
    """Item ``j``: this rank's micro-batch ``j`` as ADM-cropped uint8 images [b, 3, R, R] + labels.

    Sample index ``i`` is source row ``rows[i]``; a flipped view is mirrored here.
    """

    def __init__(self, source: Any, rows: np.ndarray, resolution: int, order: IndexOrder, length: int):
        self.source, self.rows, self.resolution = source, np.asarray(rows, dtype=np.int64), int(resolution)
        self.order, self.length = order, int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> dict:
        from irepa.pipeline.transforms import DecodeError, decode_and_crop

        idx, flip = self.order.batch(j)
        images, labels = [], []
        for k, i in enumerate(idx):
            row = int(self.rows[i])
            key = self.source.keys[row]
            try:
                arr = decode_and_crop(self.source.read_bytes(row), self.resolution, name=key)
            except DecodeError as e:
                raise ValueError(f"--online: sample {i} (row {row}, {key}) cannot be decoded: {e.reason}") from e
            if flip is not None and flip[k]:
                arr = arr[:, ::-1]
            images.append(np.ascontiguousarray(arr.transpose(2, 0, 1)))
            labels.append(int(self.source.labels[row]))
        return {"image": torch.from_numpy(np.stack(images)), "label": torch.as_tensor(labels, dtype=torch.int64),
                "index": torch.as_tensor(idx, dtype=torch.int64)}


class OnlineBatches:
    """Iterable of device micro-batches ``{latents and/or pixels, features, label, index}`` plus the
    position."""

    def __init__(self, owner: "OnlineSource", spec: LoaderSpec, steps: int, state: dict | None, num_workers: int):
        state = dict(state or {})
        if state and state.get("kind", "index") != "index":
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} loader position; --online needs 'index'")
        self.owner, self.spec = owner, spec
        self.num_samples = len(owner.rows)
        self.start = int(state.get("position", 0))
        self.order = IndexOrder(self.num_samples, spec, self.start)
        self.dataset = ImageBatches(owner.source, owner.rows, owner.resolution, self.order, steps * spec.grad_accum)
        self.num_workers = int(num_workers)

    def __iter__(self) -> Iterator[dict]:
        dev = self.owner.device
        kw: dict[str, Any] = dict(batch_size=None, shuffle=False, num_workers=self.num_workers,
                                  pin_memory=dev.type == "cuda")
        want = self.owner.inputs
        for b in DataLoader(self.dataset, **kw):
            images = b["image"].to(dev, non_blocking=dev.type == "cuda")
            latents, feats = self.owner.encode(images)
            out = {"features": feats, "label": b["label"].to(dev), "index": b["index"]}
            if "latents" in want:
                out["latents"] = latents
            if "pixels" in want:
                out["pixels"] = images
            yield out

    def state_after(self, steps_done: int) -> dict:
        return {"kind": "index", "position": self.start + int(steps_done) * self.spec.global_batch,
                "num_samples": self.num_samples, "seed": self.spec.seed}


class OnlineSource:
    """Images, VAE and encoders for an ``--online`` run; see the module docstring."""

    def __init__(self, source: Any, rows: np.ndarray, resolution: int, vae: Any | None, encoders: dict[str, Any],
                 num_classes: int, device: torch.device, manifest: dict | None, flip: bool,
                 inputs: Sequence[str] = ("latents",)):
        self.source, self.rows, self.resolution = source, rows, int(resolution)
        self.vae, self.encoder_models = vae, encoders
        self.num_classes, self.device, self.manifest, self.flip = num_classes, device, manifest, flip
        self.inputs = tuple(inputs)
        self.encoders = list(encoders)
        self.feature_dims = {n: int(e.dim) for n, e in encoders.items()}
        #: (3, R, R): the decoded ADM crop, what a pixel store holds
        self.pixel_shape = (3, self.resolution, self.resolution)
        self.latent_shape: tuple[int, int, int] | None = None
        if vae is not None:
            down = int(getattr(vae, "downsample", 8))
            if self.resolution % down:
                raise ValueError(f"--online: resolution {self.resolution} is not divisible by the VAE factor {down}")
            self.latent_shape = (2 * int(vae.latent_channels), self.resolution // down, self.resolution // down)

    # -------------------------------------------------------------- construction

    @classmethod
    def create(cls, cfg: Any, reader: Any | None, d: Any, models: dict | None = None,
               inputs: Sequence[str] = ("latents",)) -> "OnlineSource":
        """Open the images (``--data``, or the store's source checked by fingerprint) and load the
        encoders, and the VAE only when ``inputs`` ask for latents."""
        from irepa.pipeline.sources import default_sample_source, open_source

        manifest = reader.manifest if reader is not None else None
        data = cfg.data
        if data is None and manifest is not None:
            data = (manifest.get("build_args") or {}).get("data")
        if data is None:
            raise ValueError("--online needs images: pass --data PATH, or --cache STORE to reuse the store's source")
        source = default_sample_source() if data == BUNDLED else open_source(data)
        if reader is not None:
            from irepa.stores import dataset_fingerprint
            fp = dataset_fingerprint(source.keys)
            want = manifest["dataset"]["fingerprint"]
            if fp != want:
                raise ValueError(f"--online: images at {data} (fingerprint {fp}) are not the ones store {reader.path} "
                                 f"was built from (fingerprint {want}); pass the original --data")
            rows = np.asarray(reader.rows, dtype=np.int64)
            resolution = int(manifest["image"]["resolution"])
            flip = bool(reader.has_flip)
        else:
            rows = np.arange(len(source), dtype=np.int64)
            resolution = int(getattr(cfg, "resolution", None) or 256)
            flip = False
        models = models or {}
        vae = None
        if "latents" in inputs:  # pixel objectives (JiT, REPA-E) need no VAE here
            vae = models.get("vae")
            if vae is None:
                from irepa.pipeline.vae import load_vae
                vae_id = cfg.vae or ((manifest or {}).get("vae") or {}).get("id") or DEFAULT_VAE
                vae = load_vae(vae_id)
            vae = vae.eval().to(d.device)
        encoders = models.get("encoders")
        if encoders is None:
            encoders = cls._load_encoders(cfg, manifest, resolution)
        encoders = {n: e.eval().to(d.device) for n, e in encoders.items()}
        if manifest is not None:
            cls._check_same_models(reader.path, manifest, vae, encoders)
        num_classes = int(((manifest or {}).get("dataset") or {}).get("num_classes")
                          or len(getattr(source, "class_names", [])) or 1000)
        return cls(source, rows, resolution, vae, encoders, num_classes, d.device, manifest, flip, inputs)

    @staticmethod
    def _load_encoders(cfg: Any, manifest: dict | None, resolution: int) -> dict:
        from irepa.pipeline.build_config import parse_weights
        from irepa.pipeline.encoders import load_encoder

        names = list(cfg.encoders or []) or (list((manifest or {}).get("encoders") or {}) or [DEFAULT_ENCODER])
        if cfg.align == "none":
            names = []
        weights = parse_weights(cfg.encoder_weights, names, flag="--encoder-weights")
        out = {}
        for n in names:
            info = ((manifest or {}).get("encoders") or {}).get(n) or {}
            conf = info.get("config")
            tiny = conf == "tiny"
            extra = conf if isinstance(conf, dict) else None
            # the store's preprocessing profile (stores without one hold native features); no store: irepa
            profile = (info.get("preprocess") or {}).get("profile", "native" if info else "irepa")
            out[n] = load_encoder(n, resolution=resolution, pretrained=n not in weights and not tiny,
                                  weights=weights.get(n), config="tiny" if tiny else extra, preprocess=profile)
        return out

    @staticmethod
    def _check_same_models(path: Path, manifest: dict, vae: Any, encoders: dict) -> None:
        """The online models must be the ones the store was built with (weights hashes)."""
        want = (manifest.get("vae") or {}).get("weights_sha256")
        if vae is not None and want and hasattr(vae, "weights_sha256") and vae.weights_sha256() != want:
            raise ValueError(f"--online: VAE {getattr(vae, 'id', '?')} has weights {vae.weights_sha256()[:12]}, "
                             f"store {path} was built with {want[:12]}")
        for n, e in encoders.items():
            info = (manifest.get("encoders") or {}).get(n)
            if info is None:
                continue
            w = info.get("weights_sha256")
            if w and hasattr(e, "weights_sha256") and e.weights_sha256() != w:
                raise ValueError(f"--online: encoder {n} has weights {e.weights_sha256()[:12]}, store {path} was "
                                 f"built with {w[:12]}; pass the same --encoder-weights")

    # -------------------------------------------------------------- use

    def select(self, names: Sequence[str]) -> None:
        """Run only these encoders, in this order (the order of the alignment targets)."""
        missing = [n for n in names if n not in self.encoder_models]
        if missing:
            raise ValueError(f"--online: encoder(s) {missing} not loaded (have {list(self.encoder_models)})")
        self.encoders = list(names)

    def token_grids(self) -> dict[str, tuple[int, int]]:
        """Token grid of every loaded encoder."""
        return {n: tuple(e.token_grid) for n, e in self.encoder_models.items()}

    def manifest_like(self) -> dict:
        """What LatentNorm and previews read from a manifest."""
        m = dict(self.manifest or {})
        if self.vae is not None:
            m.setdefault("vae", {"id": getattr(self.vae, "id", None),
                                 "scaling_factor": getattr(self.vae, "scaling_factor", SD_VAE_SCALE),
                                 "shift_factor": getattr(self.vae, "shift_factor", 0.0)})
        return m

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """uint8 images -> (posterior [b, 2C, h, w] float32, or None without a VAE, [features [b, T, D]
        float32 per encoder])."""
        images = images.to(self.device, non_blocking=self.device.type == "cuda")
        precision = ((self.manifest or {}).get("build_args") or {}).get("precision") or "bf16"
        latents = None
        with encoder_autocast(self.device, precision):  # the build's precision rule and choice
            if self.vae is not None:
                mean, std = self.vae.encode(images)
                latents = torch.cat([mean.float(), std.float()], dim=1)
            feats = [self.encoder_models[n](images)[0].float() for n in self.encoders]
        return latents, feats

    def batches(self, spec: LoaderSpec, steps: int, state: dict | None, num_workers: int) -> OnlineBatches:
        return OnlineBatches(self, spec, steps, state, num_workers)
