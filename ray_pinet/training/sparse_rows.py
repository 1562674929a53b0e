"""Row-sparse exchange of the item table's gradient (``optim.item_exchange: rows``).

A step of a sampled loss (``bce``, ``sampled_softmax``) touches the rows of the items in its
inputs, targets and negatives: a few thousand of the table's M + 1 rows. The dense path computes,
all-reduces and steps a full [M + 1, d] gradient every step, so its cost grows with the catalogue
(BENCHMARKS.md: 837 ms per step at 10^8 parameters). Here, per step:

1. ``begin``: this rank's touched ids U_r (sorted, padding id 0 included) and a leaf copy of those
   rows; the batch's item ids are renumbered into U_r. The caller runs the model with the table
   replaced by that [|U_r|, d] copy (``torch.func.functional_call``): the model is unchanged and
   never sees the full table, and autograd's gradient for the table is [|U_r|, d].
2. ``exchange`` (collective): the ids are all-gathered, their union U (sorted) is the same on every
   rank, and one SUM all-reduce of a [|U|, d] buffer gives every rank the global gradient of each
   touched row. GA weighting is already in it: the rows were backpropagated from the GA-weighted
   loss, exactly as the dense gradient is. ``weight.grad`` becomes a sparse COO tensor.
3. The table is stepped by ``torch.optim.SparseAdam`` (lazy Adam: only the rows in the gradient
   move and only their moments update; a row's bias correction uses the global step count).

Rows no rank touched have zero dense gradient, so 1 process and W workers hold the same sparse
gradient (the union does not depend on W); the all-reduce adds the same terms in another order.
Not applicable to full-softmax ``ce`` (every row gets a gradient at every step).

Costs per step: two all-gathers (sizes, then ids) and one all-reduce of |U| · d floats, and one
host read of the gathered sizes (a GPU stream sync per step; the dense path has none).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ray_pinet.training.collectives import all_gather_rows, all_reduce_sum_

ITEM_TABLE = "backbone.item_emb.weight"


class RowSparseTable:
    """The item table of ``model`` exchanged and updated by touched rows only."""

    def __init__(self, model: torch.nn.Module, name: str = ITEM_TABLE):
        params = dict(model.named_parameters())
        if name not in params:
            raise ValueError(f"the model has no parameter {name!r} (row-sparse exchange needs an item table)")
        self.name, self.weight = name, params[name]
        self.rows: torch.Tensor | None = None
        self.sub: torch.Tensor | None = None
        self._wrapper = _Call(model)

    def begin(self, ids: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """({name: the touched rows as a leaf}, ``ids`` renumbered into those rows). Padding id 0
        is always row 0 of the copy, so ``padding_idx=0`` still means padding."""
        device = self.weight.device
        flat = [t.reshape(-1) for t in ids] + [torch.zeros(1, dtype=torch.int64, device=device)]
        self.rows = torch.unique(torch.cat(flat))  # sorted
        self.sub = self.weight.detach()[self.rows].requires_grad_(True)
        return {self.name: self.sub}, [torch.searchsorted(self.rows, t) for t in ids]

    def exchange(self) -> torch.Tensor:
        """Collective. Sets ``weight.grad`` to the sparse global gradient of every row some rank
        touched this step; returns that union of row ids."""
        if self.rows is None or self.sub is None:
            raise RuntimeError("exchange() before begin()")
        grad = self.sub.grad if self.sub.grad is not None else torch.zeros_like(self.sub)
        union = torch.unique(all_gather_rows(self.rows))
        buf = torch.zeros((union.numel(), grad.shape[1]), dtype=torch.float32, device=grad.device)
        buf.index_add_(0, torch.searchsorted(union, self.rows), grad.float())
        all_reduce_sum_(buf)
        # union is sorted and unique: the tensor is coalesced as built
        self.weight.grad = torch.sparse_coo_tensor(union.unsqueeze(0), buf.to(self.weight.dtype), self.weight.shape,
                                                   is_coalesced=True, check_invariants=False)
        self.rows = self.sub = None
        return union

    def call(self, override: dict[str, torch.Tensor], fn, *args, **kwargs):
        """``fn(model, *args, **kwargs)`` with the table replaced by ``override`` (public
        ``torch.func.functional_call`` on a wrapper whose forward is ``fn``)."""
        return torch.func.functional_call(self._wrapper, {f"model.{k}": v for k, v in override.items()},
                                          (fn, *args), kwargs)

    def dense_params(self, params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """``params`` without the table (they keep the dense GA reducer)."""
        return [p for p in params if p is not self.weight]


class _Call(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)
