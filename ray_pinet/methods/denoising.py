"""Per-row losses for implicit feedback with noisy or missing labels (pure torch, no Ray):
Inverse Learning's Inverse Dual Loss (Lin et al., WSDM 2024; methods.md §5.2) and the
DenoisingRec baselines T-CE and R-CE (Wang et al., WSDM 2021; methods.md §5.5).

Each function returns the loss of every row (Float[B]) or a keep mask, so a data-parallel step
can weight, truncate and sum rows across workers before dividing by the global count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-9


def bce_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Float[B]: −y log σ(s) − (1−y) log(1−σ(s))."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")


def idl_rows(logits: torch.Tensor) -> torch.Tensor:
    """Float[B]: IDL(s) = w⁺ℓ⁺ + w⁻ℓ⁻ with ℓ⁺ = −log σ(s), ℓ⁻ = −log(1−σ(s)) and the stop-gradient
    weights w⁺ = ℓ⁻² / (ℓ⁺² + ℓ⁻²), w⁻ = ℓ⁺² / (ℓ⁺² + ℓ⁻²): the label the model finds more likely
    gets the larger weight (``InverseDualLoss/loss.py``)."""
    pos = F.softplus(-logits)  # −log σ(s)
    neg = F.softplus(logits)  # −log(1 − σ(s))
    with torch.no_grad():
        den = pos.pow(2) + neg.pow(2) + EPS
        w_pos, w_neg = neg.pow(2) / den, pos.pow(2) / den
    return w_pos * pos + w_neg * neg


def truncation_keep(losses: torch.Tensor, labels: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """Bool[B]: T-CE keeps the rows with the smallest loss·y, i.e. it drops the ``drop_rate`` share
    of rows whose *positive* loss is largest (negatives, with loss·y = 0, are kept first). Ties
    are broken by row order, so the mask is a function of the batch alone."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    keep_n = int((1.0 - drop_rate) * losses.numel())
    order = torch.sort(losses.detach() * labels.to(losses.dtype), stable=True).indices
    keep = torch.zeros(losses.numel(), dtype=torch.bool, device=losses.device)
    keep[order[:keep_n]] = True
    return keep


def drop_rate_at(step: int, max_rate: float = 0.2, num_gradual: int = 30000) -> float:
    """T-CE's schedule: the drop rate grows linearly from 0 to ``max_rate`` over ``num_gradual``
    steps, then stays (DenoisingRec's ``drop_rate_schedule``)."""
    if num_gradual <= 0:
        return max_rate
    return max_rate * min(step, num_gradual) / num_gradual


def reweighted_rows(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """Float[B]: R-CE, BCE · w with the stop-gradient weight w = σ(s)^α for positives and
    (1 − σ(s))^(1−α) for negatives (the DenoisingRec R_CE loss as coded): positives the model
    finds unlikely (probably noise) count less."""
    y = labels.to(logits.dtype)
    with torch.no_grad():
        p = torch.sigmoid(logits)
        w = p.pow(alpha) * y + (1 - p).pow(1 - alpha) * (1 - y)
    return bce_rows(logits, labels) * w
