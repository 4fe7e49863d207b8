"""Conv-transformer hybrids for 2-D and 3-D medical images, built from MONAI and ``backbone`` parts.

``MedicalHybrid``: a MONAI convolutional stem (``Convolution`` + strided ``ResidualUnit``s, 4x down-sampling)
-> tokens + learned position embedding -> ``backbone`` transformer blocks (sparse attention, MoE
feed-forward) -> an attention gate (Attention-U-Net style: the transformer context gates the stem's
local features, giving a spatial attention map that doubles as the saliency map) -> gated pooling ->
dropout -> linear head. Registered as ``medical_hybrid_2d`` and ``medical_hybrid_3d``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from backbone.artifacts import Artifact, verify_artifact
from backbone.blocks import BlockConfig, TransformerBlock
from backbone.ensemble import DeepEnsemble
from backbone.registry import create_model, register_model
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn


@dataclass
class MedicalHybridConfig:
    """One dataclass for the family (2-D and 3-D differ by ``spatial_dims`` and size)."""

    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    img_size: int = 28
    stem_channels: tuple[int, ...] = (16, 32, 64)  # first conv, then one strided ResidualUnit per extra entry
    stem_stride: int = 1  # stride of the first conv (2: it runs at half resolution, 8x cheaper in 3-D)
    dim: int = 64
    depth: int = 2
    heads: int = 4
    stem_subunits: int = 2
    attention: str = "sparse"
    # sparse attention over the token grid: one block = one row (2-D) / one slab (3-D) of tokens; each query
    # block sees its own block plus the top-k routed blocks (of grid blocks in all)
    attn_top_k_blocks: int = 2
    attn_local_blocks: int = 1
    attn_block_size: int | None = None  # default: grid ** (spatial_dims - 1)
    n_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 96
    n_shared_experts: int = 1
    moe_balancing: str = "aux_loss"
    dropout: float = 0.1  # inside the stem and blocks (MC dropout at inference)
    head_dropout: float = 0.3

    @property
    def grid(self) -> int:
        return self.img_size // (self.stem_stride * 2 ** (len(self.stem_channels) - 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stem_channels"] = list(self.stem_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MedicalHybridConfig:
        d = dict(d)
        d["stem_channels"] = tuple(d.get("stem_channels", cls.stem_channels))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


class AttentionGate(nn.Module):
    """Additive attention gate: psi = sigmoid(W_psi relu(W_x x + W_g g)); returns (x * psi, psi)."""

    def __init__(self, spatial_dims: int, channels: int, gate_channels: int, inter: int) -> None:
        super().__init__()
        self.w_x = Convolution(spatial_dims, channels, inter, kernel_size=1, act=None, norm="batch")
        self.w_g = Convolution(spatial_dims, gate_channels, inter, kernel_size=1, act=None, norm="batch")
        self.psi = Convolution(
            spatial_dims, inter, 1, kernel_size=1, act="sigmoid", norm="batch", conv_only=False
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        psi = self.psi(self.relu(self.w_x(x) + self.w_g(g)))
        return x * psi, psi


class MedicalHybrid(nn.Module):
    """MONAI conv stem + backbone transformer blocks + attention gating + classifier."""

    def __init__(self, cfg: MedicalHybridConfig) -> None:
        super().__init__()
        self.cfg = cfg
        nd = cfg.spatial_dims
        chans = list(cfg.stem_channels)
        layers: list[nn.Module] = [
            Convolution(
                nd,
                cfg.in_channels,
                chans[0],
                strides=cfg.stem_stride,
                kernel_size=3,
                act="PRELU",
                norm="batch",
                dropout=None,
            )
        ]
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            layers.append(
                ResidualUnit(
                    nd,
                    c_in,
                    c_out,
                    strides=2,
                    kernel_size=3,
                    subunits=cfg.stem_subunits,
                    act="PRELU",
                    norm="batch",
                    dropout=cfg.dropout,
                )
            )
        self.stem = nn.Sequential(*layers)
        self.proj = Convolution(nd, chans[-1], cfg.dim, kernel_size=1, conv_only=True)
        n_tokens = cfg.grid**nd
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, cfg.dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        block_cfg = BlockConfig(
            dim=cfg.dim,
            n_heads=cfg.heads,
            norm="layernorm",
            dropout=cfg.dropout,
            attn_kind=cfg.attention,  # type: ignore[arg-type]
            block_size=cfg.attn_block_size or cfg.grid ** (nd - 1),
            top_k_blocks=cfg.attn_top_k_blocks,
            local_blocks=cfg.attn_local_blocks,
            ffn="moe",
            n_routed_experts=cfg.n_experts,
            n_shared_experts=cfg.n_shared_experts,
            top_k=cfg.top_k,
            expert_hidden=cfg.expert_hidden,
            balancing=cfg.moe_balancing,  # type: ignore[arg-type]
        )
        self.blocks = nn.ModuleList(TransformerBlock(block_cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.gate = AttentionGate(nd, cfg.dim, cfg.dim, max(cfg.dim // 2, 8))
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(2 * cfg.dim, cfg.num_classes)
        self.last_gate: torch.Tensor | None = None

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (B, 2*dim) and the attention-gate map (B, 1, *grid)."""
        local = self.proj(self.stem(x))  # (B, dim, *grid)
        b, d = local.shape[:2]
        grid = local.shape[2:]
        tokens = local.flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        context = tokens.transpose(1, 2).reshape(b, d, *grid)
        gated, psi = self.gate(local, context)
        pooled_gated = gated.flatten(2).sum(-1) / psi.flatten(2).sum(-1).clamp_min(1e-6)
        pooled_ctx = tokens.mean(dim=1)
        return torch.cat([pooled_gated, pooled_ctx], dim=1), psi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, psi = self.features(x)
        self.last_gate = psi.detach()
        return self.head(self.head_drop(feats))


def build_medical_hybrid(dims: int, **overrides: Any) -> MedicalHybrid:
    """Build from defaults for the dimensionality plus overrides (a config dict from an artifact works)."""
    spatial_dims = dims
    overrides.pop("spatial_dims", None)
    defaults: dict[str, Any] = {"spatial_dims": spatial_dims}
    if spatial_dims == 3:
        defaults.update(stem_channels=(8, 16, 32), stem_subunits=1, dim=48, expert_hidden=64, heads=4)
    defaults.update(overrides)
    defaults["spatial_dims"] = spatial_dims
    return MedicalHybrid(MedicalHybridConfig.from_dict(defaults))


@register_model
def medical_hybrid_2d(**overrides: Any) -> MedicalHybrid:
    """2-D hybrid (e.g. 28x28 chest X-ray)."""
    return build_medical_hybrid(2, **overrides)


@register_model
def medical_hybrid_3d(**overrides: Any) -> MedicalHybrid:
    """3-D hybrid (e.g. 28^3 / 64^3 volumes)."""
    return build_medical_hybrid(3, **overrides)


def build_network(config: dict[str, Any]) -> nn.Module:
    """The network an artifact config describes: ``family`` + ``model`` settings, and a ``DeepEnsemble`` of
    ``ensemble_size`` such networks (probabilities averaged, attention-gate maps averaged) when it is > 1."""
    size = int(config.get("ensemble_size", 1))
    members = [create_model(config["family"], **config["model"]) for _ in range(size)]
    return members[0] if size == 1 else DeepEnsemble(members, average_attrs=("last_gate",))


def load_network(artifact: Artifact) -> nn.Module:
    """Verify an artifact's checksums, build its network and load its safetensors weights (eval mode)."""
    verify_artifact(artifact)
    net = build_network(artifact.config)
    net.load_state_dict(artifact.load_tensors(), strict=True)
    return net.eval()
