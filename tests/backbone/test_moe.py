"""MoE layer: exactness of the grouped dispatch, gradients, load balancing, capacity, statistics, state."""

from __future__ import annotations

import copy
import json
import math
import threading

import backbone.moe as moe_module
import pytest
import torch
from backbone.moe import MoE, MoEConfig, moe_layers, routing_stats, total_aux_loss
from safetensors.torch import load_file, save_file

DIM = 32



def _skewed(n: int, gen: torch.Generator, noise: float = 0.5) -> torch.Tensor:
    """Tokens concentrated along one direction: the router gives (almost) all of them the same top-k."""
    u = torch.ones(DIM) / DIM**0.5
    return 4.0 * u + noise * torch.randn(n, DIM, generator=gen)


def _moe(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    base = dict(dim=DIM, n_routed_experts=8, top_k=2, expert_hidden=16, n_shared_experts=1)
    return MoE(MoEConfig(**{**base, **kw}))


def test_top_k_all_experts_equals_dense_mixture() -> None:
    moe = _moe(n_routed_experts=6, top_k=6, score_func="softmax").eval()
    x = torch.randn(3, 20, DIM)
    with torch.no_grad():
        y = moe(x)
        flat = x.reshape(-1, DIM)
        probs = torch.softmax(flat @ moe.gate.weight.T, dim=-1)
        naive = moe.shared_experts(flat)
        for e, expert in enumerate(moe.experts):
            naive = naive + probs[:, e : e + 1] * expert(flat)
    assert y.shape == x.shape
    assert (y.reshape(-1, DIM) - naive).abs().max().item() < 1e-5


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_inference_paths_match_the_autograd_path(monkeypatch, capacity_factor: float) -> None:
    """Padded batched matmul, buffer loop, dense few-token path and per-module autograd path give the same
    output."""
    moe = _moe(n_routed_experts=8, top_k=2, capacity_factor=capacity_factor).eval()
    x = torch.randn(200, DIM)
    few = x[: moe_module.DENSE_MAX_TOKENS]
    reference, few_reference = moe(x).detach(), moe(few).detach()  # grad enabled: per-expert modules
    with torch.no_grad():
        padded = moe(x)  # balanced random routing: padded path
        few_dense = moe(few)  # few tokens, dropless: every expert on every token
        monkeypatch.setattr(moe_module, "MAX_PADDING", 0.0)
        monkeypatch.setattr(moe_module, "DENSE_MAX_TOKENS", 0)
        looped, few_looped = moe(x), moe(few)
    for out, ref in [(padded, reference), (looped, reference), (few_dense, few_reference),
                     (few_looped, few_reference)]:  # fmt: skip
        assert (out - ref).abs().max().item() < 1e-5


def test_inference_weight_cache_follows_weight_updates() -> None:
    moe = _moe().eval()
    x = torch.randn(64, DIM)
    with torch.no_grad():
        before = moe(x)
        for expert in moe.experts:
            expert.w2.weight.mul_(2.0)  # in-place update, as an optimizer step or load_state_dict does
        after = moe(x)
        shared = moe.shared_experts(x)
    assert torch.allclose(after - shared, 2 * (before - shared), atol=1e-5)


def test_inference_buffers_are_safe_across_threads_and_copies() -> None:
    moe = _moe(n_routed_experts=8, top_k=2).eval()
    inputs = [torch.randn(100 + 10 * i, DIM) for i in range(8)]
    with torch.no_grad():
        expected = [moe(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                results[i] = moe(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(len(inputs)))
    clone = copy.deepcopy(moe)  # workspace, lock and weight cache are not copied
    with torch.no_grad():
        assert torch.equal(clone(inputs[0]), expected[0])
    moe.release_buffers()
    with torch.no_grad():
        assert torch.equal(moe(inputs[1]), expected[1])


def test_each_used_expert_runs_once_and_unused_ones_never() -> None:
    moe = _moe(n_routed_experts=8, top_k=2)
    calls = [0] * 8
    for e, expert in enumerate(moe.experts):
        expert.w1.register_forward_hook(lambda *_, e=e: calls.__setitem__(e, calls[e] + 1))
    x = _skewed(64, torch.Generator().manual_seed(0), noise=0.1)  # collapsed: most experts get no token
    moe(x)
    counts = moe.routing_stats()["counts_last"]
    assert sum(counts) == 64 * 2
    assert calls == [1 if c > 0 else 0 for c in counts]
    assert 0 in calls  # some experts were skipped entirely


def test_gradients_reach_router_and_every_used_expert() -> None:
    moe = _moe(n_routed_experts=8, top_k=2)
    x = torch.randn(128, DIM, requires_grad=True)
    moe(x).pow(2).sum().backward()
    counts = moe.routing_stats()["counts_last"]
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for e, expert in enumerate(moe.experts):
        grads = [expert.w1.weight.grad, expert.w2.weight.grad, expert.w3.weight.grad]
        if counts[e] > 0:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), e
        else:
            assert all(g is None for g in grads), e


def test_bias_only_steers_selection_not_weights() -> None:
    moe = _moe(balancing="bias")
    moe.gate.bias[3] = 10.0  # expert 3 always selected ...
    x = torch.randn(50, DIM)
    weights, indices, scores = moe.gate(x)
    assert (indices == 3).any(dim=1).all()
    # ... but weighted by its unbiased score
    expected = torch.softmax(x @ moe.gate.weight.T, dim=-1).gather(1, indices)
    assert torch.allclose(weights, expected, atol=1e-6)


def test_bias_balancing_removes_collapse_within_200_steps() -> None:
    gen = torch.Generator().manual_seed(1)
    plain = _moe(balancing="none", stats_window=20).train()
    balanced = _moe(balancing="bias", stats_window=20).train()  # DeepSeek-V3 default gamma = 0.001
    with torch.no_grad():
        plain(_skewed(256, gen))
        collapsed = plain.routing_stats()["max_vio"]
        for _ in range(200):
            balanced(_skewed(256, gen))
    window_vio = balanced.routing_stats()["max_vio"]  # last 20 of the 200 training steps
    balanced.eval().reset_routing_stats()
    with torch.no_grad():
        balanced(_skewed(2048, gen))
    fresh_vio = balanced.routing_stats()["max_vio"]
    assert collapsed > 1.5, collapsed  # plain top-k: 2 of 8 experts take almost everything
    assert window_vio < 0.3, window_vio
    assert fresh_vio < 0.3, fresh_vio
    assert balanced.aux_loss.item() == 0.0


def _train_router(balancing: str, steps: int = 150) -> tuple[float, float]:
    moe = _moe(balancing=balancing, aux_loss_coef=0.1)
    target = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(3)) / DIM**0.5
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    last_aux = 0.0
    for _ in range(steps):
        x = _skewed(128, gen)
        loss = (moe(x) - torch.tanh(x @ target)).pow(2).mean() + moe.aux_loss
        last_aux = moe.aux_loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moe.eval().reset_routing_stats()
    with torch.no_grad():
        moe(_skewed(2048, gen))
    return moe.routing_stats()["max_vio"], last_aux


def test_copy_after_a_forward_with_autograd_keeps_the_aux_loss_value() -> None:
    moe = _moe(n_routed_experts=4, top_k=2, balancing="aux_loss")
    moe(torch.randn(32, DIM)).sum()  # autograd on: aux_loss is a non-leaf tensor now
    assert moe.aux_loss.grad_fn is not None
    clone = copy.deepcopy(moe)  # a non-leaf tensor cannot be deep-copied: the copy gets it detached
    assert clone.aux_loss.grad_fn is None and torch.equal(clone.aux_loss, moe.aux_loss.detach())
    assert moe.aux_loss.grad_fn is not None  # the original keeps its graph for the training step


def test_aux_loss_training_lowers_max_vio_vs_none() -> None:
    vio_none, aux_none = _train_router("none")
    vio_aux, aux_aux = _train_router("aux_loss")
    assert aux_none == 0.0 and aux_aux > 0.0
    assert vio_none > 1.5, vio_none
    assert vio_aux < 0.5 * vio_none and vio_aux < 1.0, (vio_aux, vio_none)


def test_capacity_drops_tokens_to_shared_expert_output() -> None:
    moe = _moe(top_k=1, capacity_factor=0.5).eval()
    x = _skewed(64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = moe(x)
        weights, indices, _ = moe.gate(x)
        shared = moe.shared_experts(x)
    capacity = math.ceil(0.5 * 64 * 1 / 8)
    dropped = []
    for e in range(8):
        tokens = (indices[:, 0] == e).nonzero().flatten()
        ranked = tokens[weights[tokens, 0].argsort(descending=True)]
        dropped += ranked[capacity:].tolist()
    dropped_t = torch.tensor(sorted(dropped))
    kept = torch.tensor(sorted(set(range(64)) - set(dropped)))
    stats = moe.routing_stats()
    assert len(dropped) > 0
    assert stats["dropped_pairs_last"] == stats["dropped_tokens_last"] == len(dropped)
    assert stats["dropped_tokens_total"] == len(dropped)
    assert (y[dropped_t] - shared[dropped_t]).abs().max().item() < 1e-6
    assert (y[kept] - shared[kept]).abs().amax(dim=1).min().item() > 1e-4


def test_state_dict_round_trip_through_safetensors(tmp_path) -> None:
    moe = _moe(balancing="bias", bias_update_speed=0.01).train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(5):
            moe(_skewed(64, gen))
    assert moe.gate.bias.abs().sum() > 0  # the bias is state and must travel with the weights
    save_file(moe.state_dict(), str(tmp_path / "moe.safetensors"))
    clone = _moe(seed=123, balancing="bias")
    clone.load_state_dict(load_file(str(tmp_path / "moe.safetensors")))
    x = _skewed(32, gen)
    moe.eval()
    clone.eval()
    with torch.no_grad():
        assert torch.equal(moe(x), clone(x))


def test_sigmoid_scores_with_expert_groups() -> None:
    groups = dict(n_expert_groups=4, n_limited_groups=2)
    moe = _moe(n_routed_experts=16, top_k=4, score_func="sigmoid", route_scale=2.0, **groups)
    x = torch.randn(2, 30, DIM)
    y = moe(x)
    assert y.shape == (2, 30, DIM)
    weights, indices, _ = moe.gate(x.reshape(-1, DIM))
    assert weights.shape == indices.shape == (60, 4)
    assert torch.allclose(weights.sum(dim=-1), torch.full((60,), 2.0), atol=1e-5)
    groups_used = torch.tensor([len(set((row // 4).tolist())) for row in indices])
    assert groups_used.max().item() <= 2


def test_routing_stats_json_and_alerts() -> None:
    moe = _moe(top_k=1)
    moe(_skewed(100, torch.Generator().manual_seed(0), noise=0.1))
    stats = json.loads(json.dumps(moe.routing_stats()))
    assert stats["tokens_total"] == 100 and sum(stats["counts_total"]) == 100
    assert stats["busiest_share"] > 0.75 and stats["busiest_alert"] is True
    assert stats["max_vio"] == pytest.approx(max(stats["counts_window"]) / (100 / 8) - 1)
    assert stats["experts_outside_band"]  # collapsed routing leaves the 0.8-1.2 band
    moe(torch.randn(100, DIM))
    stats = moe.routing_stats()
    assert stats["forwards"] == 2 and stats["tokens_total"] == 200 and sum(stats["counts_last"]) == 100


def test_model_level_helpers() -> None:
    model = torch.nn.Sequential(_moe(balancing="aux_loss"), torch.nn.Linear(DIM, DIM), _moe(balancing="none"))
    model(torch.randn(10, DIM))
    assert list(moe_layers(model)) == ["0", "2"]
    assert set(routing_stats(model)) == {"0", "2"}
    assert total_aux_loss(model).item() == pytest.approx(model[0].aux_loss.item())
    assert total_aux_loss(model).item() > 0
