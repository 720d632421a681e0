"""The CPU fast paths of the id-embedding models (`recsys.models.NeuMF`, `recsys.models.MF`).

Each computes the same function as a plain operation (tests/test_ops.py checks values and
gradients against it), in a way that is cheaper on the CPU: distinct ids looked up once and
gathered per pair. ``torch.unique`` waits for an accelerator, so where reads from the device
are not free (`common.host_reads_are_free`) each takes the plain operation instead.

Notation: B pairs of a batch, D distinct ids among them, E embedding dim, H output width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from recsys.models import common


class Ids(NamedTuple):
    """A batch's ids of one kind: per pair [B] and, on the CPU where asked, the distinct ids
    (sorted) [D] and each pair's index among them [B]."""

    pairs: torch.Tensor
    distinct: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @classmethod
    def of(cls, ids: torch.Tensor, distinct: bool) -> Ids:
        """``ids`` [B], with their distinct ids and inverse when ``distinct`` and on the CPU."""
        if not distinct or not common.host_reads_are_free(ids):  # unique waits for a GPU
            return cls(ids)
        return cls(ids, *torch.unique(ids, return_inverse=True))


def rows(table: nn.Embedding, ids: Ids) -> torch.Tensor:
    """``table(ids.pairs)``, the pairs' rows [B, E].

    - row-sparse gradients (``table.sparse``) on the CPU: the distinct rows (`distinct_rows`:
      a gradient with each row once, in order), gathered per pair;
    - dense gradients on the CPU: ``index_select``, whose backward (an index_add) is faster
      there than the embedding's (a sort and a segment sum) at training batch sizes;
    - on a GPU the embedding op: an index_add's atomics would make the gradients
      order-dependent.
    """
    if not common.host_reads_are_free(ids.pairs):
        return table(ids.pairs)
    if table.sparse:
        return distinct_rows(table, ids).index_select(0, ids.inverse)
    return table.weight.index_select(0, ids.pairs)


def distinct_rows(table: nn.Embedding, ids: Ids) -> torch.Tensor:
    """``table.weight[ids.distinct]`` [D, E]; with ``table.sparse`` its gradient is row-sparse
    with the distinct rows in order (`CoalescedRows`)."""
    if table.sparse:
        return CoalescedRows.apply(table.weight, ids.distinct)
    return table.weight.index_select(0, ids.distinct)


class CoalescedRows(torch.autograd.Function):
    """``weight[rows]`` for sorted distinct ``rows``, with a row-sparse gradient over those rows,
    coalesced in content: `recsys.lit.optim.RowSparseAdam` then skips the sort and segment sum
    that the embedding op's gradient (a row per pair) needs. The gradient is marked coalesced,
    but autograd's accumulation into ``.grad`` drops the mark, so the optimizer checks the
    order of the rows instead."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.size = weight.shape
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rows,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(
            rows[None], grad, ctx.size, is_coalesced=True, check_invariants=False
        ), None


def pair_linear(
    layer: nn.Linear,
    users: Ids,
    items: Ids,
    user_rows: torch.Tensor,
    item_rows: torch.Tensor,
) -> torch.Tensor:
    """``layer([user_rows[u]; item_rows[i]])`` for every pair [B, H], from the rows of the
    distinct users [Du, Eu] and items [Di, Ei] (``users.distinct``, ``items.distinct``).

    The layer W [x_u; x_i] + b splits into the user half W_u x_u and the item half
    W_i x_i + b, each computed once per distinct user and item and gathered per pair: fewer
    FLOPs where ids repeat, as negative sampling repeats each user 1 + n times in a batch.
    The gathers are ``index_select``, whose backward is an index_add (see `rows`)."""
    m = user_rows.shape[1]
    user_half = F.linear(user_rows, layer.weight[:, :m])
    item_half = F.linear(item_rows, layer.weight[:, m:], layer.bias)
    return user_half.index_select(0, users.inverse) + item_half.index_select(0, items.inverse)


def squared_norms(tables: Sequence[nn.Embedding], ids: torch.Tensor) -> list[torch.Tensor]:
    """Per table, ``table(ids).square().sum()``: the squared norms of the rows that ``ids`` [B]
    look up, summed over the pairs [scalar]. On the CPU once per distinct id, weighted by
    its count; elsewhere the embedding op."""
    if not common.host_reads_are_free(ids):
        return [table(ids).square().sum() for table in tables]
    distinct, counts = torch.unique(ids, return_counts=True)
    lookup = Ids(ids, distinct)
    out = []
    for table in tables:
        norms = distinct_rows(table, lookup).square().sum(1)
        out.append(counts.to(norms.dtype) @ norms)
    return out
