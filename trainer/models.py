"""SiT (Scalable Interpolant Transformer) as REPA/iREPA train it.

The architecture and the parameter names follow the public REPA SiT (``sihyun-yu/REPA``,
``models/sit.py``) so that its checkpoints load here and ours load there:

====================================  =====================================================
name here (== REPA)                   what it is
====================================  =====================================================
``x_embedder.proj.{weight,bias}``     patch embedding, Conv2d(C, D, p, stride p)
``t_embedder.mlp.{0,2}.*``            timestep MLP on 256 sinusoidal frequencies
``y_embedder.embedding_table.weight`` class table, ``num_classes + 1`` rows (last = null)
``pos_embed``                         fixed 2D sin-cos, [1, T, D] (persistent buffer here,
                                      a frozen ``nn.Parameter`` in REPA: same key)
``blocks.N.attn.qkv / attn.proj``     attention; ``attn.q_norm / attn.k_norm`` with qk-norm
``blocks.N.mlp.fc1 / mlp.fc2``        MLP, ratio 4, tanh-GELU
``blocks.N.adaLN_modulation.1``       adaLN-Zero: 6 * D modulation from the condition
``final_layer.linear``                D -> p*p*C (no learned sigma)
``final_layer.adaLN_modulation.1``    2 * D modulation
``projectors.K.*``                    alignment projector K (see ``irepa.trainer.align``):
                                      mlp ``{0,2,4}``, linear / conv ``{weight,bias}``
``h_embedder.mlp.{0,2}.*``            two-time SiT only (MeanFlow): embedding of t - r,
                                      named and initialised as the MeanFlow release's
``r_embedder.mlp.{0,2}.*``            only with ``time_conditions`` naming ``"r"``
====================================  =====================================================

iREPA's release wraps each projector in a ``ProjectionLayer`` module, so its keys read
``projectors.K.projection_layer.*``; :func:`load_reference_state_dict` maps them. Norm layers
(``norm1``, ``norm2``, ``final_layer.norm_final``) have no affine parameters, as in REPA.

Conventions (REPA): ``t`` in [0, 1] goes straight into the sinusoidal embedding (no x1000);
the model predicts the velocity with ``in_channels`` output channels; ``forward`` returns the
block-``encoder_depth`` tokens (1-based) for the alignment loss instead of projecting them
itself, so that :class:`irepa.trainer.align.AlignmentLoss` can fuse projection and loss.

Two-time SiT (MeanFlow, ``time_conditions=("t", "t-r")``): the condition is
``t_embedder(t) + h_embedder(t - r) + y_embedder(y)``, as the official MeanFlow release's DiT
(``models/models_dit.py``: ``c = t + h + y`` with ``h = t - r``); ``forward`` then takes the
second time ``r`` (``r <= t``). Every other key is the flow SiT's, so a flow SiT checkpoint
loads into it with only ``h_embedder.*`` missing. The default ``("t",)`` builds exactly the
flow SiT (same modules, same initialisation draws, same numerics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from irepa.trainer.config import model_size

__all__ = [
    "SIT_CONFIGS",
    "default_encoder_depth",
    "SiT",
    "build_sit",
    "sit_param_count",
    "load_reference_state_dict",
    "get_2d_sincos_pos_embed",
    "timestep_embedding",
    "check_time_conditions",
]

# name -> (hidden_size, depth, num_heads, patch_size); REPA's table (S/B/L/XL x 2/4/8).
SIT_CONFIGS: dict[str, dict[str, int]] = {}
for _size, (_hidden, _depth, _heads) in {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}.items():
    for _patch in (2, 4, 8):
        SIT_CONFIGS[f"SiT-{_size}/{_patch}"] = dict(
            hidden_size=_hidden, depth=_depth, num_heads=_heads, patch_size=_patch
        )

# REPA's alignment depth per model size (block output, 1-based).
DEFAULT_ENCODER_DEPTH = {"S": 4, "B": 4, "L": 8, "XL": 8}


# --------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) times ``t`` [B] -> [B, dim]: cos half, then sin half.

    Computed in float32 (half-precision times are promoted), or float64 for float64 times (the
    JVP tests of MeanFlow check derivatives in float64)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].to(torch.promote_types(t.dtype, torch.float32)) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar time -> hidden vector: 256 sinusoidal frequencies, Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> hidden vector, with classifier-free-guidance label dropout.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``; row ``num_classes`` is the
    null (unconditional) class. In training mode each label is replaced by the null class with
    probability ``dropout_prob``; ``force_drop_ids`` (1 = drop) forces it in any mode.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(
        self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        # checked on CPU only: on CUDA the check would wait for the GPU every step (and break a
        # compiled graph); there an out-of-range index trips the embedding's own device assert
        if (labels.numel() and labels.device.type == "cpu" and not torch.compiler.is_compiling()
                and (int(labels.min()) < 0 or int(labels.max()) >= self.embedding_table.num_embeddings)):
            raise ValueError(
                f"class labels must lie in [0, {self.embedding_table.num_embeddings - 1}] "
                f"(null class = {self.num_classes}); got min {int(labels.min())}, max {int(labels.max())}"
            )
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, T, D] by a stride-p convolution (``proj``), tokens in raster order."""

    def __init__(self, input_size: tuple[int, int], patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        h, w = input_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int]) -> np.ndarray:
    """MAE/DiT fixed 2D sin-cos position table [h*w, embed_dim] (first half from the column index
    grid, second half from the row index, as the reference's meshgrid(w, h) ordering does)."""
    if embed_dim % 4:
        raise ValueError(f"hidden size {embed_dim} must be divisible by 4 for the 2D sin-cos embedding")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb_a = _sincos_1d(embed_dim // 2, grid_w)
    emb_b = _sincos_1d(embed_dim // 2, grid_h)
    return np.concatenate([emb_a, emb_b], axis=1)


def xavier_init_linears(module: nn.Module) -> None:
    """DiT's base init of every ``nn.Linear`` under ``module`` (in ``Module.apply`` order, so the
    random draws are DiT's): xavier-uniform weight, zero bias."""

    def init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    module.apply(init)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens [B, gh * gw, p * p * C] (values ordered row in patch, column, channel) ->
    images [B, C, gh * p, gw * p]."""
    p, (gh, gw) = patch_size, grid
    x = x.reshape(x.shape[0], gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, gh * p, gw * p)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------
_ATTN_BACKENDS = ("sdpa", "xformers", "math")


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: ``qkv``, optional ``q_norm``/``k_norm``, ``proj``).

    ``backend``: ``sdpa`` (torch scaled_dot_product_attention), ``xformers`` (memory-efficient
    attention, must be importable), or ``math`` (explicit softmax; the reference for tests).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if backend not in _ATTN_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {_ATTN_BACKENDS}")
        if backend == "xformers":
            try:
                import xformers.ops  # noqa: F401
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "attn='xformers' was requested but xformers is not importable; "
                    "install the 'xformers' extra or use attn='sdpa'"
                ) from e
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, T, Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.backend == "xformers":  # pragma: no cover - needs xformers + GPU
            import xformers.ops as xops

            out = xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    """fc1 - tanh-GELU - fc2 (timm ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (shift/scale/gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = False, attn: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, backend=attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then Linear to p*p*C values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------
# SiT
# --------------------------------------------------------------------------------------
#: extra time condition -> the embedder module that takes it ("t" is always ``t_embedder``)
_TIME_EMBEDDERS = {"t-r": "h_embedder", "r": "r_embedder"}


def check_time_conditions(conds: Any) -> tuple[str, ...]:
    """Validate ``time_conditions``: ``"t"`` first, then any of ``"t-r"`` / ``"r"`` once each.

    ``("t",)`` is the flow SiT; ``("t", "t-r")`` the MeanFlow release's two-time SiT.
    """
    if isinstance(conds, str):
        conds = (conds,)
    conds = tuple(str(c) for c in conds)
    extra = conds[1:]
    if (not conds or conds[0] != "t" or len(set(extra)) != len(extra)
            or any(c not in _TIME_EMBEDDERS for c in extra)):
        raise ValueError(f"time_conditions must be 't' followed by distinct entries of {sorted(_TIME_EMBEDDERS)} "
                         f"(flow: ('t',), MeanFlow: ('t', 't-r')); got {conds}")
    return conds


class SiT(nn.Module):
    """SiT velocity model with REPA/iREPA alignment projectors.

    ``forward(x, t, y)`` returns ``(v, h)``: the predicted velocity [B, C, H, W] and the tokens
    [B, T, hidden] after block ``encoder_depth`` (1-based), or ``None`` when the model has no
    projectors (``z_dims`` empty). ``self.projectors[k]`` maps ``h`` to encoder ``k``'s feature
    space; :class:`irepa.trainer.align.AlignmentLoss` applies them.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        encoder_depth: int = 8,
        z_dims: tuple[int, ...] | list[int] = (768,),
        projector: str = "mlp",
        projector_kernel: int = 3,
        projector_dim: int = 2048,
        qk_norm: bool = False,
        attn: str = "sdpa",
        time_conditions: tuple[str, ...] | list[str] = ("t",),
    ):
        super().__init__()
        from irepa.trainer.align import build_projector  # local import: align imports nothing from here

        input_hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        z_dims = tuple(int(z) for z in z_dims)
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}] (1-based block index); got {encoder_depth}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = z_dims
        self.input_size = input_hw
        self.time_conditions = check_time_conditions(time_conditions)

        self.x_embedder = PatchEmbed(input_hw, patch_size, in_channels, hidden_size)
        self.grid_size = self.x_embedder.grid_size
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.register_buffer(
            "pos_embed",
            torch.tensor(get_2d_sincos_pos_embed(hidden_size, self.grid_size), dtype=torch.float32).unsqueeze(0),
            persistent=True,
        )
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, attn=attn) for _ in range(depth)]
        )
        self.projectors = nn.ModuleList(
            [
                build_projector(projector, hidden_size, z, kernel=projector_kernel,
                                projector_dim=projector_dim, grid=self.grid_size)
                for z in z_dims
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # extra time embedders (two-time SiT) come last, so that the flow SiT's modules are
        # created, and draw their initial values, exactly as without them
        for cond in self.time_conditions[1:]:
            setattr(self, _TIME_EMBEDDERS[cond], TimestepEmbedder(hidden_size))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT/REPA init: xavier Linear, zero adaLN and output layers, N(0, 0.02) tables."""
        xavier_init_linears(self)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for cond in self.time_conditions[1:]:  # MeanFlow's h embedder: as its t embedder (N(0, 0.02), zero bias)
            emb = getattr(self, _TIME_EMBEDDERS[cond])
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]."""
        return unpatchify(x, self.patch_size, self.out_channels, self.grid_size)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Velocity for latents ``x`` [B, C, H, W] at times ``t`` [B] in [0, 1], labels ``y`` [B].

        Labels are dropped to the null class with probability ``class_dropout_prob`` in
        training mode; ``force_drop_ids`` (1 = null) forces it. Returns ``(v, h)``.
        A two-time SiT (``time_conditions`` beyond ``("t",)``) needs ``r`` [B] and returns the
        average velocity ``u(x, r, t)`` instead; a flow SiT refuses ``r``.
        """
        if x.shape[1:] != (self.in_channels, *self.input_size):
            raise ValueError(
                f"SiT expects latents [B, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}]; "
                f"got {list(x.shape)}"
            )
        t = t.reshape(-1)
        if t.shape[0] == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        h_out = None
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        if self.time_conditions == ("t",):
            if r is not None:
                raise ValueError("this SiT is conditioned on t only; r is for a two-time SiT "
                                 "(time_conditions=('t', 't-r'), MeanFlow)")
            c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        else:
            if r is None:
                raise ValueError(f"this SiT is conditioned on {self.time_conditions}: pass the second time r")
            r = r.reshape(-1)
            if r.shape[0] == 1 and x.shape[0] > 1:
                r = r.expand(x.shape[0])
            times = {"r": r, "t-r": t - r}
            c = self.t_embedder(t)
            for cond in self.time_conditions[1:]:
                c = c + getattr(self, _TIME_EMBEDDERS[cond])(times[cond])
            c = c + self.y_embedder(y, self.training, force_drop_ids)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c)
            if i + 1 == self.encoder_depth and len(self.projectors):
                h_out = tokens
        out = self.final_layer(tokens, c)
        return self.unpatchify(out), h_out

    def project(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Apply every projector to ``h`` [B, T, D] -> list of [B, T, z_k] (REPA's ``zs_tilde``)."""
        return [proj(h) for proj in self.projectors]


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------
def default_encoder_depth(name: str, depth: int) -> int:
    """REPA's alignment depth for SiT ``name`` (4 for S/B, 8 for L/XL), capped at ``depth``."""
    return min(DEFAULT_ENCODER_DEPTH[model_size(name)], int(depth))


def build_sit(
    name: str,
    input_size: int | tuple[int, int] = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    encoder_depth: int | None = None,
    z_dims: tuple[int, ...] | list[int] = (768,),
    projector: str = "mlp",
    projector_kernel: int = 3,
    projector_dim: int = 2048,
    qk_norm: bool = False,
    class_dropout_prob: float = 0.1,
    attn: str = "sdpa",
    time_conditions: tuple[str, ...] | list[str] = ("t",),
    **overrides: Any,
) -> SiT:
    """Build ``SiT-{S,B,L,XL}/{2,4,8}`` (``SIT_CONFIGS``).

    ``encoder_depth`` defaults to REPA's choice: 4 for S/B, 8 for L/XL, capped at the depth
    when ``overrides`` shrink the model. ``overrides`` may set ``hidden_size``, ``depth``,
    ``num_heads``, ``patch_size`` or ``mlp_ratio`` (tiny test models). ``time_conditions``
    ``("t", "t-r")`` builds MeanFlow's two-time SiT (see :class:`SiT`); it is recorded in
    ``build_kwargs`` only when it is not the flow default, so flow configs stay as they were.
    """
    if name not in SIT_CONFIGS:
        raise ValueError(f"unknown SiT model {name!r}; expected one of {sorted(SIT_CONFIGS)}")
    allowed = {"hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio"}
    bad = set(overrides) - allowed
    if bad:
        raise TypeError(f"build_sit got unexpected overrides {sorted(bad)}; allowed: {sorted(allowed)}")
    cfg = {**SIT_CONFIGS[name], **overrides}
    if encoder_depth is None:
        encoder_depth = default_encoder_depth(name, cfg["depth"])
    model = SiT(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        encoder_depth=encoder_depth,
        z_dims=tuple(z_dims),
        projector=projector,
        projector_kernel=projector_kernel,
        projector_dim=projector_dim,
        qk_norm=qk_norm,
        class_dropout_prob=class_dropout_prob,
        attn=attn,
        time_conditions=time_conditions,
        **cfg,
    )
    model.build_kwargs = dict(  # everything needed to rebuild this model (checkpoints)
        name=name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
        encoder_depth=encoder_depth, z_dims=list(z_dims), projector=projector,
        projector_kernel=projector_kernel, projector_dim=projector_dim, qk_norm=qk_norm,
        class_dropout_prob=class_dropout_prob, attn=attn, **overrides,
    )
    if model.time_conditions != ("t",):
        model.build_kwargs["time_conditions"] = list(model.time_conditions)
    return model


def sit_param_count(
    name: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    z_dims: tuple[int, ...] = (),
    projector: str = "mlp",
    projector_kernel: int = 3,
    projector_dim: int = 2048,
    class_dropout_prob: float = 0.1,
    qk_norm: bool = False,
    time_conditions: tuple[str, ...] | list[str] = ("t",),
    **overrides: Any,
) -> int:
    """Trainable parameter count by formula (no allocation), for checking the real sizes."""
    cfg = {**SIT_CONFIGS[name], **overrides}
    D, L, p, heads = cfg["hidden_size"], cfg["depth"], cfg["patch_size"], cfg["num_heads"]
    mlp_hidden = int(D * cfg.get("mlp_ratio", 4.0))
    C = in_channels
    n = C * p * p * D + D  # patch embed
    n += len(check_time_conditions(time_conditions)) * (256 * D + D + D * D + D)  # t (and h / r) embedders
    n += (num_classes + int(class_dropout_prob > 0)) * D  # y table
    per_block = (D * 3 * D + 3 * D) + (D * D + D) + (D * mlp_hidden + mlp_hidden) + (mlp_hidden * D + D)
    per_block += D * 6 * D + 6 * D
    if qk_norm:
        per_block += 4 * (D // heads)
    n += L * per_block
    n += D * p * p * C + p * p * C + D * 2 * D + 2 * D  # final layer
    for z in z_dims:
        if projector == "mlp":
            n += D * projector_dim + projector_dim + projector_dim**2 + projector_dim + projector_dim * z + z
        elif projector == "linear":
            n += D * z + z
        elif projector == "conv":
            n += D * z * projector_kernel**2 + z
        else:
            raise ValueError(f"unknown projector {projector!r}")
    return n


# --------------------------------------------------------------------------------------
# Reference checkpoints
# --------------------------------------------------------------------------------------
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def _normalise_key(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    # iREPA wraps each projector: projectors.K.projection_layer.X -> projectors.K.X
    if key.startswith("projectors."):
        key = key.replace(".projection_layer.", ".", 1)
    return key


def load_reference_state_dict(
    model: SiT,
    state_dict: Mapping[str, Any],
    prefer: str = "ema",
    strict: bool = True,
    source: str = "checkpoint",
) -> dict[str, list[str]]:
    """Load a REPA / iREPA (or our own) SiT checkpoint into ``model``.

    ``state_dict`` may be a plain state dict or a training checkpoint holding ``"ema"`` and/or
    ``"model"`` (``prefer`` picks which when both exist). Keys are normalised: DDP ``module.``
    and ``torch.compile`` ``_orig_mod.`` prefixes are stripped, iREPA's
    ``projectors.K.projection_layer.*`` becomes ``projectors.K.*``. REPA's ``pos_embed`` is
    checked against our fixed table instead of being trusted. With ``strict`` a missing,
    unexpected or wrongly shaped key raises ``ValueError`` naming every offending key; a
    checkpoint without projectors may be loaded into a model with projectors only with
    ``strict=False``. Returns ``{"missing": [...], "unexpected": [...]}``.
    """
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model'; got {prefer!r}")
    sd: Mapping[str, Any] = state_dict
    if "ema" in sd or "model" in sd:
        other = "model" if prefer == "ema" else "ema"
        key = prefer if prefer in sd else other
        sd = sd[key]
        source = f"{source}[{key!r}]"
    if not isinstance(sd, Mapping):
        raise ValueError(f"{source}: expected a mapping of parameter names to tensors, got {type(sd).__name__}")
    tensors = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        tensors[_normalise_key(k)] = v
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shape_errors = [
        f"{k}: checkpoint {list(tensors[k].shape)} vs model {list(own[k].shape)}"
        for k in sorted(set(own) & set(tensors))
        if tuple(tensors[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if shape_errors:
        problems.append("shape mismatch: " + "; ".join(shape_errors))
    if strict and missing:
        problems.append(f"missing from checkpoint: {missing}")
    if strict and unexpected:
        problems.append(f"not in model: {unexpected}")
    if "pos_embed" in tensors and not shape_errors:
        if not torch.allclose(tensors["pos_embed"].float().cpu(), own["pos_embed"].float().cpu(), atol=1e-4):
            problems.append("pos_embed differs from the fixed 2D sin-cos table (different grid or layout)")
    if problems:
        raise ValueError(f"{source} does not fit this SiT: " + " | ".join(problems))
    to_load = {k: v for k, v in tensors.items() if k in own}
    if "pos_embed" not in to_load:
        to_load["pos_embed"] = own["pos_embed"]
    model.load_state_dict(to_load, strict=False)
    return {"missing": missing, "unexpected": unexpected}
