"""The training loop: SiT + flow matching + representation alignment, from a store or online.

One step (REPA's recipe): for the global batch of ``B`` samples draw, from a generator seeded by
``(seed, step)``, the posterior noise, the times, the interpolation noise and the label-dropout
mask; each rank takes the rows of its slice of the global batch. So a run on N ranks sees the
same numbers as a 1-process run with the same global batch, and a resumed run the same numbers
as an unbroken one. Latents are ``z = mean + std * noise`` (on the device), scaled by
:class:`trainer.data.LatentNorm`; the loss is ``mean MSE(v, eps - x) + proj_coeff * alignment``.

AdamW (lr 1e-4, betas 0.9/0.999, no weight decay), grad-norm clip 1.0, EMA 0.9999, bf16 autocast
on CUDA, optional ``torch.compile``, gradient accumulation, DDP under torchrun (gloo on CPU,
nccl on GPU). Checkpoints are atomic and pickle-free (:mod:`trainer.checkpoint`); metrics go to
``<out>/metrics.jsonl`` (and TensorBoard with ``tensorboard=True``); a sample grid PNG is written
every ``sample_every`` steps when the store's VAE can be loaded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from irepa.trainer.align import AlignmentLoss, resolve_align
from irepa.trainer.checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint,
                                save_checkpoint)
from irepa.trainer.data import LatentNorm, LoaderSpec, StoreLoader, mix_seed, sample_posterior
from irepa.trainer.loss import FlowMatching, mean_flat

__all__ = ["TrainConfig", "Dist", "setup_distributed", "Objective", "StepDraws", "run", "split_list",
           "update_ema", "save_image_grid", "load_foreign_checkpoint"]


# ----------------------------------------------------------------------------- config


def split_list(value: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` / ``("a", "b")`` / None (fire passes any of them) -> list or None."""
    from irepa.pipeline.build import split_names

    return None if value is None else split_names(value)


@dataclass
class TrainConfig:
    """Every ``irepa-train`` flag (see ``trainer.cli.train`` for the documentation)."""

    cache: str | None = None
    model: str = "SiT-B/2"
    align: str = "irepa"
    proj_coeff: float | None = None
    projector: str | None = None
    projector_kernel: int | None = None
    projector_dim: int | None = None
    spatial_norm: str | None = None
    gamma: float | None = None
    encoder_depth: int | None = None
    encoders: list[str] | None = None
    batch_size: int = 256
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps: int = 400_000
    grad_accum: int = 1
    ema: float = 0.9999
    seed: int = 0
    out: str | None = None
    ckpt_every: int = 50_000
    sample_every: int = 10_000
    log_every: int = 100
    compile: bool = False
    online: bool = False
    data: str | None = None
    vae: str | None = None
    encoder_weights: str | None = None
    resume: bool | None = None
    init_from: str | None = None
    num_workers: int = 4
    latent_norm: str = "sd"
    time_sampler: str = "uniform"
    path_type: str = "linear"
    device: str = "auto"
    precision: str = "bf16"
    class_dropout: float = 0.1
    qk_norm: bool = False
    attn: str = "sdpa"
    fused_align: bool = True
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    verify: bool = False
    shuffle_buffer: int = 1000
    resolution: int = 256
    sample_n: int = 16
    sample_steps: int = 50
    sample_method: str = "ode"
    sample_cfg: float = 1.0
    tensorboard: bool = False
    progress: bool = True

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def run_name(self) -> str:
        store = Path(self.cache).name if self.cache else (Path(self.data).name if self.data else "online")
        raw = f"{self.model}-{store}-{self.align}"
        return re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).strip("-")


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; start the process group (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


def _barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def _broadcast_error(d: Dist, err: BaseException | None) -> None:
    """Make every rank fail together (with rank 0's message) instead of hanging in a collective."""
    if not d.enabled:
        if err is not None:
            raise err
        return
    flag = torch.tensor([0 if err is None else 1], device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(flag)
    if int(flag.item()):
        if err is not None:
            raise err
        raise RuntimeError("another rank failed before training started (see its message)")


# ----------------------------------------------------------------------------- numerics


class StepDraws:
    """All randomness of one global step, drawn for the global batch from ``(seed, step)``."""

    def __init__(self, seed: int, fm: FlowMatching, latent_shape: tuple[int, int, int],
                 class_dropout: float, device: torch.device):
        self.seed, self.fm, self.shape = seed, fm, tuple(latent_shape)
        self.p_drop, self.device = class_dropout, device

    def draw(self, step: int, batch: int) -> dict[str, torch.Tensor]:
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed("step", self.seed, int(step)))
        post = torch.randn((batch, *self.shape), generator=g, device=self.device)
        t = self.fm.sample_t(batch, self.device, g)
        eps = torch.randn((batch, *self.shape), generator=g, device=self.device)
        drop = torch.rand(batch, generator=g, device=self.device) < self.p_drop
        return {"post": post, "t": t, "eps": eps, "drop": drop}


class Objective(nn.Module):
    """Model + alignment in one module (what DDP wraps): returns the total loss and its parts.

    ``forward(x, t, eps, y, drop, targets)``: ``x`` normalised clean latents, ``t``/``eps`` the
    interpolation draw, ``drop`` the label-dropout mask, ``targets`` one feature tensor per
    encoder. The same code serves the cache and ``--online`` runs.
    """

    def __init__(self, model: nn.Module, fm: FlowMatching, align: AlignmentLoss | None, coeff: float,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.fm = fm
        self.align = align
        self.coeff = float(coeff)
        self.autocast_dtype = autocast_dtype

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, y: torch.Tensor,
                drop: torch.Tensor, targets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x_t, target = self.fm.interpolate(x, eps, t)
        with self._autocast(x.device):
            v, h = self.model(x_t, t.to(x.dtype), y, force_drop_ids=drop.long())
            mse = mean_flat((v.float() - target.float()) ** 2).mean()
            if self.align is not None and h is not None:
                a = self.align(h, targets)
                align_loss, cosine = a["loss"].float(), a["cosine"].float()
            else:
                align_loss = torch.zeros((), device=x.device)
                cosine = torch.zeros((), device=x.device)
        loss = mse + self.coeff * align_loss
        return {"loss": loss, "mse": mse.detach(), "align": align_loss.detach(), "cosine": cosine.detach()}


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied."""
    ep = [p for p in ema.parameters()]
    mp = [p.detach() for p in model.parameters()]
    if ep:
        torch._foreach_lerp_(ep, mp, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


# ----------------------------------------------------------------------------- io helpers


def save_image_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
    """uint8 images [N, 3, H, W] (or [N, H, W, 3]) -> one PNG grid, written atomically."""
    from PIL import Image

    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"expected images [N, 3, H, W]; got shape {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    arr = arr.astype(np.uint8)
    n, h, w, _ = arr.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.zeros((rows * h, nrow * w, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def load_foreign_checkpoint(path: str | Path) -> dict:
    """Load a REPA / iREPA release or training checkpoint with ``weights_only=True``.

    Their training checkpoints keep ``args`` as an ``argparse.Namespace``; it is allow-listed
    (no other Python object is), so the load stays pickle-free for anything else.
    """
    import argparse

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "format" in obj and "model" in obj:  # our own checkpoint
        return {k: obj[k] for k in ("model", "ema") if obj.get(k) is not None}
    return obj


class MetricsLog:
    """JSON lines in ``<out>/metrics.jsonl`` (rank 0); on resume, lines after the resumed step go."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool = False):
        self.path = out / "metrics.jsonl"
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= start_step:
                        keep.append(line)
                except (ValueError, AttributeError):
                    continue
            self.path.write_text("".join(k + "\n" for k in keep))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception as e:  # noqa: BLE001
                print(f"[irepa-train] tensorboard unavailable ({e}); logging JSON lines only", flush=True)

    def write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- batch sources


class CacheSource:
    """Micro-batches from a store, moved to the device: (posterior latents, features, labels)."""

    def __init__(self, reader: Any, encoders: list[str], spec: LoaderSpec, steps: int, state: dict | None,
                 num_workers: int, device: torch.device):
        self.reader = reader
        kind = reader.loader_kind
        counts = reader.shard_sample_counts() if kind == "stream" else None
        self.loader = StoreLoader(reader.path, kind=kind, num_samples=len(reader), spec=spec, encoders=encoders,
                                  steps=steps, state=state, num_workers=num_workers, shard_counts=counts,
                                  pin_memory=device.type == "cuda")
        self.encoders = encoders
        self.device = device
        self.num_samples = len(reader)

    def __iter__(self) -> Iterator[dict]:
        nb = self.device.type == "cuda"
        for b in self.loader:
            yield {
                "latents": b["latents"].to(self.device, non_blocking=nb),
                "features": [b["features"][e].to(self.device, non_blocking=nb) for e in self.encoders],
                "label": b["label"].to(self.device, non_blocking=nb),
                "index": b["index"],
            }

    def state_after(self, steps_done: int) -> dict:
        return self.loader.state_after(steps_done)


# ----------------------------------------------------------------------------- run


def _log(d: Dist, msg: str, out: Path | None = None) -> None:
    if not d.main:
        return
    line = f"[irepa-train] {msg}"
    print(line, flush=True)
    if out is not None:
        with open(out / "log.txt", "a") as f:
            f.write(line + "\n")


def _model_kwargs(cfg: TrainConfig, align_cfg, in_channels: int, input_size: tuple[int, int],
                  num_classes: int, z_dims: list[int]) -> dict:
    kw: dict[str, Any] = dict(
        input_size=int(input_size[0]) if input_size[0] == input_size[1] else list(input_size),
        in_channels=int(in_channels), num_classes=int(num_classes), encoder_depth=align_cfg.encoder_depth,
        z_dims=list(z_dims), projector=align_cfg.projector, projector_kernel=align_cfg.kernel,
        projector_dim=align_cfg.projector_dim, qk_norm=cfg.qk_norm, class_dropout_prob=cfg.class_dropout,
        attn=cfg.attn)
    for k in ("hidden_size", "depth", "num_heads", "patch_size"):
        v = getattr(cfg, k)
        if v is not None:
            kw[k] = int(v)
    return kw


def _build_model(name: str, kwargs: dict) -> nn.Module:
    from irepa.trainer.models import build_sit
    return build_sit(name, **kwargs)


def _patch_of(name: str, kw: dict) -> int:
    from irepa.trainer.models import SIT_CONFIGS
    if kw.get("patch_size"):
        return int(kw["patch_size"])
    if name not in SIT_CONFIGS:
        raise ValueError(f"unknown SiT model {name!r}; expected one of {sorted(SIT_CONFIGS)}")
    return int(SIT_CONFIGS[name]["patch_size"])


def _hw(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _needs_from_config(mc: dict, what: str):
    from irepa.trainer.store_checks import ModelNeeds
    name = mc.get("name", "SiT")
    return ModelNeeds(name=what, in_channels=int(mc["in_channels"]), input_size=_hw(mc["input_size"]),
                      patch_size=_patch_of(name, mc))


def _needs_from_state(sd: Any, model_kw: dict, name: str, source: str):
    """What a REPA/iREPA/irepa checkpoint's weights need: channels and patch from the patch
    embedding, the token count from ``pos_embed``."""
    from irepa.trainer.store_checks import ModelNeeds
    flat = sd
    if isinstance(sd, dict) and ("ema" in sd or "model" in sd):
        flat = sd.get("ema") or sd.get("model")
    w = None
    pos = None
    for k, v in (flat or {}).items():
        if k.endswith("x_embedder.proj.weight"):
            w = v
        if k.endswith("pos_embed"):
            pos = v
    if w is None:
        return _needs_from_config({"name": name, **model_kw}, name)
    c, p = int(w.shape[1]), int(w.shape[2])
    size = _hw(model_kw["input_size"])
    if pos is not None:
        side = math.isqrt(int(pos.shape[1]))
        if side * side == int(pos.shape[1]):
            size = (side * p, side * p)
    return ModelNeeds(name=f"{name} from {source}", in_channels=c, input_size=size, patch_size=p)


def _config_diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in keys
            if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def run(cfg: TrainConfig, *, online_models: dict | None = None) -> dict:
    """Train as ``cfg`` says; returns ``{"out", "step", "last"}`` (last logged metrics).

    ``online_models`` (tests, notebooks): ``{"vae": VaeEncoder, "encoders": {name: Encoder}}`` used
    by ``--online`` instead of loading them by name.
    """
    d = setup_distributed(cfg.device)
    try:
        return _run(cfg, d, online_models)
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, d: Dist, online_models: dict | None) -> dict:
    from irepa.trainer.store_checks import ModelNeeds, check_store, check_store_state, verify

    if cfg.cache is None and not cfg.online:
        raise ValueError("irepa-train needs --cache STORE (or --online with --data IMAGES / a store)")
    if cfg.steps < 0 or cfg.batch_size < 1:
        raise ValueError(f"--steps must be >= 0 and --batch-size >= 1; got {cfg.steps}, {cfg.batch_size}")
    if cfg.precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision must be bf16 or fp32; got {cfg.precision!r}")
    out = Path(cfg.out or Path("runs") / cfg.run_name())
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(d)

    # ---- resume decision
    ckpt_file = latest_checkpoint(out)
    if cfg.resume is False and ckpt_file is not None:
        raise ValueError(f"{out} already holds checkpoints (latest {ckpt_file.name}) and --resume False was given; "
                         "choose a new --out or drop --resume False to continue the run")
    if cfg.resume and ckpt_file is None:
        _log(d, f"--resume: no checkpoint in {out}; starting from step 0", out)
    ckpt = load_checkpoint(ckpt_file) if (ckpt_file is not None and cfg.resume is not False) else None

    # ---- data: the store (also the source of shapes for --online when given)
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
        _broadcast_error(d, err)

    align_cfg = resolve_align(cfg.align, coeff=cfg.proj_coeff, projector=cfg.projector, kernel=cfg.projector_kernel,
                              spatial_norm=cfg.spatial_norm, gamma=cfg.gamma, encoder_depth=cfg.encoder_depth,
                              projector_dim=cfg.projector_dim)
    use_align = cfg.align != "none"

    online = None
    if cfg.online:
        from irepa.trainer.online import OnlineSource
        online = OnlineSource.create(cfg, reader, d, online_models)
        latent_shape = online.latent_shape  # (2C, h, w)
        available = online.encoders
        feature_dims = online.feature_dims
        num_classes = online.num_classes
        manifest_like = online.manifest_like()
    else:
        latent_shape = tuple(reader.latent_shape)
        available = list(reader.encoders)
        feature_dims = dict(reader.feature_dims)
        num_classes = int((reader.manifest.get("dataset") or {}).get("num_classes") or 1000)
        manifest_like = reader.manifest

    encoders = (split_list(cfg.encoders) or list(available)) if use_align else []
    missing = [e for e in encoders if e not in available]
    if missing:
        where = cfg.cache or cfg.data
        raise ValueError(f"encoder(s) {missing} requested with --encoders are not in {where} "
                         f"(it has {list(available)})")
    if use_align and not encoders:
        raise ValueError(f"--align {cfg.align} needs encoder features but {cfg.cache or cfg.data} has none; "
                         "use --align none or build the store with an encoder")
    if online is not None:
        online.select(encoders)
    z_dims = [int(feature_dims[e]) for e in encoders]
    C = latent_shape[0] // 2
    hw = (int(latent_shape[1]), int(latent_shape[2]))

    # ---- model and the checks before step 0
    model_kw = _model_kwargs(cfg, align_cfg, C, hw, num_classes, z_dims)
    init_sd = load_foreign_checkpoint(cfg.init_from) if (cfg.init_from and ckpt is None) else None
    if reader is not None and not cfg.online:
        # the store must fit the model the run will train: the checkpoint's when resuming, the
        # init checkpoint's patch embedding when given, else the one the flags describe
        if ckpt is not None:
            needs = _needs_from_config(ckpt["model_config"], f"{ckpt['model_config'].get('name')} ({ckpt_file})")
        elif init_sd is not None:
            needs = _needs_from_state(init_sd, model_kw, cfg.model, str(cfg.init_from))
        else:
            needs = _needs_from_config({"name": cfg.model, **model_kw}, cfg.model)
        check_store(reader, dataclasses.replace(needs, encoders=encoders, z_dims=z_dims, num_classes=num_classes))
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg.model, model_kw).to(d.device)
    model_config = dict(model.build_kwargs)
    if ckpt is not None:
        diff = _config_diff(ckpt["model_config"], model_config)
        if diff:
            raise ValueError(f"cannot resume {ckpt_file}: the run now asks for a different model ("
                             + "; ".join(diff) + "); pass the flags of the original run or a new --out")
    if online is not None:
        online.check(model, encoders)

    latent_norm = LatentNorm.from_manifest(manifest_like, cfg.latent_norm, str(cfg.cache or cfg.data))

    ema = copy.deepcopy(model).requires_grad_(False)
    fm = FlowMatching(cfg.path_type, cfg.time_sampler)
    align = AlignmentLoss(model.projectors, align_cfg, fused=cfg.fused_align) if use_align else None
    amp = torch.bfloat16 if (d.device.type == "cuda" and cfg.precision == "bf16") else None
    objective = Objective(model, fm, align, align_cfg.coeff if use_align else 0.0, amp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    start_step = 0
    data_state = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step = int(ckpt["step"])
        data_state = ckpt["data_state"] or None
        from irepa.trainer.checkpoint import restore_rng_state
        restore_rng_state(ckpt["rng"])
        _log(d, f"resumed {ckpt_file} at step {start_step}", out)
    elif cfg.init_from:
        from irepa.trainer.models import load_reference_state_dict
        info = load_reference_state_dict(model, init_sd, prefer="ema", strict=False, source=str(cfg.init_from))
        ema.load_state_dict(model.state_dict())
        _log(d, f"initialised from {cfg.init_from} (missing: {info['missing']}, unexpected: {info['unexpected']})",
             out)

    spec = LoaderSpec(global_batch=cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                      grad_accum=cfg.grad_accum, flip=bool(reader is not None and reader.has_flip and not cfg.online)
                      or bool(online is not None and online.flip), shuffle_buffer=cfg.shuffle_buffer)
    remaining = max(0, cfg.steps - start_step)
    if online is not None:
        source = online.batches(spec, remaining, data_state, cfg.num_workers)
    else:
        source = CacheSource(reader, encoders, spec, remaining, data_state, cfg.num_workers, d.device)

    runner: nn.Module = objective
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        runner = DDP(objective, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                     broadcast_buffers=False)
    if cfg.compile:
        runner = torch.compile(runner)

    draws = StepDraws(cfg.seed, fm, (C, *hw), cfg.class_dropout, d.device)
    args_json = cfg.to_json()
    extra = {"latent_norm": json.dumps(latent_norm.to_dict()),
             "vae": json.dumps((manifest_like.get("vae") or {})),
             "encoders": json.dumps(encoders), "store": str(cfg.cache or "")}
    metrics = MetricsLog(out, start_step, cfg.tensorboard) if d.main else None
    if d.main:
        (out / "args.json").write_text(json.dumps(args_json, indent=2, sort_keys=True) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        _log(d, f"{cfg.model} ({n_params / 1e6:.2f}M params) | align {align_cfg.preset if use_align else 'none'} "
                f"| encoders {encoders} | {'online' if cfg.online else reader.format + ' store ' + str(reader.path)} "
                f"| batch {cfg.batch_size} = {d.world_size} ranks x {cfg.grad_accum} accum x {spec.micro} "
                f"| steps {start_step} -> {cfg.steps} | out {out}", out)

    def save(step: int) -> None:
        if not d.main:
            return
        p = save_checkpoint(checkpoint_path(out, step), step=step, model=model.state_dict(), ema=ema.state_dict(),
                            optimizer=opt.state_dict(), args=args_json, model_config=model_config,
                            data_state=source.state_after(step - start_step), extra=extra)
        _log(d, f"checkpoint {p}", out)

    sampler = _PreviewSampler(cfg, manifest_like, latent_norm, ema, (C, *hw), num_classes, out, d)

    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, unit="it", dynamic_ncols=True, file=sys.stderr)

    last: dict = {}
    window = torch.zeros(5, dtype=torch.float64, device=d.device)  # loss, mse, align, cosine, grad norm
    window_steps = 0
    t_window = time.perf_counter()
    it = None  # the loader starts on the first step (none when the run is already finished)
    model.train()
    step = start_step
    rb, mb = spec.rank_batch, spec.micro
    try:
        while step < cfg.steps:
            g_draw = draws.draw(step, cfg.batch_size)
            opt.zero_grad(set_to_none=True)
            parts = torch.zeros(4, dtype=torch.float64, device=d.device)
            if it is None:
                it = iter(source)
            for m in range(cfg.grad_accum):
                batch = next(it)
                lo = d.rank * rb + m * mb
                sl = slice(lo, lo + mb)
                if batch["latents"].shape[0] != mb:
                    raise RuntimeError(f"loader gave {batch['latents'].shape[0]} samples, expected {mb}")
                x = latent_norm.normalize(sample_posterior(batch["latents"].float(), g_draw["post"][sl]))
                sync = m == cfg.grad_accum - 1 or not d.enabled
                ctx = contextlib.nullcontext() if sync else runner.no_sync()
                with ctx:
                    res = runner(x, g_draw["t"][sl], g_draw["eps"][sl], batch["label"], g_draw["drop"][sl],
                                 batch["features"])
                    (res["loss"] / cfg.grad_accum).backward()
                parts += torch.stack([res["loss"].detach(), res["mse"], res["align"], res["cosine"]]).double()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            update_ema(ema, model, cfg.ema)
            step += 1
            window[:4] += parts / cfg.grad_accum
            window[4] += grad_norm.double()
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if step % max(1, cfg.log_every) == 0 or step == cfg.steps:
                vals = window / window_steps
                if d.enabled:
                    dist.all_reduce(vals)
                    vals /= d.world_size
                vals = vals.tolist()
                dt = max(time.perf_counter() - t_window, 1e-9)
                rec = {"step": step, "loss": vals[0], "mse": vals[1], "align_loss": vals[2], "cosine": vals[3],
                       "grad_norm": vals[4], "lr": opt.param_groups[0]["lr"], "steps_per_s": window_steps / dt,
                       "img_per_s": window_steps * cfg.batch_size / dt,
                       "epoch": (step * cfg.batch_size) / max(1, getattr(source, "num_samples", 1))}
                last = rec
                if metrics is not None:
                    metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{vals[0]:.4f}", cos=f"{vals[3]:.3f}", img_s=f"{rec['img_per_s']:.1f}")
                window.zero_()
                window_steps = 0
                t_window = time.perf_counter()
            if cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0 and step < cfg.steps:
                save(step)
            if cfg.sample_every > 0 and step % cfg.sample_every == 0:
                sampler.maybe_sample(step)
        if step > start_step or (ckpt is None and cfg.steps == 0):
            save(step)
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        del it
    _barrier(d)
    return {"out": str(out), "step": step, "last": last}


# ----------------------------------------------------------------------------- preview samples


def load_vae_offline(vae_id: str, device: torch.device | str = "cpu"):
    """``pipeline.vae.load_vae`` without touching the network: "tiny", a local folder, or a hub id
    already in the local hub cache; anything else raises at once (no download, no retries)."""
    from irepa.pipeline.vae import load_vae

    return load_vae(vae_id, device=device, local_files_only=True)


class _PreviewSampler:
    """EMA samples of fixed noise and labels, decoded with the store's VAE, as a PNG grid.

    The VAE is loaded on first use through ``pipeline.vae.load_vae``; when that fails (offline,
    no hub cache) one log line says so and previews are skipped for the rest of the run.
    """

    def __init__(self, cfg: TrainConfig, manifest: dict, latent_norm: LatentNorm, ema: nn.Module,
                 latent_shape: tuple[int, int, int], num_classes: int, out: Path, d: Dist):
        self.cfg, self.manifest, self.norm, self.ema = cfg, manifest, latent_norm, ema
        self.shape, self.num_classes, self.out, self.d = latent_shape, num_classes, out, d
        self.vae = None
        self.disabled = False

    def _load_vae(self):
        vae_id = self.cfg.vae or (self.manifest.get("vae") or {}).get("id")
        if not vae_id:
            raise RuntimeError("the store's manifest names no VAE")
        return load_vae_offline(str(vae_id), self.d.device)

    def maybe_sample(self, step: int) -> Path | None:
        if not self.d.main or self.disabled:
            return None
        if self.vae is None:
            try:
                self.vae = self._load_vae()
            except Exception as e:  # noqa: BLE001 - any failure: skip previews with one log line
                self.disabled = True
                _log(self.d, f"sample previews off: cannot load the VAE offline ({type(e).__name__}: {e})", self.out)
                return None
        from irepa.trainer.sample import sample

        n = max(1, self.cfg.sample_n)
        g = torch.Generator(device="cpu").manual_seed(mix_seed("preview", self.cfg.seed))
        z = torch.randn((n, *self.shape), generator=g).to(self.d.device)
        y = (torch.arange(n) % self.num_classes).to(self.d.device)
        gen = torch.Generator(device=self.d.device).manual_seed(mix_seed("preview-sde", self.cfg.seed))
        x = sample(self.ema, z, y, method=self.cfg.sample_method, steps=self.cfg.sample_steps,
                   cfg_scale=self.cfg.sample_cfg, generator=gen, path=self.cfg.path_type)
        images = self.vae.decode(self.norm.denormalize(x.float()))
        p = save_image_grid(images, self.out / "samples" / f"{step:07d}.png")
        _log(self.d, f"samples {p}", self.out)
        return p
