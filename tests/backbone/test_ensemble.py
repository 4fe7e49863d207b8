"""DeepEnsemble: probability averaging, averaged auxiliary maps, MC-dropout reachability."""

from __future__ import annotations

import pytest
import torch
from backbone.ensemble import DeepEnsemble
from torch import nn


class _Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.last_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_map = x.sum(-1, keepdim=True) * self.fc.weight[0, 0]
        return self.fc(self.drop(x))


def test_softmax_of_output_is_the_members_mean_probability() -> None:
    members = [_Net(s) for s in range(3)]
    ens = DeepEnsemble(members, average_attrs=("last_map",)).eval()
    x = torch.randn(5, 4)
    out = ens(x)
    expected = torch.stack([torch.softmax(m(x), -1) for m in members]).mean(0)
    torch.testing.assert_close(torch.softmax(out, -1), expected)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(5))  # already log-probabilities
    torch.testing.assert_close(ens.last_map, torch.stack([m.last_map for m in members]).mean(0))
    # the members' dropout layers are the ensemble's (what MC dropout switches on)
    assert sum(isinstance(m, nn.Dropout) for m in ens.modules()) == 3


def test_state_dict_round_trip_and_empty_ensemble() -> None:
    a = DeepEnsemble([_Net(0), _Net(1)])
    b = DeepEnsemble([_Net(2), _Net(3)])
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 4)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))
    with pytest.raises(ValueError, match="at least one member"):
        DeepEnsemble([])
