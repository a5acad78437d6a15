"""JiT ("Just image Transformer", Li & He 2025): a plain ViT that denoises raw pixels.

Architecture as the paper and the official code (``LTH14/JiT``, also the iREPA release's
``jit/model_jit.py``) build it, with the same parameter names so that checkpoints line up:

====================================  =====================================================
name                                  what it is
====================================  =====================================================
``x_embedder.proj1.weight``           bottleneck patch embedding: Conv2d(3, bottleneck, p,
                                      stride p, no bias) ...
``x_embedder.proj2.{weight,bias}``    ... then a 1x1 Conv2d(bottleneck, hidden)
``pos_embed``                         fixed 2D sin-cos table [1, T, hidden] (added once)
``t_embedder.mlp.{0,2}.*``            time MLP on 256 sinusoidal frequencies of t in [0, 1]
``y_embedder.embedding_table.weight`` ``num_classes + 1`` rows (last = the null class)
``in_context_posemb``                 [1, L, hidden] learned; in-context class tokens are
                                      ``y_emb + in_context_posemb``, prepended before block
                                      ``in_context_start`` (0-based) and dropped at the end
``blocks.N.norm{1,2}.weight``         RMSNorm (eps 1e-6, computed in float32)
``blocks.N.attn.qkv / attn.proj``     attention; ``attn.{q,k}_norm.weight`` RMSNorm per head
``blocks.N.mlp.w12 / mlp.w3``         SwiGLU: hidden ``int(int(D * mlp_ratio) * 2 / 3)``
``blocks.N.adaLN_modulation.1``       adaLN-Zero: shift/scale/gate x2 from ``t_emb + y_emb``
``final_layer.*``                     RMSNorm, adaLN shift/scale, Linear to p*p*3
``projectors.K.*``                    alignment projector K (:mod:`irepa.trainer.align`;
                                      the release wraps it as ``projectors.K.projection_layer``)
====================================  =====================================================

Positions: 2-D RoPE on queries and keys after qk-norm, as the official
``VisionRotaryEmbeddingFast`` with ``dim = head_dim / 2`` and ``theta = 10000``: the head
dimension is split in two halves, the first rotated by the token's **row** index and the
second by its **column** index, each half as ``head_dim / 4`` interleaved pairs ``(2j, 2j+1)``
with frequency ``theta ** (-4j / head_dim)``. The in-context tokens are not rotated (cos 1,
sin 0), in every block from ``in_context_start`` on.

Conventions: ``t`` in [0, 1] with t = 1 the clean image (JiT's); the network predicts the clean
image (x-prediction) with 3 output channels; ``forward`` returns the tokens after block
``encoder_depth`` (1-based) with the in-context tokens removed, on the patch grid, for the
alignment loss (:class:`irepa.trainer.align.AlignmentLoss` projects them), or None without
projectors. Label dropout happens outside the model (the objective swaps in the null class).

Dropout (``attn_drop`` / ``proj_drop``, the middle half of the blocks as the official code)
defaults to 0, as the release trains JiT-B; non-zero dropout draws from torch's global
generator, so such runs do not keep N ranks == 1 rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from irepa.trainer.config import model_size
from irepa.trainer.models import TimestepEmbedder, get_2d_sincos_pos_embed, modulate, unpatchify, xavier_init_linears

__all__ = ["JIT_CONFIGS", "JiT", "build_jit", "RMSNorm", "rope_tables", "apply_rope", "DEFAULT_ENCODER_DEPTH",
           "jit_grid"]

# name -> architecture; widths / depths / heads / bottleneck / in-context tokens as the paper's
# Table and the official model table (JiT-G as the official code: 40 x 1664, 16 heads).
JIT_CONFIGS: dict[str, dict[str, int]] = {}
for _size, (_hidden, _depth, _heads, _bottleneck, _ic_start) in {
    "B": (768, 12, 12, 128, 4),
    "L": (1024, 24, 16, 128, 8),
    "H": (1280, 32, 16, 256, 10),
    "G": (1664, 40, 16, 256, 10),
}.items():
    for _patch in (16, 32):
        JIT_CONFIGS[f"JiT-{_size}/{_patch}"] = dict(
            hidden_size=_hidden, depth=_depth, num_heads=_heads, patch_size=_patch,
            bottleneck_dim=_bottleneck, in_context_len=32, in_context_start=_ic_start)

#: Alignment depth (1-based block output) when none is given. JiT-B: 4, the iREPA README's
#: JiT command (``--encoder_depth=4``; the release's argparse default is 8). L/H/G: 8 (that
#: argparse default, and REPA's choice for its large models).
DEFAULT_ENCODER_DEPTH = {"B": 4, "L": 8, "H": 8, "G": 8}

_ATTN_BACKENDS = ("sdpa", "math")


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm with a learned gain, computed in float32 and cast back (as the official code)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, grid: tuple[int, int], num_prefix: int = 0,
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables [num_prefix + gh * gw, head_dim] of JiT's 2-D RoPE.

    Token ``n = r * gw + c`` (raster order) rotates pair ``j`` of the first half of the head by
    ``r * f_j`` and pair ``j`` of the second half by ``c * f_j``, ``f_j = theta ** (-2j / (head_dim/2))``;
    pair members are interleaved (dims ``2j, 2j+1``). ``num_prefix`` leading rows (in-context
    tokens) are the identity (cos 1, sin 0).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4; got {head_dim}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half)  # [head_dim/4]
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float32)[:, None] * freqs  # [gh, head_dim/4]
    cols = torch.arange(gw, dtype=torch.float32)[:, None] * freqs
    rows = rows.repeat_interleave(2, dim=-1)[:, None, :].expand(gh, gw, half)
    cols = cols.repeat_interleave(2, dim=-1)[None, :, :].expand(gh, gw, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(gh * gw, head_dim)
    cos, sin = angles.cos(), angles.sin()
    if num_prefix:
        cos = torch.cat([torch.ones(num_prefix, head_dim), cos])
        sin = torch.cat([torch.zeros(num_prefix, head_dim), sin])
    return cos, sin


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) over the last dimension."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., T, head_dim] by the tables [T, head_dim] (float32 math, as the official
    code, whose float32 tables promote half-precision inputs)."""
    xf = x.float()
    return xf * cos + _rotate_pairs(xf) * sin


class BottleneckPatchEmbed(nn.Module):
    """[B, 3, H, W] -> [B, T, hidden]: p x p conv to ``bottleneck_dim`` (no bias), 1x1 conv to hidden."""

    def __init__(self, input_size: tuple[int, int], patch_size: int, in_channels: int, bottleneck_dim: int,
                 hidden_size: int):
        super().__init__()
        h, w = input_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch_size}")
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim, hidden_size, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Self-attention with per-head RMSNorm on q and k (qk-norm), then 2-D RoPE.

    ``backend``: ``sdpa`` (torch scaled_dot_product_attention) or ``math`` (explicit float32
    softmax, as the official code computes it; the reference for tests).
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if backend not in _ATTN_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {_ATTN_BACKENDS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        p = self.attn_drop if self.training else 0.0
        if self.backend == "sdpa":
            out = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, dropout_p=p)
        else:
            w = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            w = F.dropout(w.softmax(dim=-1), p, training=p > 0)
            out = w.to(v.dtype) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``(a, b) = w12(x).chunk(2)``; hidden = 2/3 of ``hidden``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        hidden = int(hidden * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(a) * b))


class JiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn: str = "sdpa"):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, attn_drop, proj_drop, backend=attn)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, int(hidden_size * mlp_ratio), drop=proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """RMSNorm, adaLN shift/scale, Linear to p*p*C values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------
# JiT
# --------------------------------------------------------------------------------------
class JiT(nn.Module):
    """JiT x-prediction network with optional alignment projectors.

    ``forward(x, t, y)`` -> ``(x_pred, h)``: the predicted clean image [B, C, H, W] for noisy
    pixels ``x`` at JiT times ``t`` [B] (t = 1 is data) and labels ``y`` [B] (``num_classes`` =
    null), and the block-``encoder_depth`` patch tokens [B, gh * gw, hidden] without the
    in-context tokens (None when the model has no projectors).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        bottleneck_dim: int = 128,
        in_context_len: int = 32,
        in_context_start: int = 4,
        num_classes: int = 1000,
        encoder_depth: int = 4,
        z_dims: tuple[int, ...] | list[int] = (),
        projector: str = "conv",
        projector_kernel: int = 3,
        projector_dim: int = 2048,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn: str = "sdpa",
    ):
        super().__init__()
        from irepa.trainer.align import build_projector

        input_hw = (input_size, input_size) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
        z_dims = tuple(int(z) for z in z_dims)
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}] (1-based block index); got {encoder_depth}")
        if in_context_len < 0:
            raise ValueError(f"in_context_len must be >= 0; got {in_context_len}")
        if in_context_len and not 0 <= in_context_start < depth:
            raise ValueError(f"in_context_start must be in [0, depth={depth}) (0-based block index); "
                             f"got {in_context_start}")
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.in_context_len = in_context_len
        self.in_context_start = in_context_start
        self.z_dims = z_dims
        self.input_size = input_hw

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.x_embedder = BottleneckPatchEmbed(input_hw, patch_size, in_channels, bottleneck_dim, hidden_size)
        self.grid_size = self.x_embedder.grid_size
        self.register_buffer(
            "pos_embed",
            torch.tensor(get_2d_sincos_pos_embed(hidden_size, self.grid_size), dtype=torch.float32).unsqueeze(0),
            persistent=True)
        if in_context_len:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
        head_dim = hidden_size // num_heads
        cos, sin = rope_tables(head_dim, self.grid_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        cos, sin = rope_tables(head_dim, self.grid_size, num_prefix=in_context_len)
        self.register_buffer("rope_cos_ic", cos, persistent=False)
        self.register_buffer("rope_sin_ic", sin, persistent=False)
        mid = range(depth // 4, depth // 4 * 3)  # dropout only in the middle half, as the official code
        self.blocks = nn.ModuleList([
            JiTBlock(hidden_size, num_heads, mlp_ratio, attn_drop if i in mid else 0.0,
                     proj_drop if i in mid else 0.0, attn=attn)
            for i in range(depth)])
        self.projectors = nn.ModuleList([
            build_projector(projector, hidden_size, z, kernel=projector_kernel, projector_dim=projector_dim,
                            grid=self.grid_size)
            for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init: xavier Linear and patch convs, N(0, 0.02) tables and in-context
        embedding, zero adaLN and output layers."""
        xavier_init_linears(self)
        for w in (self.x_embedder.proj1.weight, self.x_embedder.proj2.weight):
            nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.in_context_len:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]."""
        return unpatchify(x, self.patch_size, self.out_channels, self.grid_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.shape[1:] != (self.in_channels, *self.input_size):
            raise ValueError(f"JiT expects images [B, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}]; "
                             f"got {list(x.shape)}")
        t = t.reshape(-1)
        if t.shape[0] == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        if (y.numel() and y.device.type == "cpu" and not torch.compiler.is_compiling()
                and (int(y.min()) < 0 or int(y.max()) > self.num_classes)):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}] (null class = {self.num_classes}); "
                             f"got min {int(y.min())}, max {int(y.max())}")
        y_emb = self.y_embedder.embedding_table(y)
        c = self.t_embedder(t) + y_emb
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        L, start = self.in_context_len, self.in_context_start
        h_out = None
        for i, block in enumerate(self.blocks):
            inserted = L > 0 and i >= start
            if L > 0 and i == start:
                tokens = torch.cat([y_emb.unsqueeze(1) + self.in_context_posemb, tokens], dim=1)
            if inserted:
                tokens = block(tokens, c, self.rope_cos_ic, self.rope_sin_ic)
            else:
                tokens = block(tokens, c, self.rope_cos, self.rope_sin)
            if i + 1 == self.encoder_depth and len(self.projectors):
                h_out = tokens[:, L:] if inserted else tokens
        out = self.final_layer(tokens[:, L:] if L > 0 else tokens, c)
        return self.unpatchify(out), h_out


# --------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------
_OVERRIDES = {"hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "bottleneck_dim", "in_context_len",
              "in_context_start"}


def build_jit(
    name: str,
    input_size: int | tuple[int, int] = 256,
    in_channels: int = 3,
    num_classes: int = 1000,
    encoder_depth: int | None = None,
    z_dims: tuple[int, ...] | list[int] = (),
    projector: str = "conv",
    projector_kernel: int = 3,
    projector_dim: int = 2048,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
    attn: str = "sdpa",
    **overrides: Any,
) -> JiT:
    """Build ``JiT-{B,L,H,G}/{16,32}`` (``JIT_CONFIGS``) with ``build_kwargs`` for checkpoints.

    ``encoder_depth`` None takes :data:`DEFAULT_ENCODER_DEPTH` (capped at the depth when
    ``overrides`` shrink the model). ``overrides`` may set ``hidden_size``, ``depth``,
    ``num_heads``, ``patch_size``, ``mlp_ratio``, ``bottleneck_dim``, ``in_context_len`` or
    ``in_context_start`` (tiny test models; a None value keeps the table's).
    """
    if name not in JIT_CONFIGS:
        raise ValueError(f"unknown JiT model {name!r}; expected one of {sorted(JIT_CONFIGS)}")
    bad = set(overrides) - _OVERRIDES
    if bad:
        raise TypeError(f"build_jit got unexpected overrides {sorted(bad)}; allowed: {sorted(_OVERRIDES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = {**JIT_CONFIGS[name], **overrides}
    if encoder_depth is None:
        encoder_depth = min(DEFAULT_ENCODER_DEPTH[model_size(name)], cfg["depth"])
    model = JiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, encoder_depth=encoder_depth,
                z_dims=tuple(z_dims), projector=projector, projector_kernel=projector_kernel,
                projector_dim=projector_dim, attn_drop=attn_drop, proj_drop=proj_drop, attn=attn, **cfg)
    model.build_kwargs = dict(
        name=name, input_size=input_size if isinstance(input_size, int) else list(input_size),
        in_channels=in_channels, num_classes=num_classes, encoder_depth=encoder_depth, z_dims=list(z_dims),
        projector=projector, projector_kernel=projector_kernel, projector_dim=projector_dim,
        attn_drop=attn_drop, proj_drop=proj_drop, attn=attn, **overrides)
    return model


def jit_grid(name: str, input_size: int | tuple[int, int], patch_size: int | None = None) -> tuple[int, int]:
    """Patch grid (gh, gw) of ``name`` at ``input_size`` without building the model."""
    if name not in JIT_CONFIGS:
        raise ValueError(f"unknown JiT model {name!r}; expected one of {sorted(JIT_CONFIGS)}")
    p = int(patch_size or JIT_CONFIGS[name]["patch_size"])
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    return (int(h) // p, int(w) // p)
