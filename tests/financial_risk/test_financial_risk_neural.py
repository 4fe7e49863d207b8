"""The backbone MoE fraud network: built through the registry, NaN-safe, blended and calibrated."""

from __future__ import annotations

import numpy as np
import torch
from backbone.moe import moe_layers
from backbone.registry import create_model, list_models

from services.financial_risk import neural


def test_financial_risk_moe_network_from_registry() -> None:
    assert "fraud_tabular_moe" in list_models("fraud_*")
    model = create_model("fraud_tabular_moe", n_features=12, dim=16, expert_hidden=32)
    assert isinstance(model, neural.TabularMoE)
    assert len(moe_layers(model)) == 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)) * 100
    x[::7, 3] = np.nan
    model.fit_scaler(x)
    out = neural.predict_logits(model, x)
    assert out.shape == (64,) and np.isfinite(out).all()
    # a few optimisation steps on a learnable target reduce the loss
    y = torch.as_tensor((np.nan_to_num(x[:, 0]) > 0).astype(np.float32))
    xt = torch.as_tensor(x, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xt), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.7


def test_financial_risk_blend_is_calibrated_mix() -> None:
    p = np.array([0.01, 0.5, 0.9])
    z = np.array([-3.0, 0.0, 2.0])
    np.testing.assert_allclose(neural.blend(p, z, 1.0, 1.0, 0.0), p, rtol=1e-9)
    np.testing.assert_allclose(neural.blend(p, z, 0.0, 1.0, 0.0), 1 / (1 + np.exp(-z)), rtol=1e-9)
    mixed = neural.blend(p, z, 0.5, 2.0, -1.0)
    expected = 1 / (1 + np.exp(-(2.0 * (0.5 * neural.logit(p) + 0.5 * z) - 1.0)))
    np.testing.assert_allclose(mixed, expected, rtol=1e-9)
