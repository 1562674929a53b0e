"""The served form of a trained model: one tensor in, catalogue scores out.

``ScoringModule`` is what ray-pinet logs to MLflow (``mlflow.pytorch``) and registers. Its input is
a single int64 matrix so that MLflow's pyfunc flavour can call it with a numpy array:
column 0 is the user's stratum (-1 = unknown user -> routed to ``unseen_stratum``, the tail
plugin by default), columns 1..L are the last L items (item indices, oldest first, left-padded
with 0). Output: float32 [B, M+1] scores over the catalogue (column 0, the padding item, is -inf).
"""

from __future__ import annotations

import torch


class ScoringModule(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, unseen_stratum: int = 0):
        super().__init__()
        self.model = model
        self.unseen_stratum = int(unseen_stratum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).to(torch.int64)
        stratum = x[:, 0].clone()
        stratum[stratum < 0] = self.unseen_stratum
        history = x[:, 1:]
        with torch.no_grad():
            scores = self.model.predict(history, stratum if self.model.use_plugins else None, None)
        scores = scores.clone()
        scores[:, 0] = -torch.inf
        return scores
