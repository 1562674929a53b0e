"""Per-sample next-item losses: one loss per valid target position, and the batch row it came from.

A position t of a training row is valid when both inputs[b, t] and targets[b, t] are real items
(the first item of a window is never a target: there is nothing before it). The trainer weights
the returned vector per position or per user (``methods/ga.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ray_pinet.methods.sampled_softmax import Candidates, sampled_softmax_loss
from ray_pinet.models.recmodel import RecModel

LOSSES = ("ce", "bce", "sampled_softmax")


def valid_positions(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bool[B, L]: the positions that are samples (a real input item and a real target)."""
    return (inputs != 0) & (targets != 0)


def per_position_losses(model: RecModel, inputs: torch.Tensor, targets: torch.Tensor,
                        negs: torch.Tensor | None, stratum: torch.Tensor | None,
                        loss: Literal["ce", "bce", "sampled_softmax"], states: torch.Tensor | None = None,
                        segments: torch.Tensor | None = None,
                        candidates: Candidates | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss_vec Float[P], row_index Long[P]) over the P valid positions, row-major order.

    - ``ce``: full-softmax cross-entropy over items 1..M (the padding column is never computed), only at valid
      positions (states -> gather -> full_logits). Dot-product backbones only. ``states``
      Float[B, L, d] = ``model.states(inputs, stratum)`` when the caller already has them
      (transfer's discriminator reads the same pass).
    - ``bce``: -log σ(s⁺) - Σ_j log(1 - σ(s⁻_j)) over negs Long[B, L, n] via ``model.score``.
    - ``sampled_softmax``: softmax over the target and the step's shared ``candidates``
      (methods/sampled_softmax.py: logQ-corrected, accidental hits masked). Dot-product backbones.

    ``segments`` Long[R, L]: the rows are packed (training/packing.py); ``stratum`` is then per window and the
    returned row index names the window. Dot-product backbones only. States are taken at the valid positions
    before the plugins' adapter, which acts per position."""
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ")
    valid = valid_positions(inputs, targets)
    row_index = valid.nonzero(as_tuple=True)[0] if segments is None else segments[valid]
    position_stratum = None if stratum is None else stratum[row_index]
    if states is not None and (loss != "ce" or segments is not None):
        raise ValueError("precomputed states are used by loss 'ce' on padded rows only")
    if loss == "ce":
        if states is None:
            states = model.position_states(inputs, valid, position_stratum, segments)
        else:
            states = states[valid]
        logits = model.full_logits(states, position_stratum, skip_padding=True)
        return F.cross_entropy(logits, targets[valid].long() - 1, reduction="none"), row_index
    if loss == "sampled_softmax":
        if candidates is None:
            raise ValueError("sampled_softmax needs the step's candidates (NegativeSampler.candidates)")
        states = model.position_states(inputs, valid, position_stratum, segments)
        t = targets[valid]
        pos = model.position_logits(states, position_stratum, t.unsqueeze(1))[:, 0]
        cand = model.candidate_logits(states, position_stratum, candidates.items)
        return sampled_softmax_loss(pos, cand, t, candidates), row_index
    if loss == "bce":
        if negs is None or negs.dim() != 3 or negs.shape[:2] != inputs.shape:
            raise ValueError(f"bce needs negs Long[B, L, n] matching inputs {tuple(inputs.shape)}")
        items = torch.cat([targets.unsqueeze(-1), negs], dim=-1)
        if segments is None:
            logits = model.score(inputs, items, stratum)[valid]  # [P, 1 + n]
        else:
            states = model.position_states(inputs, valid, position_stratum, segments)
            logits = model.position_logits(states, position_stratum, items[valid])
        return F.softplus(-logits[:, 0]) + F.softplus(logits[:, 1:]).sum(-1), row_index
    raise ValueError(f"unknown loss {loss!r}; one of {list(LOSSES)}")
