"""``StratumEnsemble``: one model per stratum behind RecModel's scoring interface.

What the ``separate`` and ``finetune`` baselines produce: row b is scored by member ``stratum[b]``
(users unseen in training arrive with the caller's fallback stratum, as for PINet's plugins). Evaluation and
``ScoringModule`` only call ``predict``, so the ensemble is evaluated and served like any other model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ray_pinet.models.layers import check_stratum, route


class StratumEnsemble(nn.Module):
    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_strata = len(self.members)
        self.use_plugins = True  # scoring needs the stratum (ScoringModule passes it when True)
        self.static_routing = False  # serving.export_scoring sets it

    @property
    def supports_full(self) -> bool:
        return all(m.supports_full for m in self.members)

    def predict(
        self, history: torch.Tensor, stratum: torch.Tensor | None = None, candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        if stratum is None:
            raise ValueError("StratumEnsemble routes every row by its stratum: pass stratum")
        check_stratum(stratum, history.shape[0], self.num_strata)
        if self.static_routing:  # the exported graph: every member, then a gather
            fns = [lambda h, m=m: m.predict(h, None, candidates) for m in self.members]
            return route(history, stratum, fns, static=True)
        out = None
        for s, member in enumerate(self.members):
            rows = (stratum == s).nonzero(as_tuple=True)[0]
            if len(rows) == 0:
                continue
            part = member.predict(history[rows], None, None if candidates is None else candidates[rows])
            if out is None:
                out = part.new_zeros((history.shape[0],) + tuple(part.shape[1:]))
            out[rows] = part
        if out is None:  # empty batch
            return self.members[0].predict(history, None, candidates)
        return out
