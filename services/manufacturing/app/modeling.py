"""The manufacturing defect classifier: a timm CNN trunk (trained from scratch) + a backbone stage.

``DefectNet`` = ``timm.create_model(trunk, pretrained=False)`` feature map -> 1x1 projection -> depthwise
positional conv -> tokens -> backbone transformer stage (``backbone.attention`` sparse block attention +
``backbone.moe`` MoE feed-forward) -> mean pool -> linear classifier. The same trunk is the PatchCore
feature extractor (``forward_intermediates``). Both families (teacher and edge student) are registered
with ``backbone.registry`` so ``create_model("manufacturing_defectnet", ...)`` builds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import timm
import torch
from backbone.blocks import BlockConfig, TransformerBlock
from backbone.registry import create_model, register_model
from torch import nn

MODEL_NAME = "manufacturing_defectnet"
STUDENT_NAME = "manufacturing_defectnet_student"


@dataclass
class DefectNetConfig:
    """One dataclass per model family: every field travels in the artifact's config.json."""

    trunk: str = "resnet18"
    trunk_kwargs: dict[str, Any] = field(default_factory=lambda: {"channels": [32, 64, 128, 256]})
    in_chans: int = 1
    num_classes: int = 6
    image_size: int = 128
    dim: int = 128
    n_heads: int = 4
    attention: str = "sparse"  # backbone AttentionConfig.kind
    block_size: int = 4  # tokens per attention block (feature map 4x4 at 128 px -> 4 blocks)
    top_k_blocks: int = 2
    local_blocks: int = 1
    n_experts: int = 4
    moe_top_k: int = 2
    expert_hidden: int = 256
    n_shared_experts: int = 1
    n_blocks: int = 1
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DefectNetConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def block_config(cfg: DefectNetConfig) -> BlockConfig:
    """The backbone ``BlockConfig`` of the token stage: sparse block attention + MoE feed-forward."""
    return BlockConfig(
        dim=cfg.dim,
        n_heads=cfg.n_heads,
        norm="layernorm",
        dropout=cfg.dropout,
        attn_kind=cfg.attention,  # type: ignore[arg-type]
        block_size=cfg.block_size,
        top_k_blocks=cfg.top_k_blocks,
        local_blocks=cfg.local_blocks,
        ffn="moe",
        n_routed_experts=cfg.n_experts,
        n_shared_experts=cfg.n_shared_experts,
        top_k=cfg.moe_top_k,
        expert_hidden=cfg.expert_hidden,
        balancing="aux_loss",
    )


class DefectNet(nn.Module):
    """timm trunk + backbone token stage + linear classifier; input (B, in_chans, S, S) normalised grey."""

    def __init__(self, cfg: DefectNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = timm.create_model(
            cfg.trunk, pretrained=False, num_classes=0, global_pool="",
            in_chans=cfg.in_chans, **cfg.trunk_kwargs,
        )
        c = self.trunk.num_features
        self.proj = nn.Conv2d(c, cfg.dim, 1)
        self.pos = nn.Conv2d(cfg.dim, cfg.dim, 3, padding=1, groups=cfg.dim)  # resolution-free position
        self.stages = nn.ModuleList(TransformerBlock(block_config(cfg)) for _ in range(cfg.n_blocks))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, dim)."""
        f = self.proj(self.trunk.forward_features(x))
        f = f + self.pos(f)
        tokens = f.flatten(2).transpose(1, 2)  # B N dim
        for stage in self.stages:
            tokens = stage(tokens)
        return self.norm(tokens.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model
def manufacturing_defectnet(**overrides: Any) -> DefectNet:
    """Registered teacher family: resnet18 (narrow) trunk + sparse-attention/MoE stage, 6 NEU classes."""
    return DefectNet(DefectNetConfig.from_dict(overrides))


def student_config(**overrides: Any) -> DefectNetConfig:
    """The edge student: a thinner, shallower timm trunk and a small MoE head."""
    base: dict[str, Any] = {
        "trunk": "resnet10t",
        "trunk_kwargs": {"channels": [16, 32, 64, 128]},
        "dim": 64,
        "n_heads": 2,
        "expert_hidden": 128,
        "n_experts": 4,
    }
    base.update(overrides)
    return DefectNetConfig.from_dict(base)


@register_model
def manufacturing_defectnet_student(**overrides: Any) -> DefectNet:
    """Registered edge-student family (defaults: :func:`student_config`)."""
    return DefectNet(student_config(**overrides))


class DefectNetEnsemble(nn.Module):
    """Members of one family trained alike from different seeds. The prediction is their mean class
    distribution, returned as its log: a logit vector whose softmax is that mean, so every caller of a
    single ``DefectNet`` (argmax, softmax, distillation at a temperature) works unchanged. ``cfg`` and
    ``trunk`` are the first member's (the trunk serves PatchCore's ``trunk`` features)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    @property
    def cfg(self) -> DefectNetConfig:
        return self.members[0].cfg

    @property
    def trunk(self) -> nn.Module:
        return self.members[0].trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


def create_defectnet(kind: str, cfg: DefectNetConfig) -> DefectNet:
    """Build the teacher (``kind="teacher"``) or the student from a full config via ``backbone.registry``."""
    name = MODEL_NAME if kind == "teacher" else STUDENT_NAME
    return create_model(name, **cfg.to_dict())  # type: ignore[return-value]


class QuantizedTrunk(nn.Module):
    """A static-INT8 trunk (FX graph of the timm trunk's ``forward_features``) in the trunk's place."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    forward = forward_features


def quantize_defectnet(
    model: DefectNet | DefectNetEnsemble, calibration: torch.Tensor, batch: int = 32
) -> DefectNet | DefectNetEnsemble:
    """INT8 copy for CPU / edge inference: the CNN trunk statically quantized (Conv+BN+ReLU fused, int8
    activations calibrated on ``calibration`` images (N, C, S, S)), the token stage's and head's Linear
    layers dynamically quantized (an ensemble: each member). ``model`` is left unchanged."""
    if isinstance(model, DefectNetEnsemble):
        return DefectNetEnsemble([quantize_defectnet(m, calibration, batch) for m in model.members]).eval()
    from backbone.quantization import quantize_int8, quantize_static_int8

    batches = [calibration[i : i + batch] for i in range(0, calibration.shape[0], batch)]
    trunk = QuantizedTrunk(quantize_static_int8(model.trunk, batches, method="forward_features"))
    original = model.trunk
    try:
        model.trunk = nn.Identity()  # not copied twice: the quantized copy gets the new trunk below
        qmodel = quantize_int8(model)
    finally:
        model.trunk = original
    qmodel.trunk = trunk
    return qmodel.eval()
