"""LoRA adapters: injection by name pattern, exact merge / unmerge, safetensors adapter files, AdapterBank.

A LoRA layer is the original ``nn.Linear`` / ``nn.Conv2d`` object with its class swapped in place, so the
base parameters keep their identity and their state-dict keys (``blocks.0.attn.qkv.weight`` stays as it is).
Each LoRA layer holds every resident adapter (``lora_A[name]``, ``lora_B[name]``) and one active key;
switching adapters is a pointer swap, no weight is copied::

    y = x W^T + b + scaling * dropout(x) A^T B^T,     scaling = alpha / r

Target selection (``LoraConfig.target_modules``) over ``model.named_modules()``:

* a ``str`` is a regular expression that must match the full module name (``r"blocks\\.\\d+\\.attn\\.qkv"``);
* a sequence of patterns: a pattern with a wildcard (``*?[``) is an fnmatch over the full name
  (``"blocks.*.mlp.fc?"``), any other pattern matches the full name or a ``.``-separated suffix (``"qkv"``).

Only modules whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``) are adapted; other matched
modules (containers, subclasses such as ``nn.MultiheadAttention.out_proj``) are skipped.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "AdapterBank",
    "LoraConfig",
    "LoraConv2d",
    "LoraLayer",
    "LoraLinear",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "read_adapter_config",
    "merge_lora",
    "remove_lora",
    "save_adapter",
    "set_active_adapter",
    "unmerge_lora",
]


@dataclass
class LoraConfig:
    """Adapter hyper-parameters and target selection (see module docstring for pattern rules)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] = ("qkv", "proj", "fc1", "fc2")
    init_lora_weights: bool = True  # True: B = 0 (adapter starts as identity); False: A and B random (tests)
    extra: dict = field(default_factory=dict)  # free-form metadata kept in the adapter file

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _matches(name: str, target: str | Sequence[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    for pattern in target:
        if any(c in pattern for c in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


class LoraLayer:
    """Mixin holding the resident adapters of one layer (subclasses: ``_delta_out``, ``delta_weight``)."""

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict
    lora_dropout: nn.ModuleDict
    scaling: dict[str, float]
    active_adapter: str | None
    merged_adapter: str | None
    weight: nn.Parameter

    def _init_lora(self) -> None:
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling = {}
        self.active_adapter = None
        self.merged_adapter = None

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float, init_lora_weights: bool = True
    ) -> None:
        """Create adapter ``name`` (A: kaiming-uniform, B: zeros unless ``init_lora_weights`` is False)."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        shape_a, shape_b = self._lora_shapes(r)
        kw = {"dtype": self.weight.dtype, "device": self.weight.device}
        a, b = torch.empty(shape_a, **kw), torch.empty(shape_b, **kw)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(b)
        else:
            nn.init.normal_(b, std=1.0 / r)
        self.lora_A[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / r

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: base only). Keeps the merged state consistent."""
        if name is not None and name not in self.lora_A:
            raise KeyError(f"unknown adapter {name!r}")
        if self.merged_adapter is not None and self.merged_adapter != name:
            self.unmerge()
            self.active_adapter = name
            if name is not None:
                self.merge()
        self.active_adapter = name

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weight (no-op if already merged or none active)."""
        if self.active_adapter is None or self.merged_adapter is not None:
            return
        self._add_delta(self.active_adapter, 1.0)
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter from the base weight."""
        if self.merged_adapter is None:
            return
        self._add_delta(self.merged_adapter, -1.0)
        self.merged_adapter = None

    def _add_delta(self, name: str, sign: float) -> None:
        """``W += sign * scaling * B @ A`` in place (one fused addmm, no temporary delta tensor)."""
        w = self.weight.view(self.weight.shape[0], -1)
        b, a = self.lora_B[name], self.lora_A[name]
        w.addmm_(b.view(b.shape[0], -1), a.view(a.shape[0], -1), alpha=sign * self.scaling[name])

    def _delta_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _lora_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return out
        return out + self._delta_out(self.lora_dropout[name](x), name) * self.scaling[name]


class LoraLinear(nn.Linear, LoraLayer):
    """``nn.Linear`` with resident LoRA adapters: A (r, in), B (out, r)."""

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    def _delta_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A[name]), self.lora_B[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._lora_forward(x, F.linear(x, self.weight, self.bias))


class LoraConv2d(nn.Conv2d, LoraLayer):
    """``nn.Conv2d`` with resident LoRA adapters: A is a (r, in, kh, kw) conv, B a 1x1 (out, r) conv."""

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_channels, *self.kernel_size), (self.out_channels, r, 1, 1)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        return (b.flatten(1) @ a.flatten(1)).view_as(self.weight) * self.scaling[name]

    def _delta_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        h = self._conv_forward(x, self.lora_A[name], None)
        return F.conv2d(h, self.lora_B[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._lora_forward(x, self._conv_forward(x, self.weight, self.bias))


_LORA_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: LoraLinear, nn.Conv2d: LoraConv2d}


def _to_lora(module: nn.Module) -> LoraLayer | None:
    """Swap the class of a plain Linear / Conv2d in place (parameters keep identity); None if unsupported."""
    if isinstance(module, LoraLayer):
        return module
    cls = _LORA_CLASSES.get(type(module))
    if cls is None:
        return None
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return None
    module.__class__ = cls
    module._init_lora()
    return module


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """All LoRA layers of ``model`` as (qualified name, layer)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> list[str]:
    """Add adapter ``adapter_name`` to every supported module matching ``config.target_modules``.

    Modifies ``model`` in place, makes the new adapter active on the layers it touched and returns their
    names.
    """
    if isinstance(model, LoraLayer):
        raise ValueError("inject into the parent model, not into a single layer")
    names = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, config.target_modules):
            continue
        layer = _to_lora(module)
        if layer is None:
            continue
        layer.add_adapter(adapter_name, config.r, config.alpha, config.dropout, config.init_lora_weights)
        layer.set_adapter(adapter_name)
        names.append(name)
    if not names:
        raise ValueError(f"no nn.Linear / nn.Conv2d module matches {config.target_modules!r}")
    model._lora_configs = {**getattr(model, "_lora_configs", {}), adapter_name: config}  # type: ignore[attr-defined]
    return names


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Activate ``name`` on every layer that has it (others run base only); None: base model everywhere."""
    found = False
    for _, layer in lora_layers(model):
        has = name is not None and name in layer.lora_A
        found |= has
        layer.set_adapter(name if has else None)
    if name is not None and not found:
        raise KeyError(f"unknown adapter {name!r}")


def merge_lora(model: nn.Module) -> None:
    """Merge the active adapter of every LoRA layer into its base weight (fastest inference)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> None:
    """Turn LoRA layers back into plain modules, optionally merging the active adapter first."""
    for _, layer in lora_layers(model):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        for attr in ("lora_A", "lora_B", "lora_dropout"):
            delattr(layer, attr)
        for attr in ("scaling", "active_adapter", "merged_adapter"):
            layer.__dict__.pop(attr, None)
        layer.__class__ = next(base for base, cls in _LORA_CLASSES.items() if isinstance(layer, cls))
    model.__dict__.pop("_lora_configs", None)


def mark_only_lora_trainable(model: nn.Module, adapter_name: str | None = None) -> int:
    """Freeze everything except LoRA A/B (of ``adapter_name`` only, if given); returns the trainable count."""
    n = 0
    for pname, p in model.named_parameters():
        is_lora = ".lora_A." in f".{pname}" or ".lora_B." in f".{pname}"
        train = is_lora and (adapter_name is None or pname.endswith(f".{adapter_name}"))
        p.requires_grad_(train)
        n += p.numel() if train else 0
    return n


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter tensors keyed ``<module>.lora_A`` / ``<module>.lora_B`` (independent of the adapter name)."""
    out = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{name}.lora_A"] = layer.lora_A[adapter_name].detach()
            out[f"{name}.lora_B"] = layer.lora_B[adapter_name].detach()
    if not out:
        raise KeyError(f"unknown adapter {adapter_name!r}")
    return out


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write only the adapter's A/B tensors to a safetensors file; the config travels as JSON metadata."""
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model, adapter_name).items()}
    config = getattr(model, "_lora_configs", {}).get(adapter_name)
    first = next(layer for _, layer in lora_layers(model) if adapter_name in layer.lora_A)
    r = first.lora_A[adapter_name].shape[0]
    meta = {
        "r": r,
        "alpha": first.scaling[adapter_name] * r,
        "dropout": config.dropout if config else 0.0,
        "modules": sorted({k.rsplit(".", 1)[0] for k in tensors}),
        "adapter_name": adapter_name,
        "extra": config.extra if config else {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "lora_config": json.dumps(meta)})
    return path


def read_adapter_config(path: str | Path) -> dict:
    """The JSON config stored in an adapter file."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["lora_config"])


def load_adapter(
    model: nn.Module, path: str | Path, adapter_name: str | None = None, activate: bool = True
) -> str:
    """Load an adapter file into ``model`` (injecting LoRA layers where needed); returns the adapter name."""
    meta = read_adapter_config(path)
    name = adapter_name or meta["adapter_name"]
    modules = dict(model.named_modules())
    missing = [m for m in meta["modules"] if m not in modules]
    if missing:
        raise KeyError(f"adapter modules not in model: {missing[:5]}")
    config = LoraConfig(
        r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"],
        target_modules="|".join(re.escape(m) for m in meta["modules"]), extra=meta.get("extra", {}),
    )
    active = {n: layer.active_adapter for n, layer in lora_layers(model)}
    inject_lora(model, config, name)
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for m in meta["modules"]:
            layer = modules[m]
            layer.lora_A[name].copy_(f.get_tensor(f"{m}.lora_A"))
            layer.lora_B[name].copy_(f.get_tensor(f"{m}.lora_B"))
    if not activate:
        for n, layer in lora_layers(model):
            layer.set_adapter(active.get(n))
    return name


class AdapterBank:
    """Many adapters resident on one base model; :meth:`activate` switches by name without touching the base.

    ``merged=False`` (default): switching sets each layer's active key (a pointer swap, microseconds).
    ``merged=True``: the active adapter is folded into the base weights (plain-model inference speed);
    switching unmerges the old delta and merges the new one.
    """

    def __init__(self, model: nn.Module, merged: bool = False) -> None:
        self.model = model
        self._merged = False
        self._refresh()
        actives = {layer.active_adapter for layer in self._layers}
        self.active: str | None = actives.pop() if len(actives) == 1 else None
        self.activate(self.active)
        self.set_merged(merged)

    def _refresh(self) -> None:
        self._layers = [layer for _, layer in lora_layers(self.model)]

    @property
    def names(self) -> list[str]:
        return sorted({n for layer in self._layers for n in layer.lora_A})

    def __contains__(self, name: str) -> bool:
        return any(name in layer.lora_A for layer in self._layers)

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, config: LoraConfig) -> list[str]:
        """Inject a new (freshly initialised) adapter; the currently active adapter stays active."""
        out = inject_lora(self.model, config, name)
        self._refresh()
        self.activate(self.active)
        return out

    def load(self, path: str | Path, name: str | None = None) -> str:
        """Load an adapter file into the bank (not activated)."""
        name = load_adapter(self.model, path, name, activate=False)
        self._refresh()
        self.activate(self.active)
        return name

    def save(self, name: str, path: str | Path) -> Path:
        return save_adapter(self.model, path, name)

    @property
    def merged(self) -> bool:
        return self._merged

    def set_merged(self, merged: bool) -> None:
        """Switch between merged (fold active adapter into weights) and unmerged (pointer-swap) mode."""
        self._merged = merged
        for layer in self._layers:
            if merged:
                layer.merge()
            else:
                layer.unmerge()

    def activate(self, name: str | None) -> None:
        """Make ``name`` the active adapter everywhere (None: base model)."""
        if name is not None and name not in self:
            raise KeyError(f"unknown adapter {name!r}; resident: {self.names}")
        for layer in self._layers:
            key = name if name is not None and name in layer.lora_A else None
            layer.set_adapter(key)
            if self._merged:
                layer.merge()
        self.active = name

    def remove(self, name: str) -> None:
        """Drop a resident adapter (frees its tensors)."""
        if self.active == name:
            self.activate(None)
        for layer in self._layers:
            if name in layer.lora_A:
                del layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
                layer.scaling.pop(name)
        getattr(self.model, "_lora_configs", {}).pop(name, None)

    def iter_adapters(self) -> Iterator[str]:
        """Activate each resident adapter in turn (restores the previous one afterwards)."""
        previous = self.active
        try:
            for name in self.names:
                self.activate(name)
                yield name
        finally:
            self.activate(previous)
