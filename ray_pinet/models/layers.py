"""Small building blocks shared by the backbones and the plugins."""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn


def xavier_init_(module: nn.Module) -> None:
    """Xavier-normal for every weight matrix and embedding table (SASRec.pytorch practice); biases,
    layernorms and PReLU slopes keep their deterministic defaults except linear biases, set to zero.
    Padding rows (index 0) of embeddings are zeroed again afterwards."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.xavier_normal_(m.weight)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with a ``rand_like`` threshold mask. Same distribution as F.dropout, but
    torch's CPU ``bernoulli_`` is ~3x slower and made up ~20% of a SASRec training step."""
    if not training or p == 0.0:
        return x
    return x * ((torch.rand_like(x) >= p).to(x.dtype) / (1.0 - p))


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """in -> widths[0] -> ... -> widths[-1] (-> out_dim). Every hidden layer is a block
    Linear + activation + dropout; the output layer (when ``out_dim`` is given) is a bare Linear.

    ``forward(x, start, end)`` runs blocks ``start:end``, so a model can share the first blocks and hand the
    rest to per-stratum copies (``tail``)."""

    def __init__(self, in_dim: int, widths: Sequence[int], out_dim: int | None = None,
                 activation: Callable[[int], nn.Module] = lambda width: nn.ReLU(),
                 dropout: float = 0.0) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        prev = in_dim
        for width in widths:
            blocks.append(nn.Sequential(nn.Linear(prev, width), activation(width), Dropout(dropout)))
            prev = width
        if out_dim is not None:
            blocks.append(nn.Linear(prev, out_dim))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def tail(self, start: int) -> "MLP":
        """A deep copy of blocks ``start:`` (same weights), as an independent MLP."""
        out = MLP.__new__(MLP)
        nn.Module.__init__(out)
        out.blocks = nn.ModuleList(copy.deepcopy(list(self.blocks[start:])))
        return out

    def last_linear(self) -> nn.Linear:
        last = self.blocks[-1]
        return last if isinstance(last, nn.Linear) else last[0]


def check_stratum(stratum: torch.Tensor, batch: int, num_strata: int) -> None:
    if stratum.dim() != 1 or stratum.shape[0] != batch:
        raise ValueError(f"stratum must have shape [{batch}], got {tuple(stratum.shape)}")
    if torch.compiler.is_exporting():
        # The value check reads the batch on the host, which an exported graph cannot; there
        # the static route's gather refuses an out-of-range stratum instead.
        return
    if stratum.numel() and (int(stratum.min()) < 0 or int(stratum.max()) >= num_strata):
        raise ValueError(
            f"stratum values must be in 0..{num_strata - 1} (unseen users go to 0 = tail), "
            f"got {int(stratum.min())}..{int(stratum.max())}"
        )


def route(x: torch.Tensor, stratum: torch.Tensor, fns: Sequence[Callable[[torch.Tensor], torch.Tensor]],
          static: bool = False) -> torch.Tensor:
    """Apply ``fns[s]`` to the rows (dim 0) of ``x`` whose stratum is s; rows keep their order.

    Training (``static=False``): only the strata present in the batch run, so each plugin sees
    only its own rows (and only its parameters get gradients from them). That needs the batch's
    strata on the host (``unique().tolist()``, ``nonzero``): data-dependent control flow, which
    ``torch.export`` cannot trace. ``static=True`` (the served scoring graph): every plugin runs
    on every row and a gather keeps row b's ``fns[stratum[b]]`` output: K times the plugin
    compute (K is small), no host sync, one graph for every batch."""
    if static:
        outs = torch.stack([f(x) for f in fns])  # [K, B, ...]
        index = stratum.view(1, -1, *([1] * (outs.dim() - 2))).expand(1, *outs.shape[1:])
        return outs.gather(0, index).squeeze(0)
    pieces, order = [], []
    for s in torch.unique(stratum).tolist():
        idx = (stratum == s).nonzero(as_tuple=True)[0]
        pieces.append(fns[s](x.index_select(0, idx)))
        order.append(idx)
    if not pieces:
        return fns[0](x)  # empty batch: keeps the output shape
    perm = torch.cat(order)
    out = torch.cat(pieces)
    return out.index_select(0, torch.argsort(perm))
