"""The training loop: any objective (``--objective``), from a store or ``--online``.

Set-up, then a loop that reads top to bottom like DiT's. All per-step randomness comes from a
generator seeded by ``(seed, step)`` and is drawn for the *global* batch by the objective; each
rank takes its rows, so N ranks reproduce a 1-rank run with the same global batch and a resumed
run an unbroken one. Each of the objective's phases is wrapped in DDP, accumulates
``grad_accum`` micro-batches, clips its gradients and steps its AdamW (lr / betas / weight decay
of the run, optional ``--blr`` scaling and linear warm-up); then every EMA of the model moves.
Checkpoints are atomic and pickle-free (:mod:`irepa.trainer.checkpoint`); metrics go to
``<out>/metrics.jsonl``; a preview grid every ``--sample-every`` steps.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from irepa.pipeline import dist as distributed
from irepa.stores.manifest import atomic_write_bytes
from irepa.trainer.align import resolve_align
from irepa.trainer.checkpoint import (checkpoint_path, clean_temporaries, latest_checkpoint, load_checkpoint,
                                      load_foreign_checkpoint, restore_rng_state, save_checkpoint)
from irepa.trainer.config import ALIGN_FIELDS, TrainConfig, require_extras, resolve_train, train_to_json
from irepa.trainer.data import LoaderSpec, mix_seed
from irepa.trainer.objectives import get_objective
from irepa.trainer.resume import check_resume
from irepa.trainer.run_data import open_run_data
from irepa.trainer.run_log import MetricsLog, RunLog
from irepa.trainer.sample import PreviewSampler

__all__ = ["TrainConfig", "run", "update_ema", "draw_rows", "DRAW_BLOCK"]

#: rows of a step's draws made from one generator: rows [lo, hi) of the global batch come from
#: blocks k = lo // DRAW_BLOCK ... of DRAW_BLOCK rows, block k seeded by (seed, step, k)
DRAW_BLOCK = 64


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied."""
    ep = list(ema.parameters())
    if ep:
        torch._foreach_lerp_(ep, [p.detach() for p in model.parameters()], 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def draw_rows(objective: Any, seed: int, step: int, lo: int, hi: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows ``[lo, hi)`` of step ``step``'s draws for the global batch. Rows come in blocks of
    :data:`DRAW_BLOCK` seeded by ``(seed, step, block)``: a rank draws only the blocks its rows lie
    in (not the whole global batch: JiT's pixel noise at batch 1024 would be 0.8 GB per rank),
    and any split of the batch over ranks and micro-batches sees the same numbers per row."""
    k0, k1 = lo // DRAW_BLOCK, (hi - 1) // DRAW_BLOCK + 1
    parts = []
    for k in range(k0, k1):
        g = torch.Generator(device=device).manual_seed(mix_seed("step", seed, step, k))
        parts.append(objective.draw(DRAW_BLOCK, g, device))
    off = lo - k0 * DRAW_BLOCK
    return {key: torch.cat([p[key] for p in parts])[off:off + hi - lo] for key in parts[0]}


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The differing leaves of two JSON configs (``key.sub: checkpoint X vs now Y``), nested dicts
    compared key by key and long values shortened, so the message names what changed."""
    def short(v: Any) -> str:
        r = repr(v)
        return r if len(r) <= 80 else r[:76] + " ..."

    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _config_diff(x, y, f"{prefix}{k}.")
        elif json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True):
            out.append(f"{prefix}{k}: checkpoint {short(x)} vs now {short(y)}")
    return out


def run(cfg: TrainConfig, opts: Any = None, *, online_models: dict | None = None, notes: tuple = ()) -> dict:
    """Train as ``cfg`` (and the objective's options ``opts``) say; returns ``{"out", "step", "last"}``.

    ``online_models`` (tests, notebooks): ``{"vae": VaeEncoder, "encoders": {name: Encoder}}`` used
    by ``--online`` instead of loading them by name.
    """
    d = distributed.setup(cfg.device)
    try:
        return _run(cfg, opts, d, online_models, notes)
    finally:
        distributed.teardown(d)


def _resolved_args(args: dict) -> dict:
    """A checkpoint's args as this version resolves them (types and new defaults normalised)."""
    from irepa.trainer.config import objective_fields

    known = set(TrainConfig.__dataclass_fields__) | set(objective_fields(args.get("objective", "flow")))
    return train_to_json(*resolve_train(config={k: v for k, v in args.items() if k in known})[:2])


def _run(cfg: TrainConfig, opts: Any, d: distributed.Dist, online_models: dict | None, notes: tuple) -> dict:
    require_extras(cfg)
    objective_cls = get_objective(cfg.objective)
    if opts is None and objective_cls.Options is not None:
        opts = objective_cls.Options()
    out = Path(cfg.out or Path("runs") / cfg.run_name())
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(d)
    log = RunLog(d.main, out)
    for note in notes:
        log(note)

    # ---- resume decision
    ckpt_file = latest_checkpoint(out)
    if cfg.resume is False and ckpt_file is not None:
        raise ValueError(f"{out} already holds checkpoints (latest {ckpt_file.name}) and --resume false was given; "
                         "choose a new --out or drop --resume false to continue the run")
    if cfg.resume and ckpt_file is None:
        log(f"--resume: no checkpoint in {out}; starting from step 0")
    ckpt = load_checkpoint(ckpt_file) if (ckpt_file is not None and cfg.resume is not False) else None
    if d.main:
        for p in clean_temporaries(out):  # a killed run's half-written checkpoints
            log(f"removed {p.name}, a checkpoint a killed run did not finish writing")

    # ---- data, objective, model, and the checks before step 0
    data = open_run_data(cfg, d, objective_cls.inputs, online_models)
    align = None
    if cfg.align != "none":
        align = resolve_align(cfg.align, **{a: getattr(cfg, k) for k, a in ALIGN_FIELDS.items()})
    amp = torch.bfloat16 if (d.device.type == "cuda" and cfg.precision == "bf16") else None
    objective = objective_cls(cfg, opts, data.spec, align, d.device, amp)
    model_config = objective.model_config()
    init_sd = load_foreign_checkpoint(cfg.init_from) if (cfg.init_from and ckpt is None) else None
    args_json, identity = train_to_json(cfg, objective.opts), data.identity()  # options as the objective resolved them
    if cfg.sample_every > 0 or cfg.eval_every > 0:  # not at the first preview, thousands of steps in
        objective.check_sampling(cfg.sample_method, cfg.sample_steps)
    if cfg.compile:
        objective.check_compile()
    if ckpt is not None:
        diff = _config_diff(ckpt["model_config"], model_config)
        if diff:
            objective.check_data(ckpt["model_config"], data.where)  # names the store when that is the cause
            raise ValueError(f"cannot resume {ckpt_file}: the run now asks for a different model ("
                             + "; ".join(diff) + "); pass the flags of the original run or a new --out")
        check_resume({**ckpt, "args": _resolved_args(ckpt["args"])}, ckpt_file, args_json, identity)
    if init_sd is not None:
        objective.check_init(init_sd, str(cfg.init_from))
    objective.check_data(model_config, data.where)
    torch.manual_seed(cfg.seed)
    model = objective.build_model(model_config).to(d.device)
    extra = {k: m.to(d.device) for k, m in objective.extra_modules().items()}
    emas = [copy.deepcopy(model).requires_grad_(False) for _ in cfg.ema]
    phases = objective.phases(model, extra)
    lr = cfg.learning_rate()
    optimizers = {p.name: torch.optim.AdamW(p.params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
                  for p in phases}

    start_step, data_state = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        for i, ema in enumerate(emas):
            ema.load_state_dict(ckpt["ema"] if i == 0 else ckpt["emas"][i - 1])
        for name, m in extra.items():
            m.load_state_dict(ckpt["modules"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizer"] if name == phases[0].name else ckpt["optimizers"][name])
        start_step, data_state = int(ckpt["step"]), ckpt["data_state"] or None
        restore_rng_state(ckpt["rng"])
        log(f"resumed {ckpt_file} at step {start_step}")
    elif init_sd is not None:
        info = objective.load_init(model, init_sd, str(cfg.init_from), cfg.init_from_partial)
        for ema in emas:
            ema.load_state_dict(model.state_dict())
        left = f" (left out: missing {info['missing']}, unexpected {info['unexpected']})" \
            if info["missing"] or info["unexpected"] else ""
        log(f"initialised from {cfg.init_from}{left}")

    warmup = float(cfg.warmup_steps) or cfg.warmup_epochs * len(data) / cfg.batch_size  # in steps
    spec = LoaderSpec(global_batch=cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                      grad_accum=cfg.grad_accum, flip=data.flip, shuffle_buffer=cfg.shuffle_buffer)
    source = data.batches(spec, max(0, cfg.steps - start_step), data_state, cfg.num_workers, d.device,
                          on_damage="skip" if cfg.skip_damaged else "raise")
    runners: dict[str, nn.Module] = {}
    for p in phases:
        r = p.module
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            r = DDP(r, device_ids=[d.device.index] if d.device.type == "cuda" else None, broadcast_buffers=False)
        runners[p.name] = torch.compile(r) if cfg.compile else r

    extra_info = {"identity": json.dumps(identity), "latent_norm": json.dumps(data.spec.latent_norm.to_dict() if data.spec.latent_norm else None),
                  "vae": json.dumps(data.spec.vae or {}), "encoders": json.dumps(list(data.spec.encoders)),
                  "store": str(cfg.cache or ""), "data": json.dumps(data.spec.to_json()), "objective": cfg.objective}
    metrics = MetricsLog(out, start_step, cfg) if d.main else None
    if d.main:
        atomic_write_bytes(out / "args.json", (json.dumps(args_json, indent=2, sort_keys=True) + "\n").encode())
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{cfg.objective} | {cfg.model} ({n_params / 1e6:.2f}M params) | align "
            f"{align.preset if align is not None else 'none'} | encoders {list(data.spec.encoders)} | {data.describe()} "
            f"| batch {cfg.batch_size} = {d.world_size} ranks x {cfg.grad_accum} accum x {spec.micro} "
            f"| steps {start_step} -> {cfg.steps} | out {out}")

    def save(step: int) -> None:
        if not d.main:
            return
        more = {"emas": [e.state_dict() for e in emas[1:]], "modules": {k: m.state_dict() for k, m in extra.items()},
                "optimizers": {k: o.state_dict() for k, o in optimizers.items() if k != phases[0].name}}
        p = save_checkpoint(checkpoint_path(out, step), step=step, model=model.state_dict(), ema=emas[0].state_dict(),
                            optimizer=optimizers[phases[0].name].state_dict(), args=args_json,
                            model_config=model_config, data_state=source.state_after(step - start_step),
                            extra=extra_info, more=more)
        log(f"checkpoint {p}")

    preview = PreviewSampler(objective, emas[0], cfg, out, log, d.main, extra)
    fid = None
    if cfg.eval_every > 0:
        from irepa.trainer.evaluate import TrainingFid
        fid = TrainingFid(cfg, objective, emas[0], extra, log)
    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, unit="it", dynamic_ncols=True, file=sys.stderr)

    # ---- the loop
    last: dict = {}
    window: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    window_steps, t_window, t_start, wait, damaged = 0, time.perf_counter(), time.perf_counter(), 0.0, 0
    it = None  # the loader starts on the first step (none when the run is already finished)
    for m in [model, *extra.values()]:
        m.train()
    step = start_step
    mb = spec.micro
    try:
        while step < cfg.steps:
            if it is None:
                it = iter(source)
            t_wait = time.perf_counter()
            micro = [next(it) for _ in range(cfg.grad_accum)]
            wait += time.perf_counter() - t_wait
            for batch in micro:
                for msg in batch.get("damaged") or []:
                    damaged += 1
                    log(f"skipped a damaged sample (--skip-damaged): {msg}")
                n = len(batch["label"])  # mb, or fewer when --skip-damaged left samples out
                if n == 0 and cfg.skip_damaged:
                    raise ValueError(f"--skip-damaged: every sample of a micro-batch of {mb} in {data.where} "
                                     "failed its checksum; too much of the store is damaged to train on: run "
                                     f"irepa-cache verify {data.where}, then build --repair")
                if n != mb and not (cfg.skip_damaged and 0 < n < mb):
                    raise RuntimeError(f"loader gave {n} samples, expected {mb}")
            carries: list[dict] = [{"step": step} for _ in micro]  # shared by the phases of a micro-batch
            # this rank's rows of the step's draws, drawn once; micro-batch k takes its rows (cut to
            # the samples it holds when --skip-damaged left some out)
            first = d.rank * spec.rank_batch
            rank_draws = draw_rows(objective, cfg.seed, step, first, first + spec.rank_batch, d.device)
            draws = [{key: v[k * mb:k * mb + len(batch["label"])] for key, v in rank_draws.items()}
                     for k, batch in enumerate(micro)]
            lr_now = lr * min(1.0, step / warmup) if warmup > 0 else lr
            for phase in phases:
                if step % phase.every:
                    continue
                opt, runner = optimizers[phase.name], runners[phase.name]
                for group in opt.param_groups:
                    group["lr"] = lr_now
                opt.zero_grad(set_to_none=True)
                for k, batch in enumerate(micro):
                    sync = k == cfg.grad_accum - 1 or not d.enabled
                    with contextlib.nullcontext() if sync else runner.no_sync():
                        res = runner(batch, draws[k], carries[k])
                        (res["loss"] / cfg.grad_accum).backward()
                    _accumulate(window, phase.name, res, cfg.grad_accum, phases[0].name, counts, k == 0)
                clip = cfg.grad_clip if phase.grad_clip is None else phase.grad_clip
                grad_norm = torch.nn.utils.clip_grad_norm_(phase.params, clip if clip > 0 else float("inf"))
                _accumulate(window, phase.name, {"grad_norm": grad_norm}, 1, phases[0].name, counts, True)
                opt.step()
            for ema, decay in zip(emas, cfg.ema):
                update_ema(ema, model, decay)
            step += 1
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if step % max(1, cfg.log_every) == 0 or step == cfg.steps:
                rec = _log_record(window, counts, window_steps, time.perf_counter() - t_window, step, lr_now, cfg,
                                  getattr(source, "num_samples", 1), d)
                rec.update(elapsed_s=time.perf_counter() - t_start, time=time.time(),
                           data_wait_s=wait / window_steps)
                if cfg.skip_damaged:
                    rec["damaged_skipped"] = damaged  # this rank's count since the run (re)started
                if d.device.type == "cuda":
                    rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                last = rec
                if metrics is not None:
                    metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", cos=f"{rec.get('cosine', 0.0):.3f}",
                                    img_s=f"{rec['img_per_s']:.1f}")
                window, counts, window_steps, t_window, wait = {}, {}, 0, time.perf_counter(), 0.0
            if cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0 and step < cfg.steps:
                save(step)
            if cfg.sample_every > 0 and step % cfg.sample_every == 0:
                preview.maybe_sample(step)
            if fid is not None and step % cfg.eval_every == 0:
                row = fid(step)
                if metrics is not None:
                    metrics.write(row)
        if step > start_step or (ckpt is None and cfg.steps == 0):
            save(step)
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        del it
    distributed.barrier(d)
    return {"out": str(out), "step": step, "last": last}


def _accumulate(window: dict[str, torch.Tensor], phase: str, res: dict[str, torch.Tensor], n: int,
                first: str, counts: dict[str, int], new_step: bool) -> None:
    """Add a phase's logged scalars (``loss`` detached) to the window, averaged over ``n`` micro-batches;
    ``counts`` holds the steps each key was logged in (a phase with ``every`` > 1 logs on fewer).
    The first phase logs under plain names, the others as ``<phase>/<name>``."""
    for k, v in res.items():
        key = k if phase == first else f"{phase}/{k}"
        val = v.detach().double() / n
        window[key] = window[key] + val if key in window else val
        if new_step:
            counts[key] = counts.get(key, 0) + 1


def _log_record(window: dict[str, torch.Tensor], counts: dict[str, int], steps: int, dt: float, step: int, lr: float,
                cfg: TrainConfig, num_samples: int, d: distributed.Dist) -> dict:
    """One metrics.jsonl row: every logged scalar averaged over the steps of the window it was
    logged in (and over ranks)."""
    keys = sorted(window)
    vals = (torch.stack([window[k] / max(1, counts.get(k, steps)) for k in keys]) if keys
            else torch.zeros(0, dtype=torch.float64))
    if d.enabled and keys:
        import torch.distributed as dist
        dist.all_reduce(vals)
        vals /= d.world_size
    rec: dict[str, Any] = dict(zip(keys, vals.tolist()))
    dt = max(dt, 1e-9)
    rec.update(step=step, lr=lr, steps_per_s=steps / dt, img_per_s=steps * cfg.batch_size / dt,
               epoch=(step * cfg.batch_size) / max(1, num_samples))
    return rec
