"""Attention: sparse == dense at full coverage, exact block selection semantics, temporal decay, memory."""

from __future__ import annotations

import math

import pytest
import torch
from backbone.attention import (
    Attention,
    AttentionConfig,
    dense_attention,
    select_blocks,
    sparse_attention,
)

from benchmarks.common import peak_memory_mb


def _pair(kind_a: dict, kind_b: dict, **common) -> tuple[Attention, Attention]:
    torch.manual_seed(0)
    a = Attention(AttentionConfig(**{**common, **kind_a}))
    b = Attention(AttentionConfig(**{**common, **kind_b}))
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert set(missing) <= {"decay_raw"} and not unexpected  # a decay module keeps its own rates
    return a, b


def _forward_and_grads(module: Attention, x: torch.Tensor, **kw) -> tuple[torch.Tensor, dict]:
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    y = module(x, **kw)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    grads["x"] = x.grad.clone()
    return y.detach(), grads


def _max_grad_diff(ga: dict[str, torch.Tensor], gb: dict[str, torch.Tensor]) -> float:
    assert ga.keys() == gb.keys()
    return max((ga[k] - gb[k]).abs().max().item() for k in ga)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [64, 77])  # 77: not a multiple of the block size (padding path)
def test_sparse_full_coverage_equals_dense_forward_and_grad(causal: bool, n: int) -> None:
    common = dict(dim=32, n_heads=4, causal=causal, block_size=16, top_k_blocks=4, local_blocks=1)
    dense, sparse = _pair({"kind": "dense"}, {"kind": "sparse", "q_chunk_blocks": 2}, **common)
    x = torch.randn(2, n, 32)
    yd, gd = _forward_and_grads(dense, x)
    ys, gs = _forward_and_grads(sparse, x)
    assert (yd - ys).abs().max().item() < 1e-5
    assert _max_grad_diff(gd, gs) < 1e-5


def test_sparse_with_global_tokens_and_padding_mask_equals_dense() -> None:
    common = dict(dim=32, n_heads=2, causal=False, block_size=8, top_k_blocks=8, local_blocks=2)
    dense, sparse = _pair({"kind": "dense"}, {"kind": "sparse", "n_global_tokens": 3}, **common)
    x = torch.randn(2, 50, 32)
    pad = torch.zeros(2, 50, dtype=torch.bool)
    pad[1, 41:] = True
    yd, gd = _forward_and_grads(dense, x, key_padding_mask=pad)
    ys, gs = _forward_and_grads(sparse, x, key_padding_mask=pad)
    assert (yd - ys).abs().max().item() < 1e-5
    assert _max_grad_diff(gd, gs) < 1e-5
    # padding is ignored: the real tokens see the same as without the padded tail
    with torch.no_grad():
        alone = sparse(x[1:, :41])
    assert (ys[1, :41] - alone[0]).abs().max().item() < 1e-5


def _reference_from_selection(q, k, v, idx, valid, bs, n_global, causal):
    """Dense attention restricted (by an n x n mask) to the selected blocks + global tokens."""
    b, h, n, _ = q.shape
    allowed = torch.zeros(b, h, n, n, dtype=torch.bool)
    nb = idx.size(2)
    for qb in range(nb):
        for j in range(idx.size(3)):
            sel = idx[:, :, qb, j]
            ok = valid[:, :, qb, j]
            for bi in range(b):
                for hi in range(h):
                    if ok[bi, hi]:
                        kb = int(sel[bi, hi])
                        allowed[bi, hi, qb * bs : (qb + 1) * bs, kb * bs : (kb + 1) * bs] = True
    allowed[..., :n_global] = True
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v, allowed


@pytest.mark.parametrize("causal", [False, True])
def test_partial_selection_matches_masked_dense_reference(causal: bool) -> None:
    torch.manual_seed(1)
    bs, n, top_k, local, g = 8, 96, 2, 2, 2
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    out = sparse_attention(
        q, k, v, block_size=bs, top_k_blocks=top_k, local_blocks=local, n_global_tokens=g, causal=causal,
        q_chunk_blocks=5,  # 12 query blocks -> chunks of 5, 5, 2
    )  # fmt: skip
    nb = n // bs
    idx, valid = select_blocks(
        (q * 16**-0.5).view(2, 3, nb, bs, 16),
        k.view(2, 3, nb, bs, 16),
        n_select=top_k + local,
        local_blocks=local,
        causal=causal,
    )
    ref, allowed = _reference_from_selection(q, k, v, idx, valid, bs, g, causal)
    assert (out - ref).abs().max().item() < 1e-5
    # genuinely sparse: far fewer keys than dense, and the own block (sliding window) is always selected
    assert allowed.float().mean().item() < 0.5
    own = (idx == torch.arange(nb).view(1, 1, nb, 1)) & valid
    assert own.any(dim=-1).all()
    if causal:  # the previous block is the second local block
        prev = (idx == (torch.arange(nb) - 1).view(1, 1, nb, 1)) & valid
        assert prev.any(dim=-1)[:, :, 1:].all()


def test_temporal_decay_at_zero_equals_dense() -> None:
    common = dict(dim=32, n_heads=4, causal=True)
    dense, decay = _pair({"kind": "dense"}, {"kind": "temporal_decay", "decay_init": 0.0}, **common)
    assert decay.decay_rates().max().item() < 1e-10
    x = torch.randn(2, 40, 32)
    ts = torch.rand(2, 40).cumsum(1) * 10  # irregular timestamps
    with torch.no_grad():
        assert (dense(x) - decay(x, timestamps=ts)).abs().max().item() < 1e-5


def test_temporal_decay_matches_explicit_formula_and_learns_rates() -> None:
    torch.manual_seed(0)
    attn = Attention(AttentionConfig(dim=16, n_heads=2, kind="temporal_decay", decay_init=0.3))
    x = torch.randn(1, 12, 16)
    ts = torch.tensor([[0.0, 0.1, 0.5, 2.0, 2.1, 5.0, 5.5, 9.0, 9.1, 9.2, 15.0, 20.0]])
    y = attn(x, timestamps=ts)
    q, k, v = (w(x).view(1, 12, 2, 8).transpose(1, 2) for w in (attn.wq, attn.wk, attn.wv))
    rates = torch.nn.functional.softplus(attn.decay_raw)
    dt = (ts[:, :, None] - ts[:, None, :]).abs()
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) - rates.view(1, 2, 1, 1) * dt
    ref = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 12, 16))
    assert (y - ref).abs().max().item() < 1e-5
    assert torch.allclose(attn.decay_rates(), torch.full((2,), 0.3), atol=1e-5)
    y.sum().backward()
    assert attn.decay_raw.grad is not None and attn.decay_raw.grad.abs().sum() > 0
    # larger time gaps get less attention: irregular timestamps change the output
    with torch.no_grad():
        assert (attn(x, timestamps=ts) - attn(x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_decay_hybrid_full_coverage_equals_dense_decay(causal: bool) -> None:
    common = dict(dim=32, n_heads=4, causal=causal, block_size=8, top_k_blocks=8, local_blocks=2)
    common["decay_init"] = 0.2
    hybrid_kind = {"kind": "sparse", "time_decay": True, "n_global_tokens": 1, "q_chunk_blocks": 2}
    dense, hybrid = _pair({"kind": "temporal_decay"}, hybrid_kind, **common)
    x = torch.randn(2, 45, 32)
    ts = torch.rand(2, 45).cumsum(1)
    yd, gd = _forward_and_grads(dense, x, timestamps=ts)
    ys, gs = _forward_and_grads(hybrid, x, timestamps=ts)
    assert (yd - ys).abs().max().item() < 1e-5
    assert _max_grad_diff(gd, gs) < 1e-5
    assert gs["decay_raw"].abs().sum() > 0
    with torch.inference_mode():  # the buffer-reusing inference path gives the same result
        assert (hybrid(x, timestamps=ts) - yd).abs().max().item() < 1e-5


def test_sparse_backward_with_masks_is_finite_and_padding_gets_no_gradient() -> None:
    torch.manual_seed(0)
    attn = Attention(
        AttentionConfig(
            dim=32, n_heads=4, kind="sparse", causal=True, block_size=8, top_k_blocks=1, local_blocks=1,
            n_global_tokens=2, time_decay=True, dropout=0.1,
        )
    )  # fmt: skip
    x = torch.randn(2, 70, 32, requires_grad=True)
    pad = torch.zeros(2, 70, dtype=torch.bool)
    pad[0, 60:] = True
    y = attn(x, timestamps=torch.rand(2, 70).cumsum(1), key_padding_mask=pad)
    y[~pad].sum().backward()  # loss on real tokens only
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all() and x.grad[~pad].abs().sum() > 0
    assert x.grad[0, 60:].abs().max().item() == 0.0  # padded keys / queries contribute nothing


def test_sparse_memory_grows_linearly_and_never_builds_n_by_n() -> None:
    h, d, bs = 4, 16, 32
    peaks = {}
    for n in (2048, 4096):
        q, k, v = (torch.randn(1, h, n, d) for _ in range(3))
        with torch.inference_mode():
            peaks[n] = peak_memory_mb(
                lambda q=q, k=k, v=v: sparse_attention(q, k, v, block_size=bs, top_k_blocks=2, local_blocks=1)
            )
    dense_scores_mb = {n: h * n * n * 4 / 2**20 for n in peaks}
    assert peaks[4096] < dense_scores_mb[4096] / 4, (peaks, dense_scores_mb)
    assert peaks[4096] / peaks[2048] < 2.6, peaks  # linear in n (a dense n x n would give ~4x)


def test_dense_kind_uses_sdpa_semantics() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    ref = ((q @ k.transpose(-1, -2)) / math.sqrt(8)).softmax(-1) @ v
    assert (dense_attention(q, k, v) - ref).abs().max().item() < 1e-5
