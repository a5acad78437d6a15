"""REPA-E objective (``--objective repae``): one step against a transcription of the release's
formulas, stop-gradients, BN statistics, learning, cross-rank batch norm, export of the tuned VAE,
sampling with it, offline LPIPS. Tiny models on CPU; the objective's phases are called directly."""

from __future__ import annotations

import copy
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irepa.trainer.align import resolve_align
from irepa.trainer.objectives import DataSpec, get_objective, objective_names
from irepa.trainer.objectives.repae import RepaeObjective, RepaeOptions, export_vae
from irepa.trainer.repae_parts import (PatchDiscriminator, SyncableBatchNorm2d, build_lpips,
                                       sit_hidden_at_depth)

REPO = Path(__file__).resolve().parents[1]
R = 32                # image size -> tiny VAE latents 4x4
ENC = ["enc-a", "enc-b"]
DIMS = [8, 12]


def make_cfg(**kw):
    base = dict(model="SiT-S/2", hidden_size=32, depth=2, num_heads=2, patch_size=1, vae="tiny",
                class_dropout=0.1, path_type="linear", time_sampler="uniform", grad_accum=1, fused_align=True)
    base.update(kw)
    return types.SimpleNamespace(**base)


def make_data(grid=(4, 4), encoders=ENC, dims=DIMS, **kw) -> DataSpec:
    return DataSpec(pixel_shape=(3, R, R), encoders=list(encoders), feature_dims=list(dims),
                    token_grids=[tuple(grid)] * len(encoders), num_classes=10, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared CPU, spinning OpenMP threads make these many small ops
    tens of times slower; the numbers asserted do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(123)
    return build_lpips("random")


def make_objective(lpips_module=None, align="repa", cfg=None, data=None, **opts) -> RepaeObjective:
    a = resolve_align(align, projector_dim=16, encoder_depth=1) if align else None
    o = RepaeOptions(**{"lpips_weights": "random", "disc_channels": 8, "disc_layers": 2, **opts})
    obj = get_objective("repae")(cfg or make_cfg(), o, data or make_data(), a, torch.device("cpu"))
    if lpips_module is not None:
        obj._lpips = lpips_module
    return obj


def build(obj: RepaeObjective, seed: int = 0):
    torch.manual_seed(seed)
    model = obj.build_model(obj.model_config())
    extra = obj.extra_modules()
    return model, extra, obj.phases(model, extra)


def fixed_pixels(n: int = 4) -> torch.Tensor:
    """The bundled photos, ADM-cropped to R px."""
    from irepa.pipeline.transforms import decode_and_crop

    files = sorted((REPO / "pipeline" / "assets" / "sample_images").rglob("*.jpg"))[:n]
    return torch.stack([torch.from_numpy(decode_and_crop(f.read_bytes(), R).copy()).permute(2, 0, 1) for f in files])


def make_batch(B: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixels": fixed_pixels(B),
            "features": [torch.randn(B, 16, d, generator=g).half() for d in DIMS],
            "label": torch.arange(B) % 10}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-5) -> None:
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).abs().max().item()
    assert err <= rtol * b.abs().max().item() + 1e-9, f"max abs diff {err} vs scale {b.abs().max().item()}"


# ----------------------------------------------------------------------------- transcription of the release


def release_proj_loss(sit, h, zs, spatial_norm: str, gamma: float):
    """``models/sit.py``: sum over encoders and images of mean_T(-cos(z, proj(h))) / (n_enc * B);
    with iREPA's zscore on the targets for the irepa presets."""
    B = h.shape[0]
    loss = torch.zeros(())
    for proj, z in zip(sit.projectors, zs):
        z = z.float()
        if spatial_norm == "zscore":
            z = (z - gamma * z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-6)
        zt = proj(h)
        for z_j, zt_j in zip(z, zt):
            loss = loss + (-(F.normalize(z_j, dim=-1) * F.normalize(zt_j, dim=-1)).sum(dim=-1)).mean()
    return loss / (len(zs) * B)


def release_lpips(lp, inputs, recon):
    """The release's LPIPS wrapper maps its (assumed [0, 1]) inputs with 2x - 1."""
    return lp(inputs * 2.0 - 1.0, recon * 2.0 - 1.0).mean()


@pytest.mark.parametrize("align", ["repa", "irepa"])
def test_one_step_equals_release_transcription(lpips_random, align):
    obj = make_objective(lpips_random, align=align)
    model, extra, phases = build(obj)
    vae, disc = extra["vae"], extra["discriminator"]
    assert [p.name for p in phases] == ["vae", "discriminator", "sit"]
    # a VAE that is not at its random init and a BN away from its init statistics
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.05]))
        model.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 3.0]))
        for p in model.parameters():  # adaLN-zero init leaves the output at 0; perturb everything
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    ref_vae, ref_sit, ref_disc = copy.deepcopy(vae), copy.deepcopy(model), copy.deepcopy(disc)
    batch = make_batch()
    B = 4
    draws = obj.draw(B, torch.Generator().manual_seed(7), torch.device("cpu"))
    draws["drop"] = torch.tensor([True, False, False, True])
    a_cfg = obj.align_config
    rm0, rv0 = model.bn.running_mean.clone(), model.bn.running_var.clone()
    nbt0 = int(model.bn.num_batches_tracked)

    # ---- release, step (a): VAE
    x = batch["pixels"].float() / 127.5 - 1.0
    moments = ref_vae.quant_conv(ref_vae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    std, var = torch.exp(0.5 * logvar), torch.exp(logvar)
    z = mean + std * draws["post"]
    recon = ref_vae.decoder(ref_vae.post_quant_conv(z))
    rec = F.l1_loss(x, recon) / torch.exp(torch.zeros(()))
    perc = release_lpips(lpips_random, x, recon)
    kl = (0.5 * torch.sum(mean.pow(2) + var - 1.0 - logvar, dim=[1, 2, 3])).sum() / B
    for p in ref_disc.parameters():
        p.requires_grad_(False)
    gen = -ref_disc(recon).mean()
    for p in ref_disc.parameters():
        p.requires_grad_(True)
    for p in ref_sit.parameters():
        p.requires_grad_(False)
    ref_sit.eval()
    nx = (z - ref_sit.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(ref_sit.bn.running_var.view(1, -1, 1, 1) + 1e-4)
    tb = draws["t"].view(-1, 1, 1, 1)
    x_t = (1 - tb) * nx + tb * draws["eps"]
    _, h = ref_sit(x_t, draws["t"], batch["label"])
    vae_proj = release_proj_loss(ref_sit, h, batch["features"], a_cfg.spatial_norm, a_cfg.gamma)
    vae_loss = rec + 1.0 * perc + 1e-6 * kl + 0.1 * 1.0 * gen + 1.5 * vae_proj
    ref_vae_grads = torch.autograd.grad(vae_loss, list(ref_vae.parameters()), retain_graph=True)
    # the VAE is steered by both the reconstruction terms and the alignment
    g_align = torch.autograd.grad(vae_proj, list(ref_vae.encoder.parameters()), retain_graph=True, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in g_align if g is not None) > 0
    g_rec = torch.autograd.grad(rec, list(ref_vae.encoder.parameters()), retain_graph=True)
    assert sum(float(g.abs().sum()) for g in g_rec) > 0
    for p in ref_sit.parameters():
        p.requires_grad_(True)

    # ---- ours, phase "vae"
    carry: dict = {}
    out = phases[0].module(batch, draws, carry)
    out["loss"].backward()
    close(out["loss"], vae_loss)
    close(out["l1"], rec), close(out["lpips"], perc), close(out["kl"], kl), close(out["gan_g"], gen)
    close(out["align_loss"], vae_proj)
    close(out["cosine"], -vae_proj)
    assert set(out) >= {"cosine/enc-a", "cosine/enc-b", "align_loss/enc-a", "align_loss/enc-b"}
    for (name, p), g in zip(vae.named_parameters(), ref_vae_grads):
        assert p.grad is not None, name
        close(p.grad, g)
    assert all(p.grad is None for p in model.parameters()), "the VAE step reached the SiT"
    assert all(p.grad is None for p in disc.parameters()), "the VAE step reached the discriminator"
    assert all(p.requires_grad for p in model.parameters()) and model.training  # restored
    assert torch.equal(model.bn.running_mean, rm0) and torch.equal(model.bn.running_var, rv0)
    assert int(model.bn.num_batches_tracked) == nbt0, "BN statistics moved in the VAE pass"
    assert not carry["z"].requires_grad and not carry["recon"].requires_grad
    for p in vae.parameters():
        p.grad = None

    # ---- release, step (b): discriminator
    logits_real = ref_disc(x.detach())
    logits_fake = ref_disc(recon.detach())
    d_loss = 1.0 * 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    ref_d_grads = torch.autograd.grad(d_loss, list(ref_disc.parameters()))
    out = phases[1].module(batch, draws, carry)
    out["loss"].backward()
    close(out["loss"], d_loss)
    for p, g in zip(disc.parameters(), ref_d_grads):
        close(p.grad, g)
    for b, rb in zip(disc.buffers(), ref_disc.buffers()):  # D's BN ran in training mode in both passes
        if b.dtype.is_floating_point:
            close(b, rb)
    assert all(p.grad is None for p in vae.parameters())
    for p in disc.parameters():
        p.grad = None

    # ---- release, step (c): SiT on z.detach(), same t and noise, BN in training mode
    ref_sit.train()
    zd = z.detach()
    bm = zd.mean(dim=(0, 2, 3))
    bv = zd.var(dim=(0, 2, 3), unbiased=False)
    nx = (zd - bm.view(1, -1, 1, 1)) / torch.sqrt(bv.view(1, -1, 1, 1) + 1e-4)
    x_t = (1 - tb) * nx + tb * draws["eps"]
    target = -nx + draws["eps"]
    v, h = ref_sit(x_t, draws["t"], batch["label"], force_drop_ids=draws["drop"].long())
    den = ((v - target) ** 2).mean(dim=(1, 2, 3)).mean()
    proj = release_proj_loss(ref_sit, h, batch["features"], a_cfg.spatial_norm, a_cfg.gamma)
    sit_loss = den + {"repa": 0.5, "irepa": 1.0}[align] * proj  # the presets' proj_coeff
    ref_sit_grads = torch.autograd.grad(sit_loss, list(ref_sit.parameters()))
    out = phases[2].module(batch, draws, carry)
    out["loss"].backward()
    close(out["loss"], sit_loss)
    close(out["mse"], den)
    close(out["align_loss"], proj)
    for (name, p), g in zip(model.named_parameters(), ref_sit_grads):
        assert p.grad is not None, name
        close(p.grad, g)
    assert all(p.grad is None for p in vae.parameters()), "the diffusion loss reached the VAE"
    assert all(p.grad is None for p in disc.parameters())
    n = zd.numel() // zd.shape[1]
    close(model.bn.running_mean, 0.9 * rm0 + 0.1 * bm, rtol=1e-6)
    close(model.bn.running_var, 0.9 * rv0 + 0.1 * bv * n / (n - 1), rtol=1e-6)
    assert int(model.bn.num_batches_tracked) == nbt0 + 1
    # the stop-gradient matters: without the detach the diffusion loss would move the VAE latents
    zg = z.detach().requires_grad_(True)
    nxg = (zg - bm.view(1, -1, 1, 1)) / torch.sqrt(bv.view(1, -1, 1, 1) + 1e-4)
    vg, _ = ref_sit((1 - tb) * nxg + tb * draws["eps"], draws["t"], batch["label"], force_drop_ids=draws["drop"].long())
    (gz,) = torch.autograd.grad(((vg - (draws["eps"] - nxg)) ** 2).mean(), zg)
    assert gz.abs().sum() > 0


def test_truncated_sit_forward_equals_full_forward_tokens():
    obj = make_objective()
    model = obj.build_model(obj.model_config()).eval()
    x = torch.randn(3, 4, 4, 4)
    t = torch.rand(3)
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        _, h = model(x, t, y)
        assert torch.equal(sit_hidden_at_depth(model, x, t, y), h)
    assert model.encoder_depth == 1 and len(model.blocks) == 2


def test_checkpoint_keys_and_bn_init_from_store_or_vae():
    obj = make_objective()
    mc = obj.model_config()
    model = obj.build_model(mc)
    keys = set(model.state_dict())
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= keys
    from irepa.trainer.models import build_sit

    plain = build_sit("SiT-S/2", **{k: v for k, v in mc.items() if k not in ("name", "latent_bn", "vae")})
    assert keys - set(plain.state_dict()) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert not model.bn.affine and model.bn.eps == 1e-4 and model.bn.momentum == 0.1
    # pixel store without latents: the VAE config's scaling factor (SD's 0.18215)
    assert torch.allclose(model.bn.running_var, torch.full((4,), 1 / 0.18215 ** 2))
    assert torch.equal(model.bn.running_mean, torch.zeros(4))
    # a store whose latents were made by the same VAE: its per-channel statistics
    stats = {"mean": [0.1, 0.2, 0.3, 0.4], "std": [2.0, 3.0, 4.0, 5.0], "count": 10}
    obj2 = make_objective(data=make_data(vae={"id": "tiny", "scaling_factor": 0.18215}, latent_stats=stats))
    m2 = obj2.build_model(obj2.model_config())
    assert torch.allclose(m2.bn.running_mean, torch.tensor(stats["mean"]))
    assert torch.allclose(m2.bn.running_var, torch.tensor(stats["std"]) ** 2)
    # ... but not the statistics of another VAE's latents
    obj3 = make_objective(data=make_data(vae={"id": "tiny:5"}, latent_stats=stats))
    assert obj3.model_config()["latent_bn"]["init_from"].startswith("VAE scaling_factor")
    with pytest.raises(ValueError, match="--bn-init store"):
        make_objective(bn_init="store").model_config()


def test_init_from_a_sit_checkpoint_with_or_without_the_latent_bn():
    obj = make_objective()
    mc = obj.model_config()
    torch.manual_seed(4)
    src = obj.build_model(mc)
    with torch.no_grad():
        src.bn.running_var.fill_(7.0)
    dst = obj.build_model(mc)
    info = obj.load_init(dst, {"ema": src.state_dict(), "model": {}}, "repae.pt", partial=False)
    assert info == {"missing": [], "unexpected": []}
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    repa = {f"module.{k}": v for k, v in src.state_dict().items() if not k.startswith("bn.")}  # a REPA SiT
    with pytest.raises(ValueError, match="missing from checkpoint.*bn.running_mean"):
        obj.load_init(obj.build_model(mc), repa, "repa.pt", partial=False)
    fresh = obj.build_model(mc)
    info = obj.load_init(fresh, repa, "repa.pt", partial=True)
    assert sorted(info["missing"]) == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]
    assert torch.allclose(fresh.bn.running_var, torch.full((4,), 1 / 0.18215 ** 2))


def test_ema_copy_of_the_model_carries_the_bn_statistics():
    from irepa.trainer.train import update_ema

    obj = make_objective()
    model = obj.build_model(obj.model_config())
    ema = copy.deepcopy(model).requires_grad_(False)
    model.train()
    model.bn(torch.randn(8, 4, 4, 4) * 3 + 1)
    update_ema(ema, model, 0.9999)
    assert torch.equal(ema.bn.running_mean, model.bn.running_mean)
    assert torch.equal(ema.bn.running_var, model.bn.running_var)


def test_check_data_refuses_stores_that_do_not_fit():
    from irepa.trainer.store_checks import StoreMismatchError

    obj = make_objective()
    mc = obj.model_config()
    obj.check_data(mc, "stores/ok")
    nopix = make_objective(data=DataSpec(latent_shape=(8, 4, 4), encoders=ENC, feature_dims=DIMS,
                                         token_grids=[(4, 4)] * 2, num_classes=10))
    with pytest.raises(StoreMismatchError, match="holds no pixels.*--pixels"):
        nopix.check_data(mc, "stores/latents-only")
    with pytest.raises(ValueError, match="no pixels"):
        nopix.model_config()
    grid = make_objective(data=make_data(grid=(2, 2)))
    with pytest.raises(StoreMismatchError, match="enc-a has a 2x2 token grid; the SiT's is 4x4"):
        grid.check_data(grid.model_config(), "stores/x")


def test_gan_schedule_starts_at_disc_start(lpips_random):
    obj = make_objective(lpips_random, disc_start=2)
    model, extra, phases = build(obj)
    batch = make_batch()
    outs = []
    for step in range(3):
        draws = obj.draw(4, torch.Generator().manual_seed(step), torch.device("cpu"))
        carry: dict = {}
        outs.append([ph.module(batch, draws, carry) for ph in phases])
    assert [float(o[0]["gan_g"]) for o in outs[:2]] == [0.0, 0.0]
    assert [float(o[1]["loss"].detach()) for o in outs[:2]] == [0.0, 0.0]
    assert float(outs[2][0]["gan_g"]) != 0.0 and float(outs[2][1]["loss"].detach()) > 0
    assert int(extra["discriminator"].steps) == 3
    # a step the loop supplies wins over the counter
    d = obj.draw(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    d["step"] = torch.tensor(1)
    assert obj.gan_factor(d, extra["discriminator"]) == 0.0


def test_discriminator_starts_from_given_weights(tmp_path):
    torch.manual_seed(5)
    src = PatchDiscriminator(3, 8, 2)
    sd = {k: v for k, v in src.state_dict().items() if k != "steps"}  # the release's keys
    torch.save({"discriminator": {f"module.{k}": v for k, v in sd.items()}, "steps": 10}, tmp_path / "ckpt.pt")
    disc = make_objective(disc_weights=str(tmp_path / "ckpt.pt")).extra_modules()["discriminator"]
    for k, v in sd.items():
        assert torch.equal(disc.state_dict()[k], v), k
    torch.save(PatchDiscriminator(3, 16, 2).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="does not fit a PatchGAN.*wrong shape"):
        make_objective(disc_weights=str(tmp_path / "wide.pt")).extra_modules()


def test_phases_need_the_vae_phase_first(lpips_random):
    obj = make_objective(lpips_random)
    _, _, phases = build(obj)
    draws = obj.draw(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="in order \\(vae, discriminator, sit\\)"):
        phases[2].module(make_batch(), draws, {})


# ----------------------------------------------------------------------------- learning


def test_learning_reconstruction_falls_and_alignment_rises(lpips_random):
    """A plain loop: three AdamW (one per phase), clip 1, on four fixed photos and fixed features."""
    obj = make_objective(lpips_random, align="irepa")
    model, extra, phases = build(obj)
    model.train()
    opts = [torch.optim.AdamW(p.params, lr=2e-3, betas=(0.9, 0.999), weight_decay=0.0) for p in phases]
    batch = make_batch()
    rec, cos, vcos = [], [], []
    for step in range(40):
        draws = obj.draw(4, torch.Generator().manual_seed(1000 + step), torch.device("cpu"))
        carry: dict = {}
        for ph, opt in zip(phases, opts):
            opt.zero_grad(set_to_none=True)
            out = ph.module(batch, draws, carry)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(ph.params, 1.0)
            opt.step()
            if ph.name == "vae":  # the values before this step's update
                rec.append(float(out["l1"]))
                vcos.append(float(out["cosine"]))
            if ph.name == "sit":
                cos.append(float(out["cosine"]))
    first, last = np.mean(rec[:3]), np.mean(rec[-5:])
    assert last < 0.8 * first, (rec[:3], rec[-5:])
    assert np.mean(cos[-5:]) > np.mean(cos[:3]) + 0.2, (cos[:3], cos[-5:])
    assert np.mean(vcos[-5:]) > np.mean(vcos[:3]) + 0.2, (vcos[:3], vcos[-5:])


# ----------------------------------------------------------------------------- batch norm across ranks


def _bn_worker(rank: int, world: int, port: int, x: torch.Tensor, gy: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = SyncableBatchNorm2d(3, eps=1e-4, momentum=0.1, sync=True)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    n = x.shape[0] // world
    xs = x[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    y = bn(xs)
    (y * gy[rank * n:(rank + 1) * n]).sum().backward()
    # DDP averages parameter grads; the loss of the whole batch is the sum over ranks here
    for p in (bn.weight, bn.bias):
        dist.all_reduce(p.grad)
    torch.save({"y": y.detach(), "gx": xs.grad, "gw": bn.weight.grad, "gb": bn.bias.grad,
                "rm": bn.running_mean, "rv": bn.running_var}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_syncable_batchnorm_two_processes_equal_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) * 2 + 0.5
    gy = torch.randn(8, 3, 5, 5, generator=g)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_bn_worker, args=(2, port, x, gy, str(tmp_path / "r")), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"r.{r}", weights_only=True) for r in range(2)]
    # one process, whole batch: torch's BatchNorm2d is the reference
    ref = torch.nn.BatchNorm2d(3, eps=1e-4, momentum=0.1)
    one = SyncableBatchNorm2d(3, eps=1e-4, momentum=0.1)
    for m in (ref, one):
        with torch.no_grad():
            m.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    res = {}
    for key, m in (("ref", ref), ("one", one)):
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        (y * gy).sum().backward()
        res[key] = {"y": y.detach(), "gx": xx.grad, "gw": m.weight.grad, "gb": m.bias.grad,
                    "rm": m.running_mean, "rv": m.running_var}
    two = {"y": torch.cat([p["y"] for p in parts]), "gx": torch.cat([p["gx"] for p in parts]),
           "gw": parts[0]["gw"], "gb": parts[0]["gb"], "rm": parts[0]["rm"], "rv": parts[0]["rv"]}
    for k in res["ref"]:
        close(res["one"][k], res["ref"][k], rtol=1e-5)
        close(two[k], res["one"][k], rtol=1e-6)
    assert torch.equal(parts[0]["rm"], parts[1]["rm"]) and torch.equal(parts[0]["rv"], parts[1]["rv"])
    # eval mode is torch's BatchNorm2d on the running statistics
    ref.eval(), one.eval()
    assert torch.allclose(ref(x), one(x), atol=1e-6)


def _phase_step(rank: int, world: int, port: int | None, out: str) -> None:
    """One REPA-E step with every phase module wrapped in DDP (as the loop does) on this rank's
    half of the batch; saves losses, gradients and BN statistics."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    lp = build_lpips("random", "alex")
    obj = make_objective(lp, align="irepa", lpips_net="alex")
    model, extra, phases = build(obj)
    model.train()
    B = 4
    n = B // world
    sl = slice(rank * n, (rank + 1) * n)
    full = make_batch(B)
    batch = {"pixels": full["pixels"][sl], "features": [f[sl] for f in full["features"]], "label": full["label"][sl]}
    draws = {k: v[sl] for k, v in obj.draw(B, torch.Generator().manual_seed(3), torch.device("cpu")).items()}
    carry: dict = {}
    res = {}
    for ph in phases:
        mod = DDP(ph.module) if world > 1 else ph.module
        o = mod(batch, draws, carry)
        o["loss"].backward()
        res[f"loss/{ph.name}"] = o["loss"].detach()
        if world > 1:
            dist.all_reduce(res[f"loss/{ph.name}"])
            res[f"loss/{ph.name}"] /= world
    for name, m in (("vae", extra["vae"]), ("disc", extra["discriminator"]), ("sit", model)):
        for k, p in m.named_parameters():
            res[f"{name}/{k}"] = p.grad.clone()
        for k, b in m.named_buffers():
            res[f"{name}/buf/{k}"] = b.clone()
    torch.save(res, f"{out}.{rank}")
    if world > 1:
        dist.destroy_process_group()


def test_phases_under_ddp_two_processes_equal_one_process(tmp_path):
    """DDP-wrapped phases on 2 gloo ranks (half the batch each) give the 1-process step: the
    frozen SiT / discriminator inside the VAE phase do not trip DDP, and the BNs sync."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_phase_step, args=(2, port, str(tmp_path / "two")), nprocs=2, join=True)
    _phase_step(0, 1, None, str(tmp_path / "one"))
    one = torch.load(tmp_path / "one.0", weights_only=True)
    two = [torch.load(tmp_path / f"two.{r}", weights_only=True) for r in range(2)]
    assert set(one) == set(two[0])
    for k, v in one.items():
        if v.dtype.is_floating_point:
            close(two[0][k], v, rtol=2e-5)  # 3e-6 measured; 1e-4 with per-rank discriminator BN
            close(two[1][k], v, rtol=2e-5)
        else:
            assert torch.equal(two[0][k], v), k
    assert int(one["sit/buf/bn.num_batches_tracked"]) == 1


# ----------------------------------------------------------------------------- export, sampling


def _fake_checkpoint(obj: RepaeObjective, path: Path, step: int = 5):
    """A checkpoint as the loop writes one: model, EMA, the extra modules' states."""
    from irepa.trainer.checkpoint import save_checkpoint

    torch.manual_seed(1)
    mc = obj.model_config()
    model = obj.build_model(mc)
    extra = obj.extra_modules()
    with torch.no_grad():  # "tuned": the VAE moved away from its start, the BN has statistics
        for p in extra["vae"].parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.bn.running_mean.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
        model.bn.running_var.copy_(torch.tensor([4.0, 9.0, 1.0, 2.0]))
    save_checkpoint(path, step=step, model=model.state_dict(), ema=model.state_dict(), optimizer=None,
                    args={"objective": "repae"}, model_config=mc,
                    extra={"vae": extra["vae"].state_dict(), "discriminator": extra["discriminator"].state_dict()})
    return model, extra


def test_export_vae_loads_with_diffusers_and_the_store_build_uses_it(tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    from irepa.pipeline.build import build_store
    from irepa.pipeline.transforms import decode_and_crop
    from irepa.pipeline.vae import load_vae
    from irepa.stores import open_store

    obj = make_objective()
    run = tmp_path / "runs" / "x"
    _, extra = _fake_checkpoint(obj, run / "checkpoints" / "0000005.pt")
    tuned = extra["vae"]
    out = export_vae(run)
    assert out == run / "vae"
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(run.glob(".vae.tmp-*"))
    info = json.loads((out / "repae_export.json").read_text())
    assert info["step"] == 5 and info["start_vae"] == "tiny"
    loaded = AutoencoderKL.from_pretrained(str(out), local_files_only=True)
    for (k, a), b in zip(tuned.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert loaded.config.latents_mean == pytest.approx([0.5, -0.5, 0.25, 0.0])
    assert loaded.config.latents_std == pytest.approx(np.sqrt(np.array([4.0, 9.0, 1.0, 2.0]) + 1e-4).tolist())
    with pytest.raises(FileExistsError, match="not empty"):
        export_vae(run)
    export_vae(run / "checkpoints" / "0000005.pt", tmp_path / "elsewhere")
    enc = load_vae(str(out))
    assert enc.id == str(out.resolve()) and enc.latent_channels == 4

    # re-cache latents with the tuned VAE
    data = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(small).resize((40, 36), Image.BICUBIC).save(data / c / f"{i}.png")
    store = build_store(data=str(data), out=str(tmp_path / "store"), encoder="dinov2-vit-b", vae=str(out),
                        resolution=R, encoder_config="tiny", shard_size=4, batch_size=2, num_workers=0,
                        progress=False, device="cpu")
    s = open_store(store)
    assert s.manifest["vae"]["id"] == str(out.resolve())
    b = s.get_batch(range(len(s)))
    imgs = torch.stack([torch.from_numpy(decode_and_crop((data / k).read_bytes(), R).copy()).permute(2, 0, 1)
                        for k in b["key"]])
    with torch.no_grad():
        post = tuned.encode(imgs.float() / 127.5 - 1).latent_dist
    np.testing.assert_allclose(b["latents"], torch.cat([post.mean, post.std], 1).numpy(), rtol=1e-5, atol=1e-5)


def test_export_vae_refuses_a_run_that_is_not_repae(tmp_path):
    from irepa.trainer.checkpoint import save_checkpoint

    p = tmp_path / "run" / "checkpoints" / "0000001.pt"
    save_checkpoint(p, step=1, model={"w": torch.zeros(1)}, ema=None, optimizer=None, args={},
                    model_config={"name": "SiT-B/2"})
    with pytest.raises(ValueError, match="no VAE config; is it a --objective repae run"):
        export_vae(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        export_vae(tmp_path)


def test_samples_decode_with_the_tuned_vae_after_undoing_the_bn(tmp_path):
    obj = make_objective()
    model, extra = _fake_checkpoint(obj, tmp_path / "run" / "checkpoints" / "0000005.pt")
    noise = torch.randn(2, *obj.noise_shape(), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    from irepa.trainer.sample import sample

    lat = obj.sample(model, noise, labels, method="ode", steps=2)
    normed = sample(model, noise, labels, method="ode", steps=2)
    # BN undone: eval-mode BN of the returned latents gives back the sampler's output
    model.eval()
    close(model.bn(lat), normed, rtol=1e-5)
    expect = normed * torch.sqrt(torch.tensor([4.0, 9.0, 1.0, 2.0]) + 1e-4).view(1, 4, 1, 1) + \
        torch.tensor([0.5, -0.5, 0.25, 0.0]).view(1, 4, 1, 1)
    close(lat, expect, rtol=1e-6)
    vae = extra["vae"]
    vae.train()
    imgs = obj.decoder(extra=extra)(lat)
    assert imgs.dtype == torch.uint8 and imgs.shape == (2, 3, R, R) and vae.training
    with torch.no_grad():
        ref = torch.clamp(255 * (vae.eval().decode(lat).sample + 1) / 2, 0, 255).to(torch.uint8)
    assert torch.equal(imgs, ref)
    # a VAE override (e.g. the exported folder) decodes instead
    out = export_vae(tmp_path / "run")
    assert torch.equal(obj.decoder(vae_override=str(out))(lat), ref)
    untuned = obj.decoder(vae_override="tiny")(lat)
    assert not torch.equal(untuned, ref)
    # previews pass --vae (the VAE the run started from) with the run's modules: the tuned VAE decodes
    assert torch.equal(obj.decoder("tiny", extra)(lat), ref)
    assert torch.equal(obj.decoder(str(out), extra)(lat), ref)  # another VAE named: that one
    with pytest.raises(RuntimeError, match="run's own tuned VAE"):
        obj.decoder()


# ----------------------------------------------------------------------------- LPIPS, the extra


def test_lpips_loads_offline_from_local_files(tmp_path, monkeypatch):
    import torchvision

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth.*--lpips-weights"):
        build_lpips(None)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):  # the loop's first call: before any work
        make_objective(lpips_weights=None).model_config()
    torch.manual_seed(3)
    vgg = torchvision.models.vgg16()
    f = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    f.parent.mkdir(parents=True)
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, f)  # the trunk part
    lp = build_lpips(None)  # torchvision's cache file
    assert torch.equal(lp.net.slice1[0].weight, vgg.features[0].weight)
    assert torch.equal(lp.net.state_dict()["slice5.28.bias"], vgg.features[28].bias)
    assert not any(p.requires_grad for p in lp.parameters()) and not lp.training
    import lpips as lpips_pkg

    shipped = torch.load(Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "vgg.pth",
                         map_location="cpu", weights_only=True)
    assert torch.equal(lp.lin0.model[1].weight, shipped["lin0.model.1.weight"])
    full = tmp_path / "lpips_full.pth"
    torch.save(lp.state_dict(), full)
    lp2 = build_lpips(str(full))  # a full LPIPS state dict
    assert torch.equal(lp2.net.state_dict()["slice3.14.weight"], vgg.features[14].weight)
    with pytest.raises(ValueError, match="features.0.weight"):
        bad = tmp_path / "bad.pth"
        torch.save({"x": torch.zeros(1)}, bad)
        build_lpips(str(bad))


def test_missing_extra_is_a_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a))
    with pytest.raises(ImportError, match=r"optional extra 'repae'.*pip install 'irepa\[repae\]'") as e:
        make_objective().model_config()  # the loop's first call (sampling a run needs no LPIPS)
    assert "\n" not in str(e.value)


def test_registered_with_release_defaults():
    assert "repae" in objective_names()
    cls = get_objective("repae")
    assert cls is RepaeObjective and cls.inputs == ("pixels",) and cls.preset == {"align": "repa"}
    o = RepaeOptions()
    assert (o.vae_align_coeff, o.l1_weight, o.lpips_weight, o.kl_weight, o.gan_weight, o.disc_start) == \
        (1.5, 1.0, 1.0, 1e-6, 0.1, 0)
    assert (o.bn_momentum, o.bn_eps, o.disc_layers, o.disc_channels, o.lpips_net) == (0.1, 1e-4, 3, 64, "vgg")
    assert (o.path_type, o.time_sampler, o.lpips_release_scaling, o.bn_init) == ("linear", "uniform", True, "auto")
    assert RepaeObjective.final_sampling == {"method": "sde", "steps": 250}
    d = PatchDiscriminator()
    assert [k for k in d.state_dict() if k.endswith("weight")][:3] == ["main.0.weight", "main.2.weight",
                                                                       "main.3.weight"]
    with pytest.raises(ValueError, match="--bn-init"):
        RepaeOptions(bn_init="batch")
    with pytest.raises(ValueError, match="--gan-weight must be >= 0"):
        RepaeOptions(gan_weight=-1)
