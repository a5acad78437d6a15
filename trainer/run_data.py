"""What a run trains on: the store (or the ``--online`` models), described once as a DataSpec, and
the micro-batches the loop reads from it.

A batch is a dict on the device: ``latents`` (cached posterior [b, 2C, h, w]) and/or ``pixels``
(uint8 [b, 3, H, W]) as the objective's ``inputs`` ask, ``features`` (one tensor per aligned
encoder), ``label`` and ``index``. A store holding both latents and pixels serves either kind of
objective; the loader reads only what the objective asks for. Asking for what the data does not
hold is refused before step 0 (the objective's ``check_data`` names the store and the fix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from irepa.pipeline import dist as distributed
from irepa.trainer.data import LatentNorm, LoaderSpec, StoreLoader
from irepa.trainer.objectives.base import DataSpec

__all__ = ["RunData", "Target", "open_run_data", "CacheSource"]


class CacheSource:
    """Micro-batches from a store, moved to the device."""

    def __init__(self, reader: Any, targets: Sequence[Any], spec: LoaderSpec, steps: int, state: dict | None,
                 num_workers: int, device: torch.device, inputs: Sequence[str] = ("latents",),
                 on_damage: str = "raise"):
        self.reader = reader
        kind = reader.loader_kind
        counts = reader.shard_sample_counts() if kind == "stream" else None
        self.targets = [t if isinstance(t, Target) else Target(t, t) for t in targets]
        encoders = list(dict.fromkeys(t.array for t in self.targets))  # each stored array read once
        self.inputs = tuple(inputs)
        load = self.inputs + (("cls",) if any(t.transform != "none" for t in self.targets) else ())
        self.loader = StoreLoader(reader.path, kind=kind, num_samples=len(reader), spec=spec, encoders=encoders,
                                  steps=steps, state=state, num_workers=num_workers, shard_counts=counts,
                                  pin_memory=device.type == "cuda", inputs=load, on_damage=on_damage)
        self.encoders = encoders
        self.device = device
        self.num_samples = len(reader)

    def __iter__(self) -> Iterator[dict]:
        nb = self.device.type == "cuda"
        for b in self.loader:
            out = {
                "features": [self._target(b, t, nb) for t in self.targets],
                "label": b["label"].to(self.device, non_blocking=nb),
                "index": b["index"],
                "damaged": b.get("damaged", []),
            }
            for k in self.inputs:
                out[k] = b[k].to(self.device, non_blocking=nb)
            yield out

    def _target(self, b: dict, t: "Target", nb: bool) -> torch.Tensor:
        f = b["features"][t.array].to(self.device, non_blocking=nb)
        if t.transform == "none":
            return f
        from irepa.pipeline.encoders import feature_transform

        cls = b["cls"][t.array].to(self.device, non_blocking=nb)
        return feature_transform(t.transform)(f.float(), cls.float())

    def state_after(self, steps_done: int) -> dict:
        return self.loader.state_after(steps_done)


@dataclass
class RunData:
    """The opened data of a run: its DataSpec plus what makes batches."""

    spec: DataSpec
    reader: Any = None          # StoreReader of --cache
    online: Any = None          # OnlineSource of --online
    flip: bool = False
    inputs: tuple[str, ...] = ("latents",)  # what batches carry: the objective's inputs the data holds
    targets: list = field(default_factory=list)  # Target per aligned encoder, in spec.encoders order

    def __len__(self) -> int:
        """Samples per epoch."""
        return len(self.online.rows) if self.online is not None else len(self.reader)

    @property
    def where(self) -> str:
        return self.spec.store

    def identity(self) -> dict[str, Any]:
        """What the run trains on, by content: the dataset fingerprint and each aligned encoder's
        timm id and weights hash (a resume must see the same, wherever the store lives now)."""
        if self.reader is not None:
            m = self.reader.manifest
            fp, encs, where = m["dataset"]["fingerprint"], m.get("encoders") or {}, str(self.reader.path)
        else:
            from irepa.stores import dataset_fingerprint

            fp = dataset_fingerprint(self.online.source.keys)
            encs = {n: {"timm_id": e.timm_id, "weights_sha256": e.weights_sha256()}
                    for n, e in self.online.encoder_models.items()}
            where = str(getattr(self.online, "data", "online"))
        return {"store": where, "fingerprint": fp,
                "encoders": {t.label: {"timm_id": (encs.get(t.array) or {}).get("timm_id"),
                                       "weights_sha256": (encs.get(t.array) or {}).get("weights_sha256")}
                             for t in self.targets}}

    def describe(self) -> str:
        if self.online is not None:
            return "online"
        return f"{self.reader.format} store {self.reader.path}"

    def batches(self, spec: LoaderSpec, steps: int, state: dict | None, num_workers: int,
                device: torch.device, on_damage: str = "raise") -> Any:
        """An iterable of this rank's micro-batches with ``state_after(steps_done)``; with
        ``on_damage="skip"`` damaged samples are left out and listed in ``batch["damaged"]``."""
        if self.online is not None:
            return self.online.batches(spec, steps, state, num_workers)
        return CacheSource(self.reader, self.targets, spec, steps, state, num_workers, device,
                           inputs=self.inputs, on_damage=on_damage)


@dataclass(frozen=True)
class Target:
    """One alignment target: its name (as the user asked: ``dinov2mixed-vit-b``), the store's
    feature array it reads (``dinov2-vit-b``) and the feature transform applied on the device."""

    label: str
    array: str
    transform: str = "none"


def _select(available: Sequence[str], wanted: list[str] | None, aligning: bool, where: str, align: str,
            has_cls: Any = None, requested: dict[str, str] | None = None) -> list[Target]:
    """The alignment targets: ``--encoders`` (default every stored encoder, under the name it was
    built as: a store built with ``--encoder dinov2mixed-vit-b --cls`` aligns to that mix). A name
    the store lacks may be an official name of a feature transform over a stored encoder
    (``dinov2mixed-vit-b``: 0.1 CLS + 0.9 patch tokens of ``dinov2-vit-b``, which must store CLS)."""
    requested = requested or {}
    names = (list(wanted) if wanted else [requested.get(e, e) for e in available]) if aligning else []
    targets, missing = [], []
    for n in names:
        if n in available:
            targets.append(Target(n, n))
            continue
        from irepa.pipeline.encoders import canonical_encoder_name, feature_transform_name

        try:
            base, kind = canonical_encoder_name(n), feature_transform_name(n)
        except ValueError:
            base, kind = None, "none"
        if base in available and kind != "none":
            if has_cls is None or not has_cls(base):
                raise ValueError(f"--encoders {n} mixes the CLS token into {base}'s patch tokens, but {where} stores "
                                 f"no CLS token for {base}; rebuild it with --cls")
            targets.append(Target(n, base, kind))
        elif base in available:
            targets.append(Target(n, base))
        else:
            missing.append(n)
    if missing:
        raise ValueError(f"encoder(s) {missing} requested with --encoders are not in {where} (it has {list(available)})")
    if aligning and not targets:
        raise ValueError(f"--align {align} needs encoder features but {where} has none; "
                         "use --align none or build the store with an encoder")
    return targets


def open_run_data(cfg: Any, d: distributed.Dist, inputs: Sequence[str],
                  online_models: dict | None = None) -> RunData:
    """Open ``--cache`` (checked complete; ``--verify`` recomputes checksums) and/or the ``--online``
    models, and describe what the run trains on. Every rank fails together on a bad store."""
    from irepa.trainer.store_checks import check_store_state, verify

    if cfg.cache is None and not cfg.online:
        raise ValueError("irepa-train needs --cache STORE (or --online with --data IMAGES / a store)")
    reader = None
    if cfg.cache is not None:
        from irepa.stores import open_store

        err: BaseException | None = None
        try:
            if cfg.verify and d.main:
                verify(cfg.cache)
            reader = open_store(cfg.cache)
            check_store_state(reader.path, reader.manifest)
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            err = e
        distributed.fail_together(d, err)
    aligning = cfg.align != "none"
    where = str(cfg.cache or cfg.data)
    if cfg.online:
        from irepa.trainer.online import OnlineSource

        online = OnlineSource.create(cfg, reader, d, online_models, inputs=inputs)
        targets = _select(online.encoders, cfg.encoders, aligning, where, cfg.align)
        if any(t.transform != "none" for t in targets):
            raise ValueError("--online computes encoder features as stored; a feature transform "
                             "(dinov2mixed) needs --cache")
        online.select([t.array for t in targets])
        manifest = online.manifest_like()
        latent_shape, dims, grids = online.latent_shape, online.feature_dims, online.token_grids()
        pixel_shape = online.pixel_shape
        num_classes, flip = online.num_classes, online.flip
    else:
        online = None
        manifest = reader.manifest
        targets = _select(reader.encoders, cfg.encoders, aligning, where, cfg.align,
                          has_cls=lambda e: bool((manifest["encoders"].get(e) or {}).get("cls")),
                          requested={e: v["requested_as"] for e, v in manifest["encoders"].items()
                                     if v.get("requested_as")})
        latent_shape, dims, grids = reader.latent_shape, dict(reader.feature_dims), dict(reader.token_grids)
        pixel_shape = reader.pixel_shape
        num_classes = int((manifest.get("dataset") or {}).get("num_classes") or 1000)
        flip = bool(reader.has_flip)
        if len(reader) == 0:
            from irepa.trainer.store_checks import StoreMismatchError

            reasons = ", ".join(sorted({s["reason"] for s in manifest.get("skipped") or []})[:3]) or "none listed"
            raise StoreMismatchError(f"store {reader.path} holds no samples ({manifest['num_rows']} rows, all "
                                     f"skipped: {reasons}); rebuild it from images that decode")
    norm = LatentNorm.from_manifest(manifest, cfg.latent_norm, where) if latent_shape is not None else None
    spec = DataSpec(latent_shape=tuple(int(v) for v in latent_shape) if latent_shape is not None else None,
                    pixel_shape=tuple(int(v) for v in pixel_shape) if pixel_shape is not None else None,
                    encoders=[t.label for t in targets], feature_dims=[int(dims[t.array]) for t in targets],
                    token_grids=[tuple(int(v) for v in grids[t.array]) for t in targets], num_classes=num_classes,
                    latent_norm=norm, vae=manifest.get("vae"), latent_stats=manifest.get("latent_stats"),
                    store=where)
    # read what the objective asks for and the data holds; what it lacks, check_data refuses by name
    held = {"latents": spec.latent_shape is not None, "pixels": spec.pixel_shape is not None}
    return RunData(spec, reader, online, flip, tuple(i for i in inputs if held.get(i)), targets)
