"""Mixture-of-Experts feed-forward layer in the style of DeepSeek-V3 ``inference/model.py``.

``MoE`` = ``Gate`` (top-k routing, optional expert groups, softmax or sigmoid scores) + routed SwiGLU
``Expert``s + always-on shared experts. Dispatch sorts the token-expert pairs by expert once (stable
argsort, ``bincount``), runs each non-empty expert once on its tokens and adds the weighted results back
with ``index_add_``; no per-token loop and no dense compute of all experts. Execution paths (same result):

* training / autograd (also adapters, quantized experts, autocast): each expert module on its slice;
* inference, balanced loads (``E * max_load <= MAX_PADDING * total``): all experts in three batched
  matmuls over ``[E, max_load, dim]`` with stacked weights (cached, rebuilt when a weight changes) and
  scratch buffers kept between calls (``release_buffers()`` frees both; ``train()`` / ``eval()`` too);
* inference, skewed loads: a loop over the non-empty experts writing into shared buffers;
* inference on a few tokens (``<= DENSE_MAX_TOKENS``, dropless): every routed expert on every token in
  three batched matmuls, weighted by the routing weights (zero for the experts not selected). More
  arithmetic, but no sort, gather or scatter: for a streamed micro-batch of 1-32 rows the fixed cost of
  dispatch is larger than the matmuls.

Load balancing (``MoEConfig.balancing``):

* ``"none"``     plain top-k.
* ``"aux_loss"`` Switch-Transformer auxiliary loss ``coef * E * sum_i f_i * P_i`` exposed as ``moe.aux_loss``
  (add it to the task loss; ``total_aux_loss(model)`` sums all layers).
* ``"bias"``     DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias buffer is added to the scores
  only to decide WHICH experts are selected; the combination weights use the unbiased scores. After a
  training-mode forward the bias moves by ``+-bias_update_speed`` towards balance (overloaded experts down,
  underloaded up); ``bias_update="manual"`` leaves that to explicit ``update_bias()`` calls. Under
  activation checkpointing the update waits for the next forward, so the recomputation routes identically.

Capacity (``capacity_factor > 0``): each expert keeps at most ``ceil(capacity_factor * T * top_k / E)``
token-expert pairs per forward (highest routing weight first). A dropped pair contributes zero, so a token
whose every pair is dropped gets only the shared-expert output (and, inside a block, the residual).
``capacity_factor = 0`` is dropless.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HEALTHY_LOAD_BAND = (0.8, 1.2)
MAX_PADDING = 1.5  # padded batched-matmul inference path while E * max_load <= 1.5 * total load
DENSE_MAX_TOKENS = 32  # inference on at most this many tokens (dropless): every expert on every token
BUSIEST_SHARE_ALERT = 0.75


@dataclass
class MoEConfig:
    """Arguments of one MoE layer (names follow DeepSeek-V3 ``ModelArgs`` where they exist)."""

    dim: int = 256
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2  # n_activated_experts
    expert_hidden: int = 256  # moe_inter_dim; shared experts use n_shared_experts * expert_hidden
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_scale: float = 1.0
    n_expert_groups: int = 1
    n_limited_groups: int = 1  # top groups a token may route to
    balancing: Literal["none", "aux_loss", "bias"] = "none"
    aux_loss_coef: float = 0.01
    bias_update_speed: float = 0.001  # gamma of DeepSeek-V3
    bias_update: Literal["auto", "manual"] = "auto"
    capacity_factor: float = 0.0  # 0 = dropless
    stats_window: int = 100  # forwards kept in the "window" routing statistics

    def __post_init__(self) -> None:
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.balancing not in ("none", "aux_loss", "bias"):
            raise ValueError(f"balancing must be 'none', 'aux_loss' or 'bias', got {self.balancing!r}")
        if self.bias_update not in ("auto", "manual"):
            raise ValueError(f"bias_update must be 'auto' or 'manual', got {self.bias_update!r}")
        if not 1 <= self.top_k <= self.n_routed_experts:
            raise ValueError(f"top_k must be in [1, n_routed_experts], got {self.top_k}")
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError("n_routed_experts must be divisible by n_expert_groups")
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise ValueError("n_limited_groups must be in [1, n_expert_groups]")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.top_k > self.n_limited_groups * per_group:
            raise ValueError("top_k exceeds the experts reachable in n_limited_groups groups")
        if self.capacity_factor < 0:
            raise ValueError("capacity_factor must be >= 0")


# --------------------------------------------------------------------------------------------------------
# Activation-checkpointing awareness: a recomputed forward must not record statistics or move the bias,
# and a checkpointed forward must not change the bias before its recomputation has run.

_PHASE = threading.local()


def _phase() -> str:
    return getattr(_PHASE, "value", "normal")


@contextlib.contextmanager
def _routing_phase(value: str) -> Iterator[None]:
    prev = _phase()
    _PHASE.value = value
    try:
        yield
    finally:
        _PHASE.value = prev


def checkpoint_context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: marks the original and the recomputed forward."""
    return _routing_phase("checkpointed"), _routing_phase("recompute")


def _stable_argsort(values: torch.Tensor) -> torch.Tensor:
    """Stable ascending argsort of a 1-D tensor.

    On CPU through NumPy: ``torch.sort``'s multi-threaded kernel is ~100x slower than a single-threaded
    sort for these sizes (tens of thousands of keys) when the machine's cores are busy.
    """
    if values.device.type != "cpu":
        return torch.argsort(values, stable=True)
    array = values.detach().float().numpy() if values.is_floating_point() else values.detach().numpy()
    return torch.from_numpy(np.argsort(array, kind="stable"))


# --------------------------------------------------------------------------------------------------------


INFERENCE_CHUNK = 2048
"""Tokens per chunk of an expert's inference pass (2048 x hidden 1536 fp32 = 12 MB)."""


class Expert(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)`` (DeepSeek ``MLP`` / ``Expert``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> [..., dim].

        Without autograd (inference) the tokens go through in chunks of ``INFERENCE_CHUNK`` with the
        gate computed in place: the [tokens, hidden] intermediates then stay small enough for the
        allocator to reuse, instead of being fresh page-faulting mappings on every call.
        """
        if torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= INFERENCE_CHUNK:
            return self._gated(flat).reshape(*x.shape[:-1], -1)
        out = torch.cat([self._gated(chunk) for chunk in flat.split(INFERENCE_CHUNK)])
        return out.reshape(*x.shape[:-1], -1)

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.w1(x), inplace=True)
        return self.w2(hidden.mul_(self.w3(x)))


class Gate(nn.Module):
    """Router: scores, optional group limiting, top-k selection (bias only steers the selection)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # Always present so checkpoints have one layout; only used when balancing == "bias".
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, dim] -> (weights [T, k] fp32, indices [T, k] int64, full scores [T, E] fp32)."""
        cfg = self.cfg
        logits = F.linear(x, self.weight).float()
        if cfg.score_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        original = scores
        use_bias = cfg.balancing == "bias"
        if use_bias:
            scores = scores + self.bias
        if cfg.n_expert_groups > 1:
            grouped = scores.view(x.size(0), cfg.n_expert_groups, -1)
            if use_bias:
                group_scores = grouped.topk(min(2, grouped.size(-1)), dim=-1)[0].sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            top_groups = group_scores.topk(cfg.n_limited_groups, dim=-1)[1]
            mask = torch.ones(x.size(0), cfg.n_expert_groups, dtype=torch.bool, device=x.device)
            mask.scatter_(1, top_groups, False)
            scores = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = scores.detach().topk(cfg.top_k, dim=-1)[1]
        weights = original.gather(1, indices)
        if cfg.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * cfg.route_scale
        return weights, indices, original


class MoE(nn.Module):
    """Routed + shared SwiGLU experts with grouped dispatch, load balancing and routing statistics."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.expert_hidden) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (
            Expert(cfg.dim, cfg.n_shared_experts * cfg.expert_hidden) if cfg.n_shared_experts > 0 else None
        )
        self.aux_loss: torch.Tensor = torch.zeros(())
        self._stack_cache: tuple | None = None
        self._workspace: dict[str, torch.Tensor] = {}
        self._workspace_lock = threading.Lock()
        self.reset_routing_stats()

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> [..., dim]."""
        cfg = self.cfg
        shape = x.shape
        x = x.reshape(-1, cfg.dim)
        n_tokens, n_exp = x.size(0), cfg.n_routed_experts
        if n_tokens == 0:
            return x.new_zeros(shape)
        phase = _phase()
        if cfg.balancing == "bias" and cfg.bias_update == "auto" and self.training and phase != "recompute":
            self._apply_pending_bias_update()  # deferred update of a previous checkpointed forward

        weights, indices, scores = self.gate(x)
        flat_expert = indices.flatten()
        counts = torch.bincount(flat_expert, minlength=n_exp)
        dense = (
            cfg.capacity_factor <= 0
            and n_tokens <= DENSE_MAX_TOKENS
            and not torch.is_grad_enabled()
            and self._plain_linear_experts(x)
        )
        if dense:
            y, kept_tokens, dropped_pairs = self._experts_dense(x, weights, indices), None, 0
        else:
            y, kept_tokens, dropped_pairs = self._dispatch(x, weights, flat_expert, counts)
        aux = self._aux_loss(scores, counts, n_tokens) if cfg.balancing == "aux_loss" else None
        if phase != "recompute":
            self.aux_loss = aux if aux is not None else torch.zeros((), device=x.device)
            dropped_tokens = 0
            if kept_tokens is not None:
                kept_per_token = torch.bincount(kept_tokens, minlength=n_tokens)
                dropped_tokens = int((kept_per_token == 0).sum())
            self._record(counts.cpu(), n_tokens, dropped_pairs, dropped_tokens)
            if cfg.balancing == "bias" and self.training:
                self._pending_counts += counts.detach().cpu()
                if cfg.bias_update == "auto" and phase == "normal":
                    self._apply_pending_bias_update()
        return y.view(shape[:-1] + (cfg.dim,))

    def _dispatch(
        self, x: torch.Tensor, weights: torch.Tensor, flat_expert: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Sort the token-expert pairs by expert (dropping those over capacity) and run the experts:
        (output, token index of every kept pair if any was dropped, number of dropped pairs)."""
        cfg = self.cfg
        n_tokens, k, n_exp = x.size(0), cfg.top_k, cfg.n_routed_experts
        if cfg.capacity_factor > 0:
            capacity = math.ceil(cfg.capacity_factor * n_tokens * k / n_exp)
            # Within each expert the pairs with the largest routing weight come first and are kept.
            by_weight = _stable_argsort(-weights.detach().flatten())
            order = by_weight[_stable_argsort(flat_expert[by_weight])]
            kept_counts = counts.clamp(max=capacity)
        else:
            capacity = n_tokens * k
            order = _stable_argsort(flat_expert)
            kept_counts = counts
        dropped_pairs = int(counts.sum() - kept_counts.sum())
        kept_mask = None
        if dropped_pairs:
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=x.device) - starts[flat_expert[order]]
            kept_mask = rank < capacity
            order = order[kept_mask]
        token_idx = order // k
        y = self._run_experts(x, token_idx, weights.flatten()[order], kept_counts.tolist())
        return y, (token_idx if kept_mask is not None else None), dropped_pairs

    def _experts_dense(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Inference on a few tokens: every routed expert on every token (``[E, T, hidden]``), each token's
        outputs weighted by its routing weights (zero for the experts it was not routed to), plus the
        shared experts."""
        w1, w2, w3 = self._stacked_weights()
        gate = torch.zeros(x.size(0), len(self.experts), dtype=x.dtype, device=x.device)
        gate.scatter_(1, indices, weights.to(x.dtype))
        h = F.silu(torch.matmul(x, w1.transpose(1, 2)), inplace=True)  # [E, T, hidden]
        h.mul_(torch.matmul(x, w3.transpose(1, 2)))
        h.mul_(gate.t().unsqueeze(-1))  # the routing weight applied to the hidden: w2 is linear
        y = torch.bmm(h, w2.transpose(1, 2)).sum(dim=0)
        return y + self.shared_experts(x) if self.shared_experts is not None else y

    def _run_experts(
        self, x: torch.Tensor, token_idx: torch.Tensor, pair_weights: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Run every non-empty expert once on its tokens (pairs sorted by expert) and combine.

        Three equivalent paths: with autograd (or adapters / quantized experts / autocast) each expert module
        runs on its contiguous slice; without autograd and with balanced loads, one padded batched matmul
        per projection runs all experts at once (``[E, max_count, dim]``, padding < ``MAX_PADDING``);
        otherwise a loop over experts writes into shared buffers.
        """
        if not torch.is_grad_enabled() and self._plain_linear_experts(x):
            total = sum(counts)
            if total and len(counts) * max(counts) <= MAX_PADDING * total:
                return self._experts_padded(x, token_idx, pair_weights, counts)
            routed = self._experts_inference(x[token_idx], counts)
        else:
            routed = self._experts_autograd(x[token_idx], counts)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if routed is None:
            return shared if shared is not None else torch.zeros_like(x)
        scale = pair_weights.unsqueeze(-1).to(routed.dtype)
        if shared is not None:
            base = shared.to(routed.dtype)
        else:
            base = torch.zeros(x.size(0), x.size(1), dtype=routed.dtype, device=x.device)
        if torch.is_grad_enabled():
            return base.index_add(0, token_idx, routed * scale)
        return base.index_add_(0, token_idx, routed.mul_(scale))

    def _experts_padded(
        self, x: torch.Tensor, token_idx: torch.Tensor, pair_weights: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Inference: all experts in three batched matmuls over ``[E, C, dim]`` (C = largest expert load)."""
        n, dim = x.shape
        n_exp, cap = len(counts), max(counts)
        counts_t = torch.tensor(counts, device=x.device)
        expert_of_pair = torch.repeat_interleave(torch.arange(n_exp, device=x.device), counts_t)
        starts = torch.cumsum(counts_t, 0) - counts_t
        rank = torch.arange(token_idx.numel(), device=x.device) - starts[expert_of_pair]
        slot = expert_of_pair * cap + rank
        # Padding slots read token 0 with weight 0: their output rows are exactly zero.
        src = torch.zeros(n_exp * cap, dtype=torch.long, device=x.device)
        src[slot] = token_idx
        slot_weight = torch.zeros(n_exp * cap, 1, dtype=x.dtype, device=x.device)
        slot_weight[slot, 0] = pair_weights.to(x.dtype)
        w1, w2, w3 = self._stacked_weights()
        shape_x, shape_h = (n_exp, cap, dim), (n_exp, cap, w1.size(1))
        # Scratch buffers are reused between calls: on CPU, fresh multi-MB allocations are returned to the
        # OS and page-faulted in again, which costs about as much as the matmuls. A concurrent call (other
        # thread) that finds the workspace busy allocates its own.
        reuse = self._workspace_lock.acquire(blocking=False)
        try:
            xp = torch.index_select(x, 0, src, out=self._scratch("x", shape_x, x, reuse).view(-1, dim))
            xp = xp.view(shape_x)
            h = torch.bmm(xp, w1.transpose(1, 2), out=self._scratch("h1", shape_h, x, reuse))
            h3 = torch.bmm(xp, w3.transpose(1, 2), out=self._scratch("h3", shape_h, x, reuse))
            h = F.silu(h, inplace=True).mul_(h3)
            h.mul_(slot_weight.view(n_exp, cap, 1))  # routing weight applied to the hidden: w2 is linear
            out = torch.bmm(h, w2.transpose(1, 2), out=xp)  # xp is no longer needed
            y = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
            return y.index_add_(0, src, out.view(-1, dim))
        finally:
            if reuse:
                self._workspace_lock.release()

    def _scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor, reuse: bool) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._workspace.get(name) if reuse else None
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            with torch.inference_mode(False):  # a normal tensor: usable as out= inside and outside
                buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            if reuse:
                self._workspace[name] = buf
        return buf[:numel].view(shape)

    def release_buffers(self) -> None:
        """Free the inference scratch buffers and stacked-weight cache (``train()`` / ``eval()`` do too)."""
        self._workspace = {}
        self._stack_cache = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies (``copy.deepcopy``) get fresh buffers, cache and lock, and the last auxiliary loss without
        its graph (a forward pass with autograd on leaves a non-leaf tensor there, which cannot be copied)."""
        state = self.__dict__.copy()
        state.update(_workspace={}, _stack_cache=None, _workspace_lock=None, aux_loss=self.aux_loss.detach())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._workspace_lock = threading.Lock()

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routed expert weights stacked as ``[E, hidden, dim]``, ``[E, dim, hidden]``, ``[E, hidden, dim]``.

        Cached for inference (rebuilt when any weight changes: data pointer or version counter); the cache
        is dropped by ``train()`` / ``eval()`` and is not part of the state dict.
        """
        weights = [(e.w1.weight, e.w2.weight, e.w3.weight) for e in self.experts]
        key = tuple((w.data_ptr(), w._version) for trio in weights for w in trio)
        cache = self._stack_cache
        if cache is None or cache[0] != key:
            with torch.no_grad(), torch.inference_mode(False):
                stacked = tuple(torch.stack([trio[i] for trio in weights]) for i in range(3))
            cache = self._stack_cache = (key, *stacked)
        return cache[1], cache[2], cache[3]

    def train(self, mode: bool = True) -> MoE:
        """Switch mode; frees the inference buffers and weight cache."""
        self.release_buffers()
        return super().train(mode)

    def _experts_autograd(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Expert outputs for the sorted pairs, through the expert modules (autograd, adapters, quantized)."""
        outs = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                outs.append(self.experts[e](x_sorted[start : start + c]))
            start += c
        if not outs:
            return None
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _experts_inference(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Same result without autograd: every matmul writes into one buffer, the SwiGLU gating runs once
        over all pairs (two kernels instead of two per expert)."""
        total = sum(counts)
        if total == 0:
            return None
        xs = x_sorted
        h1 = xs.new_empty(total, self.cfg.expert_hidden)
        h3 = xs.new_empty(total, self.cfg.expert_hidden)
        out = xs.new_empty(total, self.cfg.dim)
        spans = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                sl = slice(start, start + c)
                expert = self.experts[e]
                torch.mm(xs[sl], expert.w1.weight.t(), out=h1[sl])
                torch.mm(xs[sl], expert.w3.weight.t(), out=h3[sl])
                spans.append((e, sl))
            start += c
        F.silu(h1, inplace=True).mul_(h3)
        for e, sl in spans:
            torch.mm(h1[sl], self.experts[e].w2.weight.t(), out=out[sl])
        return out

    def _plain_linear_experts(self, x: torch.Tensor) -> bool:
        """Whether the fast inference paths apply: no autocast, and every routed expert still holds
        bias-free ``nn.Linear`` layers of ``x``'s dtype (no adapters / quantization)."""
        if torch.is_autocast_enabled(x.device.type):
            return False
        return all(
            type(layer) is nn.Linear and layer.bias is None and layer.weight.dtype == x.dtype
            for expert in self.experts
            for layer in (expert.w1, expert.w2, expert.w3)
        )

    def _aux_loss(self, scores: torch.Tensor, counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Switch-style ``coef * E * sum_i f_i P_i`` (f: share of routed pairs, P: mean routing prob)."""
        cfg = self.cfg
        probs = scores if cfg.score_func == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        f = counts.float() / (n_tokens * cfg.top_k)
        return cfg.aux_loss_coef * cfg.n_routed_experts * (f.detach() * probs.mean(dim=0)).sum()

    # ----------------------------------------------------------------------------------- balancing
    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None) -> None:
        """Move the bias by ``+-bias_update_speed`` towards balance.

        ``counts``: per-expert loads to react to; default: the loads accumulated since the last update.
        """
        if counts is None:
            counts = self._pending_counts
        counts = counts.float()
        if counts.sum() > 0:
            step = torch.sign(counts.mean() - counts) * self.cfg.bias_update_speed
            self.gate.bias.add_(step.to(self.gate.bias.device))
        self._pending_counts = torch.zeros(self.cfg.n_routed_experts, dtype=torch.long)

    def _apply_pending_bias_update(self) -> None:
        if int(self._pending_counts.sum()) > 0:
            self.update_bias()

    # ---------------------------------------------------------------------------------- statistics
    def reset_routing_stats(self) -> None:
        """Zero all routing statistics (the bias and pending bias updates are kept)."""
        n = self.cfg.n_routed_experts
        self._counts_total = torch.zeros(n, dtype=torch.long)
        self._counts_last = torch.zeros(n, dtype=torch.long)
        self._window: deque[tuple[torch.Tensor, int]] = deque(maxlen=self.cfg.stats_window)
        self._tokens_total = 0
        self._tokens_last = 0
        self._forwards = 0
        self._dropped_pairs_total = self._dropped_pairs_last = 0
        self._dropped_tokens_total = self._dropped_tokens_last = 0
        if not hasattr(self, "_pending_counts"):
            self._pending_counts = torch.zeros(n, dtype=torch.long)

    def _record(self, counts: torch.Tensor, n_tokens: int, dropped_pairs: int, dropped_tokens: int) -> None:
        self._counts_total += counts
        self._counts_last = counts
        self._window.append((counts, n_tokens))
        self._tokens_total += n_tokens
        self._tokens_last = n_tokens
        self._forwards += 1
        self._dropped_pairs_total += dropped_pairs
        self._dropped_pairs_last = dropped_pairs
        self._dropped_tokens_total += dropped_tokens
        self._dropped_tokens_last = dropped_tokens

    def routing_stats(self) -> dict[str, Any]:
        """JSON-serialisable routing statistics.

        ``counts_*``: token-expert pairs routed to each expert (before capacity dropping): cumulative, last
        forward and the last ``stats_window`` forwards. Load metrics use the window: ``load_ratio`` =
        count / mean count (healthy band 0.8-1.2), ``max_vio`` = max / mean - 1, ``busiest_share`` = share of
        tokens routed to the busiest expert (alert above 75 %). ``dropped_pairs_*`` counts token-expert pairs
        cut by capacity; ``dropped_tokens_*`` tokens that lost every routed expert.
        """
        window = torch.zeros_like(self._counts_total)
        window_tokens = 0
        for c, t in self._window:
            window += c
            window_tokens += t
        mean = window.float().mean().item()
        ratio = (window.float() / mean).tolist() if mean > 0 else [0.0] * len(window)
        busiest = int(window.argmax()) if window_tokens else 0
        busiest_share = float(window[busiest]) / window_tokens if window_tokens else 0.0
        total_mean = self._counts_total.float().mean().item()
        lo, hi = HEALTHY_LOAD_BAND
        stats: dict[str, Any] = {
            "n_experts": self.cfg.n_routed_experts,
            "top_k": self.cfg.top_k,
            "balancing": self.cfg.balancing,
            "forwards": self._forwards,
            "tokens_total": self._tokens_total,
            "tokens_last": self._tokens_last,
            "tokens_window": window_tokens,
            "counts_total": self._counts_total.tolist(),
            "counts_last": self._counts_last.tolist(),
            "counts_window": window.tolist(),
            "load_ratio": ratio,
            "experts_outside_band": [i for i, r in enumerate(ratio) if mean > 0 and not lo <= r <= hi],
            "max_vio": (window.max().item() / mean - 1.0) if mean > 0 else 0.0,
            "max_vio_total": (self._counts_total.max().item() / total_mean - 1.0) if total_mean > 0 else 0.0,
            "busiest_expert": busiest,
            "busiest_share": busiest_share,
            "busiest_alert": busiest_share > BUSIEST_SHARE_ALERT,
            "dropped_pairs_total": self._dropped_pairs_total,
            "dropped_pairs_last": self._dropped_pairs_last,
            "dropped_tokens_total": self._dropped_tokens_total,
            "dropped_tokens_last": self._dropped_tokens_last,
            "aux_loss_last": float(self.aux_loss.detach()),
        }
        if self.cfg.balancing == "bias":
            stats["bias"] = self.gate.bias.tolist()
        return stats


# ---------------------------------------------------------------------------------------- model helpers


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """All MoE layers of ``model`` by qualified module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def routing_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``routing_stats()`` of every MoE layer of ``model`` (JSON-serialisable, keyed by module name)."""
    return {name: m.routing_stats() for name, m in moe_layers(model).items()}


def total_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses of the last forward over all MoE layers (0 when there are none)."""
    losses = [m.aux_loss for m in moe_layers(model).values()]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()


def reset_routing_stats(model: nn.Module) -> None:
    """Zero the routing statistics of every MoE layer of ``model``."""
    for m in moe_layers(model).values():
        m.reset_routing_stats()
