"""One optimizer over parts with their own rules, and learning-rate schedules."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class CombinedOptimizer(Optimizer):
    """Several optimizers stepped as one, e.g. Adagrad for embedding tables and Adam for the
    rest (TorchRec practice), so that Lightning's automatic optimization counts one step,
    clips the gradients of every parameter and schedules every learning rate: all of these
    read ``param_groups``, the parts' groups in order.

    TorchRec's ``torchrec.optim.keyed.CombinedOptimizer`` does not fit Lightning: its
    ``step(closure)`` runs the closure (forward and backward) once per part, and its keyed
    ``load_state_dict`` refuses a fresh optimizer (the resume case). Here the closure runs
    once, and the state dict is each part's own torch state dict.

    Example::

        >>> import torch
        >>> tables = [torch.nn.Parameter(torch.ones(3))]
        >>> others = [torch.nn.Parameter(torch.ones(2))]
        >>> parts = {"sparse": torch.optim.Adagrad(tables), "dense": torch.optim.Adam(others)}
        >>> opt = CombinedOptimizer(parts)
        >>> len(opt.param_groups)  # both parts' groups: Lightning clips and schedules them all
        2
    """

    def __init__(self, parts: dict[str, Optimizer]):
        # no Optimizer.__init__: the parameter groups are the parts' own
        self.parts = parts
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for part in self.parts.values() for g in part.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """The parts' per-parameter states (the same dicts), in one read-only view."""
        return {p: s for part in self.parts.values() for p, s in part.state.items()}

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(
                f"optimizer state has parts {sorted(state_dict)}, this optimizer "
                f"{sorted(self.parts)}: was the checkpoint written with another "
                "model.sparse_optimizer?"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={part!r}" for name, part in self.parts.items())
        return f"{type(self).__name__}({parts})"


class RowSparseAdam(torch.optim.SparseAdam):
    """`torch.optim.SparseAdam` (lazy Adam on row-sparse gradients: a row's moments and
    weights move only in the steps whose gradient holds it), the same update to the bit when a
    step's rows are distinct (as NeuMF's are), with the rows read by ``index_select`` and
    written by ``index_copy_`` / ``index_add_``; repeated rows are summed as in
    `RowSparseAdagrad`.

    torch's version reads and writes the rows through sparse tensors (``sparse_mask``, a
    dense ``add_`` of a sparse tensor), which slow down with the table's size, not only the
    batch's; index operations do not. State and state dict are SparseAdam's, so either loads
    the other's.

    Example::

        >>> import torch
        >>> table = torch.nn.Embedding(100, 4, sparse=True)
        >>> opt = RowSparseAdam(table.parameters(), lr=0.01)
        >>> table(torch.tensor([3, 3, 7])).sum().backward()
        >>> opt.step()  # rows 3 and 7 move, the others keep their values and zero moments
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group, p, rows, values in _row_gradients(self):
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            if values.numel() == 0:
                continue
            # the operations of torch.optim._functional.sparse_adam, in its order, on the
            # gathered rows: old + (new - old) * (1 - beta)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            old_avg, old_sq = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
            avg = values.sub(old_avg).mul_(1 - beta1).add_(old_avg)
            sq = values.pow(2).sub_(old_sq).mul_(1 - beta2).add_(old_sq)
            exp_avg.index_copy_(0, rows, avg)
            exp_avg_sq.index_copy_(0, rows, sq)
            step = state["step"]
            step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            p.index_add_(0, rows, -step_size * avg.div_(sq.sqrt_().add_(group["eps"])))
        return loss


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    """What an optimizer's ``step(closure)`` returns: the closure's loss, run with gradients
    enabled (a step may run under ``no_grad``), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _row_sparse(grad: torch.Tensor, optimizer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, values) of a row-sparse gradient, each row once and in increasing order.

    Repeated rows (``nn.EmbeddingBag(sparse=True)`` gives one per lookup) are summed by
    ``unique`` and ``index_add_``, cheaper than ``coalesce``'s sort; the same sums up to the
    order of the additions."""
    if not grad.is_sparse or grad.sparse_dim() != 1:
        raise RuntimeError(
            f"{optimizer} takes row-sparse gradients only (sparse in their first dimension, as "
            "nn.Embedding(sparse=True) and model.sparse_grad=true give); use Adam or Adagrad "
            "for dense ones and torch.optim.SparseAdam for other sparse ones"
        )
    rows, values = grad._indices()[0], grad._values()
    # rows in increasing order are distinct: nothing to sum (NeuMF's gradients are)
    if grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all()):
        return rows, values
    rows, inverse = torch.unique(rows, return_inverse=True)
    return rows, values.new_zeros(len(rows), *values.shape[1:]).index_add_(0, inverse, values)


def _row_gradients(optimizer: Optimizer):
    """(group, parameter, rows, values) for each parameter of ``optimizer`` with a gradient:
    its row-sparse gradient as `_row_sparse` gives it, negated where the group maximizes."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            rows, values = _row_sparse(p.grad, type(optimizer).__name__)
            yield group, p, rows, -values if group["maximize"] else values


class RowSparseAdagrad(torch.optim.Adagrad):
    """`torch.optim.Adagrad` on row-sparse gradients (TorchRec's choice for embedding tables,
    and DLRM's ``sparse_optimizer``), with the gradient's repeated rows summed by `unique`
    rather than ``coalesce`` and the rows read and written by ``index_select`` /
    ``index_add_``. The update is torch's sparse Adagrad, to the bit when the gradient's rows
    are distinct; with repeated rows their sums may differ in the last bits (another order of
    addition). State and state dict are Adagrad's, so either loads the other's.

    Example::

        >>> import torch
        >>> table = torch.nn.EmbeddingBag(100, 4, mode="sum", sparse=True)
        >>> opt = RowSparseAdagrad(table.parameters(), lr=0.02)
        >>> table(torch.tensor([[3, 3, 7]])).sum().backward()
        >>> opt.step()  # rows 3 and 7 move
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        if any(group["weight_decay"] != 0 for group in self.param_groups):
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        for group, p, rows, values in _row_gradients(self):
            state = self.state[p]
            state["step"] += 1
            clr = group["lr"] / (1 + (float(state["step"]) - 1) * group["lr_decay"])
            if values.numel() == 0:
                continue
            # torch.optim._functional.adagrad's sparse branch, on the gathered rows
            state["sum"].index_add_(0, rows, values.pow(2))
            std = state["sum"].index_select(0, rows).sqrt_().add_(group["eps"])
            p.index_add_(0, rows, values / std, alpha=-clr)
        return loss


def cosine_with_warmup(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up from 0 to each group's lr over ``warmup_steps``, then cosine decay to 0
    at ``total_steps`` (and 0 after). Use it per step, e.g. in ``conf/model/*.yaml``::

        lr_scheduler:
          _target_: recsys.lit.optim.cosine_with_warmup
          _partial_: true
          warmup_steps: 100
          total_steps: ${trainer.max_steps}
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"cosine_with_warmup needs 0 <= warmup_steps < total_steps, got "
            f"warmup_steps={warmup_steps}, total_steps={total_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
