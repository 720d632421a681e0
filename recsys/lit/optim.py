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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
