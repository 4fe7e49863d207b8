"""Generic training loop: learning, bf16 autocast, activation checkpointing, aux losses, early stopping."""

from __future__ import annotations

import copy

import pytest
import torch
from backbone.blocks import set_activation_checkpointing
from backbone.registry import create_model, routing_stats
from backbone.training import WeightEMA, evaluate, fit
from torch.utils.data import DataLoader, TensorDataset


def _task(n: int, seed: int) -> TensorDataset:
    """Binary label = sign of the mean of feature 0 over the sequence."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, 8, generator=g)
    y = (x[:, :, 0].mean(dim=1) > 0).long()
    return TensorDataset(x, y)


def _ce(out, y):
    return torch.nn.functional.cross_entropy(out.logits.float(), y)


def _accuracy(out, y) -> float:
    return (out.logits.argmax(dim=-1) == y).float().mean().item()


def _model(**kw):
    torch.manual_seed(0)
    base = dict(in_features=8, num_outputs=2, dim=32, block_size=8, expert_hidden=32, n_routed_experts=4)
    return create_model("seq_moe_tiny", **{**base, **kw})


def test_fit_learns_and_restores_best_weights() -> None:
    model = _model()
    train = DataLoader(_task(256, 0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(_task(128, 1), batch_size=64)
    before = evaluate(model, val, _ce, metric_fn=_accuracy)
    opts = dict(epochs=6, lr=3e-3, metric_fn=_accuracy, early_stopping_patience=3, progress=False)
    result = fit(model, train, val, _ce, **opts)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    after = evaluate(model, val, _ce, metric_fn=_accuracy)
    assert after["metric"] == pytest.approx(result.best_score)
    assert after["metric"] > max(0.8, before["metric"] + 0.2), (before, after)
    assert result.monitor == "val_metric" and 1 <= result.best_epoch <= len(result.history)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in result.best_state.items())
    assert routing_stats(model)["blocks.0.ffn"]["tokens_total"] > 0


def test_fit_bf16_autocast_on_cpu() -> None:
    model = _model(attn_kind="sparse")
    train = DataLoader(_task(64, 0), batch_size=32)
    seen = []
    model.head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    result = fit(model, train, None, _ce, epochs=2, lr=3e-3, bf16_autocast=True, progress=False)
    assert torch.bfloat16 in seen
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result.history)
    assert result.monitor == "train_loss"
    assert next(model.parameters()).dtype == torch.float32


def test_fit_adds_aux_loss_and_stops_early() -> None:
    model = _model(balancing="aux_loss")
    train = DataLoader(_task(64, 0), batch_size=32)
    val = DataLoader(_task(64, 1), batch_size=64)
    result = fit(model, train, val, _ce, epochs=10, lr=0.0, early_stopping_patience=2, progress=False)
    assert all(row["aux_loss"] > 0 for row in result.history)
    assert result.stopped_early and len(result.history) == 3  # lr 0: never improves after epoch 1


@pytest.mark.parametrize("attn_kind", ["sparse", "temporal_decay"])
def test_activation_checkpointing_matches_plain_backward(attn_kind: str) -> None:
    base = _model(attn_kind=attn_kind, balancing="bias", bias_update_speed=0.01).train()
    ckpt = copy.deepcopy(base)
    assert set_activation_checkpointing(ckpt, True) == 2
    x, y = _task(8, 0).tensors
    ts = torch.rand(8, 16).cumsum(1)
    results = []
    for model in (base, ckpt):
        out = model(x, timestamps=ts)
        _ce(out, y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads, routing_stats(model)))
    (out_a, grads_a, stats_a), (out_b, grads_b, stats_b) = results
    assert (out_a - out_b).abs().max().item() < 1e-6
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    assert max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a) < 1e-5
    # the recomputed forward is not counted twice in the routing statistics
    assert stats_a["blocks.0.ffn"]["forwards"] == stats_b["blocks.0.ffn"]["forwards"] == 1
    # the bias update held back during checkpointing lands at the next forward: both end up equal
    for model in (base, ckpt):
        with torch.no_grad():
            model(x, timestamps=ts)
    assert torch.equal(base.blocks[0].ffn.gate.bias, ckpt.blocks[0].ffn.gate.bias)
    assert base.blocks[0].ffn.gate.bias.abs().sum() > 0


def test_weight_ema_follows_the_model_with_warmed_up_decay() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(5)
    ema.update()  # first update: decay = min(0.9, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(ema.module[0].weight, d * start + (1 - d) * (start + 1.0))
    assert int(ema.module[1].num_batches_tracked) == 5  # integer buffers are copied
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_fit_with_ema_validates_and_restores_the_average() -> None:
    model = _model()
    train = DataLoader(_task(256, 0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(_task(128, 1), batch_size=64)
    result = fit(
        model, train, val, _ce, epochs=3, lr=3e-3, metric_fn=_accuracy, progress=False, ema_decay=0.9
    )
    assert result.averaged and result.best_epoch >= 1
    # the restored weights are the averaged ones of the best epoch: they reproduce its validation score
    again = evaluate(model, val, _ce, metric_fn=_accuracy)
    assert again["metric"] == pytest.approx(result.best_score)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in result.best_state.items())
