"""Deep ensembles: several independently trained copies of one model, averaged in probability space.

``DeepEnsemble(members)`` is an ``nn.Module`` whose output is ``log(mean_i softmax(member_i(x)))``: a
softmax of it gives the members' mean class probabilities, so it drops in wherever a classifier's logits
are expected (temperature scaling, MC dropout: every member's dropout layers are the ensemble's). Per-member
auxiliary maps named in ``average_attrs`` (e.g. an attention-gate map kept in ``last_gate``) are averaged
into the same attribute of the ensemble after each forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class DeepEnsemble(nn.Module):
    """Mean of the members' class probabilities, returned as log-probabilities."""

    def __init__(self, members: Iterable[nn.Module], average_attrs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("a DeepEnsemble needs at least one member")
        self.average_attrs = average_attrs
        for name in average_attrs:
            setattr(self, name, None)

    @property
    def cfg(self):  # noqa: ANN201  (the members' config: every member has the same architecture)
        return self.members[0].cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([torch.log_softmax(m(x).float(), dim=-1) for m in self.members])
        out = torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
        for name in self.average_attrs:
            maps = [getattr(m, name, None) for m in self.members]
            setattr(self, name, None if any(v is None for v in maps) else torch.stack(maps).mean(0))
        return out
