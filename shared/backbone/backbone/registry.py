"""timm-style registry: ``@register_model`` presets, ``create_model(name, **overrides)``, ``list_models``.

A preset is a function ``name(**overrides) -> nn.Module`` that fills a config dataclass with its defaults;
``overrides`` replace config fields (``create_model("seq_moe_tiny", depth=4, n_routed_experts=16)``); an
unknown key raises ``TypeError`` naming the valid fields. Models keep their config as ``model.cfg`` and the
preset name as ``model.model_name``, so ``create_model(model.model_name, **dataclasses.asdict(model.cfg))``
rebuilds the same architecture.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from backbone.blocks import (
    PatchEncoder2d,
    PatchEncoder3d,
    PatchEncoderConfig,
    SequenceEncoder,
    SequenceEncoderConfig,
)
from backbone.moe import moe_layers, reset_routing_stats, routing_stats, total_aux_loss

__all__ = [
    "build_model",
    "create_model",
    "is_model",
    "list_models",
    "moe_layers",
    "register_model",
    "reset_routing_stats",
    "routing_stats",
    "total_aux_loss",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_Fn = TypeVar("_Fn", bound=Callable[..., nn.Module])


def register_model(fn: _Fn) -> _Fn:
    """Decorator: register ``fn(**overrides) -> nn.Module`` under ``fn.__name__``."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered model names matching the shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _MODELS


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace fields of its config dataclass."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    model = _MODELS[name](**overrides)
    model.model_name = name
    return model


def build_model(
    model_cls: Callable[[Any], nn.Module],
    config_cls: type,
    defaults: dict[str, Any],
    overrides: dict[str, Any],
) -> nn.Module:
    """``model_cls(config_cls(**(defaults | overrides)))`` with a clear error for unknown keys."""
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for {config_cls.__name__}; "
            f"valid options: {', '.join(sorted(valid))}"
        )
    return model_cls(config_cls(**{**defaults, **overrides}))


# ------------------------------------------------------------------------------------------------ presets
_TINY_MOE = dict(ffn="moe", n_routed_experts=8, n_shared_experts=1, top_k=2, balancing="bias")


@register_model
def seq_moe_tiny(**overrides: Any) -> nn.Module:
    """1-D MoE encoder, dim 64, 2 blocks, sparse attention (blocks of 16: 2 routed + 1 local), 8 experts."""
    defaults = dict(
        dim=64, n_heads=4, depth=2, attn_kind="sparse", block_size=16, top_k_blocks=2, local_blocks=1,
        expert_hidden=64, **_TINY_MOE,
    )  # fmt: skip
    return build_model(SequenceEncoder, SequenceEncoderConfig, defaults, overrides)


@register_model
def seq_moe_small(**overrides: Any) -> nn.Module:
    """1-D MoE encoder, dim 192, 4 blocks, sparse attention + global CLS token, 16 sigmoid experts."""
    defaults = dict(
        dim=192, n_heads=6, depth=4, n_dense_layers=1, attn_kind="sparse", block_size=32, top_k_blocks=4,
        local_blocks=2, n_global_tokens=1, pool="cls", ffn="moe", n_routed_experts=16, n_shared_experts=1,
        top_k=4, expert_hidden=128, score_func="sigmoid", route_scale=2.5, n_expert_groups=4,
        n_limited_groups=2, balancing="bias", max_len=4096,
    )  # fmt: skip
    return build_model(SequenceEncoder, SequenceEncoderConfig, defaults, overrides)


@register_model
def seq_decay_tiny(**overrides: Any) -> nn.Module:
    """1-D MoE encoder with temporal-decay attention over (irregular) timestamps, dim 64, 2 blocks."""
    defaults = dict(dim=64, n_heads=4, depth=2, attn_kind="temporal_decay", expert_hidden=64, **_TINY_MOE)
    return build_model(SequenceEncoder, SequenceEncoderConfig, defaults, overrides)


@register_model
def seq_hybrid_tiny(**overrides: Any) -> nn.Module:
    """Hybrid attention: sliding window + routed blocks + 1 global CLS token + temporal decay; causal."""
    defaults = dict(
        dim=64, n_heads=4, depth=2, attn_kind="sparse", time_decay=True, causal=True, block_size=16,
        top_k_blocks=2, local_blocks=2, n_global_tokens=1, pool="cls", expert_hidden=64, **_TINY_MOE,
    )  # fmt: skip
    return build_model(SequenceEncoder, SequenceEncoderConfig, defaults, overrides)


@register_model
def seq_dense_tiny(**overrides: Any) -> nn.Module:
    """Dense baseline / student: dense attention and SwiGLU MLP, dim 64, 2 blocks."""
    defaults = dict(dim=64, n_heads=4, depth=2, attn_kind="dense", ffn="mlp", mlp_hidden=128)
    return build_model(SequenceEncoder, SequenceEncoderConfig, defaults, overrides)


@register_model
def patch2d_moe_tiny(**overrides: Any) -> nn.Module:
    """Image MoE encoder: 64x64 input, 8x8 patches (64 tokens) + CLS, dim 64, 2 blocks, 8 experts top-2."""
    defaults = dict(
        dim=64, n_heads=4, depth=2, in_chans=1, img_size=64, patch_size=8, pool="cls", expert_hidden=64,
        **_TINY_MOE,
    )  # fmt: skip
    return build_model(PatchEncoder2d, PatchEncoderConfig, defaults, overrides)


@register_model
def patch3d_moe_tiny(**overrides: Any) -> nn.Module:
    """Volume MoE encoder: 32^3 input, 8^3 patches (64 tokens) + CLS, dim 64, 2 blocks, 8 experts top-2."""
    defaults = dict(
        dim=64, n_heads=4, depth=2, in_chans=1, img_size=32, patch_size=8, pool="cls", expert_hidden=64,
        **_TINY_MOE,
    )  # fmt: skip
    return build_model(PatchEncoder3d, PatchEncoderConfig, defaults, overrides)
