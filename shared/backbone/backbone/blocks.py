"""Transformer blocks and encoders built from ``Attention`` and ``MoE``.

``TransformerBlock(BlockConfig)``: pre-norm residual block, ``x + attn(norm(x))`` then ``x + ffn(norm(x))``,
with ``ffn`` a SwiGLU MLP or an ``MoE``. Encoders share one flat config (``BlockConfig`` fields plus their
own), so every preset in ``backbone.registry`` is the same family configured differently:

* ``SequenceEncoder``   feature sequences ``[B, N, in_features]`` (optional irregular ``timestamps``).
* ``PatchEncoder2d``    images ``[B, C, H, W]`` -> conv patch tokens.
* ``PatchEncoder3d``    volumes ``[B, C, D, H, W]`` -> conv patch tokens.

All return ``EncoderOutput(pooled [B, dim], tokens [B, N, dim], logits [B, num_outputs] | None)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from backbone.attention import Attention, AttentionConfig, AttentionKind
from backbone.moe import Expert, MoE, MoEConfig, checkpoint_context_fn


@dataclass
class BlockConfig:
    """Arguments of one transformer block (flat, so registry overrides are plain keywords)."""

    dim: int = 128
    n_heads: int = 4
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    dropout: float = 0.0  # residual dropout
    # attention
    attn_kind: AttentionKind = "dense"
    causal: bool = False
    block_size: int = 64
    top_k_blocks: int = 8
    local_blocks: int = 1
    n_global_tokens: int = 0
    time_decay: bool = False
    decay_init: float = 0.1
    attn_dropout: float = 0.0
    # feed-forward
    ffn: Literal["mlp", "moe"] = "mlp"
    mlp_hidden: int = 0  # 0 -> 4 * dim
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    expert_hidden: int = 0  # 0 -> dim
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_scale: float = 1.0
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    balancing: Literal["none", "aux_loss", "bias"] = "bias"
    aux_loss_coef: float = 0.01
    bias_update_speed: float = 0.001
    capacity_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.ffn not in ("mlp", "moe"):
            raise ValueError(f"ffn must be 'mlp' or 'moe', got {self.ffn!r}")
        self.attention_config()  # validate early
        if self.ffn == "moe":
            self.moe_config()

    def attention_config(self) -> AttentionConfig:
        """The ``AttentionConfig`` of this block."""
        return AttentionConfig(
            dim=self.dim,
            n_heads=self.n_heads,
            kind=self.attn_kind,
            causal=self.causal,
            block_size=self.block_size,
            top_k_blocks=self.top_k_blocks,
            local_blocks=self.local_blocks,
            n_global_tokens=self.n_global_tokens,
            dropout=self.attn_dropout,
            time_decay=self.time_decay,
            decay_init=self.decay_init,
        )

    def moe_config(self) -> MoEConfig:
        """The ``MoEConfig`` of this block's feed-forward (when ``ffn == "moe"``)."""
        return MoEConfig(
            dim=self.dim,
            n_routed_experts=self.n_routed_experts,
            n_shared_experts=self.n_shared_experts,
            top_k=self.top_k,
            expert_hidden=self.expert_hidden or self.dim,
            score_func=self.score_func,
            route_scale=self.route_scale,
            n_expert_groups=self.n_expert_groups,
            n_limited_groups=self.n_limited_groups,
            balancing=self.balancing,
            aux_loss_coef=self.aux_loss_coef,
            bias_update_speed=self.bias_update_speed,
            capacity_factor=self.capacity_factor,
        )


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (DeepSeek ``RMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 (bf16 autocast leaves rms_norm alone), returned in the input dtype
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


def make_norm(cfg: BlockConfig) -> nn.Module:
    """RMSNorm or LayerNorm per ``cfg.norm``."""
    return (
        RMSNorm(cfg.dim, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
    )


class TransformerBlock(nn.Module):
    """Pre-norm block: attention then MLP / MoE, each residual. Honours activation checkpointing."""

    def __init__(self, cfg: BlockConfig, use_moe: bool | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg.attention_config())
        self.ffn_norm = make_norm(cfg)
        use_moe = cfg.ffn == "moe" if use_moe is None else use_moe
        self.ffn: nn.Module = (
            MoE(cfg.moe_config()) if use_moe else Expert(cfg.dim, cfg.mlp_hidden or 4 * cfg.dim)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.checkpointing = False

    @property
    def aux_loss(self) -> torch.Tensor:
        """MoE auxiliary loss of the last forward (0 for an MLP block or without ``aux_loss`` balancing)."""
        return self.ffn.aux_loss if isinstance(self.ffn, MoE) else torch.zeros(())

    def _forward(
        self, x: torch.Tensor, timestamps: torch.Tensor | None, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), timestamps, key_padding_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))

    def forward(
        self,
        x: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x ``[B, N, dim]`` -> ``[B, N, dim]``."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                self._forward,
                x,
                timestamps,
                key_padding_mask,
                use_reentrant=False,
                context_fn=checkpoint_context_fn,
            )
        return self._forward(x, timestamps, key_padding_mask)


def set_activation_checkpointing(model: nn.Module, on: bool = True) -> int:
    """Turn activation checkpointing of every ``TransformerBlock`` in ``model`` on/off; returns the count."""
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    for block in blocks:
        block.checkpointing = on
    return len(blocks)


class EncoderOutput(NamedTuple):
    """Encoder result: pooled ``[B, dim]``, per-token ``[B, N, dim]``, head logits (None without head)."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor | None


@dataclass
class EncoderConfig(BlockConfig):
    """Fields shared by all encoders on top of ``BlockConfig``."""

    depth: int = 2
    n_dense_layers: int = 0  # first layers use an MLP even when ffn == "moe" (DeepSeek n_dense_layers)
    num_outputs: int = 0  # > 0 adds a linear head on the pooled output
    pool: Literal["mean", "cls", "last"] = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in ("mean", "cls", "last"):
            raise ValueError(f"pool must be 'mean', 'cls' or 'last', got {self.pool!r}")


class _Encoder(nn.Module):
    """Blocks + final norm + pooling + optional head, shared by the encoders."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg, use_moe=cfg.ffn == "moe" and i >= cfg.n_dense_layers)
            for i in range(cfg.depth)
        )
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.dim, cfg.num_outputs) if cfg.num_outputs > 0 else None
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _encode(
        self,
        h: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.size(0), -1, -1).to(h.dtype), h], dim=1)
            if timestamps is not None:
                timestamps = torch.cat([timestamps[:, :1], timestamps], dim=1)
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (1, 0), value=False)
        for block in self.blocks:
            h = block(h, timestamps, key_padding_mask)
        h = self.norm(h)
        if self.cls_token is not None:
            pooled, tokens = h[:, 0], h[:, 1:]
        else:
            tokens = h
            keep = None if key_padding_mask is None else (~key_padding_mask).to(h.dtype).unsqueeze(-1)
            if self.cfg.pool == "last":
                if keep is None:
                    pooled = h[:, -1]
                else:
                    last = (keep.squeeze(-1).cumsum(1).argmax(dim=1)).clamp(min=0)
                    pooled = h[torch.arange(h.size(0), device=h.device), last]
            elif keep is None:
                pooled = h.mean(dim=1)
            else:
                pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        logits = self.head(pooled) if self.head is not None else None
        return EncoderOutput(pooled, tokens, logits)


@dataclass
class SequenceEncoderConfig(EncoderConfig):
    """``SequenceEncoder`` arguments."""

    in_features: int = 16
    max_len: int = 1024
    pos_embedding: Literal["learned", "none"] = "learned"


class SequenceEncoder(_Encoder):
    """1-D sequences: linear input projection, positional embedding, N blocks, pooled + per-token outputs."""

    def __init__(self, cfg: SequenceEncoderConfig) -> None:
        super().__init__(cfg)
        self.input_proj = nn.Linear(cfg.in_features, cfg.dim)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, cfg.max_len, cfg.dim)) if cfg.pos_embedding == "learned" else None
        )
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(
        self,
        x: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """x ``[B, N, in_features]``; timestamps ``[B, N]`` float; key_padding_mask ``[B, N]`` True = pad."""
        n = x.size(1)
        if n > self.cfg.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.cfg.max_len}")
        h = self.input_proj(x)
        if self.pos_embed is not None:
            h = h + self.pos_embed[:, :n].to(h.dtype)
        return self._encode(h, timestamps, key_padding_mask)


def _tuple(v: int | tuple[int, ...] | list[int], n: int) -> tuple[int, ...]:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if len(t) != n:
        raise ValueError(f"expected {n} sizes, got {v!r}")
    return t


@dataclass
class PatchEncoderConfig(EncoderConfig):
    """``PatchEncoder2d`` / ``PatchEncoder3d`` arguments (sizes: int or one per spatial axis)."""

    in_chans: int = 1
    img_size: int | tuple[int, ...] = 64
    patch_size: int | tuple[int, ...] = 8
    pool: Literal["mean", "cls", "last"] = "cls"


class _PatchEncoder(_Encoder):
    spatial_dims = 2

    def __init__(self, cfg: PatchEncoderConfig) -> None:
        super().__init__(cfg)
        nd = self.spatial_dims
        img, patch = _tuple(cfg.img_size, nd), _tuple(cfg.patch_size, nd)
        if any(i % p for i, p in zip(img, patch, strict=True)):
            raise ValueError(f"img_size {img} is not divisible by patch_size {patch}")
        self.grid = tuple(i // p for i, p in zip(img, patch, strict=True))
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        self.patch_embed = conv(cfg.in_chans, cfg.dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.dim, *self.grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """x ``[B, C, *spatial]`` -> ``EncoderOutput``; other input sizes interpolate the position grid."""
        h = self.patch_embed(x)
        pos = self.pos_embed
        if tuple(h.shape[2:]) != self.grid:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            pos = F.interpolate(pos, size=h.shape[2:], mode=mode, align_corners=False)
        h = (h + pos.to(h.dtype)).flatten(2).transpose(1, 2)
        return self._encode(h)


class PatchEncoder2d(_PatchEncoder):
    """Images ``[B, C, H, W]``: conv patch embedding, optional CLS token, N blocks."""

    spatial_dims = 2


class PatchEncoder3d(_PatchEncoder):
    """Volumes ``[B, C, D, H, W]``: conv patch embedding, optional CLS token, N blocks."""

    spatial_dims = 3
