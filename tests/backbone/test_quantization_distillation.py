"""INT8 / bf16 compression reports and knowledge distillation."""
from __future__ import annotations

import math

import pytest
import torch
from backbone.distillation import agreement, distill, distill_step, kd_loss
from backbone.quantization import (
    compare_models,
    default_int8_engine,
    model_size_mb,
    quantize_int8,
    quantize_static_int8,
    to_bf16,
)
from torch import nn


def linear_heavy(dim: int = 128, hidden: int = 512, depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.LayerNorm(dim)]
    return nn.Sequential(*layers, nn.Linear(dim, 10)).eval()


def test_int8_close_to_fp32_and_smaller() -> None:
    model = linear_heavy()
    x = torch.randn(16, 32, 128, generator=torch.Generator().manual_seed(1))
    qmodel = quantize_int8(model)
    assert sum(m._get_name() == "DynamicQuantizedLinear" for m in qmodel.modules()) == 7
    assert all(type(m) is not nn.Linear for m in qmodel.modules())
    assert any(type(m) is nn.Linear for m in model.modules())  # original untouched
    report = compare_models(model, qmodel, x, repeats=2, warmup=1)
    assert math.isclose(report.size_ratio, report.size_mb_before / report.size_mb_after)
    assert report.size_ratio > 2.0
    assert 0 < report.max_rel_diff < 0.1  # per-tensor int8 activations through 7 layers without residuals
    assert report.max_abs_diff > 0 and report.latency_ms_after > 0 and report.speedup > 0
    assert math.isclose(report.size_mb_before, model_size_mb(model))
    per_channel = compare_models(model, quantize_int8(model, per_channel=True), x, repeats=1, warmup=0)
    assert per_channel.size_ratio > 2.0 and per_channel.max_rel_diff < 0.1


class SmallConvNet(nn.Module):
    """A conv trunk with batch norm, ReLU, residual add and pooling; ``features`` is the traced method."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.down(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


def test_static_int8_conv_trunk_is_calibrated_close_and_smaller() -> None:
    model = SmallConvNet()
    for m in model.modules():  # non-trivial batch-norm statistics, so that folding them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(8, 1, 32, 32, generator=g) for _ in range(4)]
    qtrunk = quantize_static_int8(model, calib, method="features")
    x = torch.randn(8, 1, 32, 32, generator=g)
    with torch.no_grad():
        ref, out = model.features(x), qtrunk(x)
    assert out.shape == ref.shape == (8, 32, 8, 8) and out.dtype == torch.float32
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 0.1  # int8 activations, but close after calibration
    names = {type(m).__name__ for m in qtrunk.modules()}
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in qtrunk.modules()), names
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qtrunk.modules())  # folded into the convs
    assert model_size_mb(qtrunk) < model_size_mb(model) / 2
    assert isinstance(model.stem[0], nn.Conv2d) and model.stem[1].training is False  # original untouched
    with pytest.raises(ValueError, match="calibration"):
        quantize_static_int8(model, [], method="features")


def test_int8_engines_agree_and_process_engine_is_restored() -> None:
    model = linear_heavy()
    x = torch.randn(8, 16, 128, generator=torch.Generator().manual_seed(3))
    before = torch.backends.quantized.engine
    assert default_int8_engine() in torch.backends.quantized.supported_engines
    outputs = {}
    for engine in {default_int8_engine(), "fbgemm"} & set(torch.backends.quantized.supported_engines):
        with torch.inference_mode():
            outputs[engine] = quantize_int8(model, engine=engine)(x)
        assert torch.backends.quantized.engine == before
    with torch.inference_mode():
        ref = model(x)
    for engine, out in outputs.items():
        assert float((out - ref).abs().max() / ref.abs().max()) < 0.1, engine
    with pytest.raises(RuntimeError, match="not available"):
        quantize_int8(model, engine="no-such-engine")


def test_bf16_paths_close_to_fp32() -> None:
    model = linear_heavy()
    x = torch.randn(4, 8, 128, generator=torch.Generator().manual_seed(2))
    for mode, max_ratio in (("cast", 0.6), ("autocast", 1.1)):
        candidate = to_bf16(model, mode)
        out = candidate(x)
        assert out.dtype == torch.float32
        report = compare_models(model, candidate, x, repeats=1, warmup=0)
        assert report.max_rel_diff < 0.05, mode
        assert report.size_mb_after / report.size_mb_before < max_ratio, mode


def test_kd_loss_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    temp, alpha = 3.0, 0.7
    p_t = torch.softmax(t / temp, -1)
    log_p_s = torch.log_softmax(s / temp, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    ce = -torch.log_softmax(s, -1)[torch.arange(5), y].mean()
    expected = alpha * temp**2 * kl + (1 - alpha) * ce
    torch.testing.assert_close(kd_loss(s, t, y, temp, alpha), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kd_loss(s, t, None, temp), temp**2 * kl, atol=1e-6, rtol=1e-6)
    assert float(kd_loss(t, t, None, temp)) < 1e-6


def test_kd_training_increases_agreement_with_teacher() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    teacher.eval()
    student = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.randn(1024, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 768, 64)]
    held_out = [(x[768:], y[768:])]
    before = agreement(teacher, student, held_out)

    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    first = distill_step(teacher, student, train[0], opt, temperature=2.0, alpha=0.5)
    history = distill(teacher, student, train, epochs=10, optimizer=opt, temperature=2.0, alpha=0.5)
    after = agreement(teacher, student, held_out)
    assert history[-1] < first
    assert after > before + 0.2 and after > 0.8, (before, after)
    assert all(p.grad is None for p in teacher.parameters())  # teacher is never trained
