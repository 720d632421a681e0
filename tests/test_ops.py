"""Each fast path of `recsys.models.ops` against the plain operation it stands for: the same
values and the same gradients (dense, and row-sparse where the table asks), on the CPU path and
on the path taken where reads from the device are not free (as on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recsys.models import common, ops
from recsys.models.ops import Ids

NUM_IDS, DIM = 40, 6


@pytest.fixture(params=["cpu", "device"])
def path(request, monkeypatch) -> str:
    """``cpu``: the fast paths; ``device``: `common.host_reads_are_free` off, as on a GPU."""
    if request.param == "device":
        monkeypatch.setattr(common, "host_reads_are_free", lambda t: False)
    return request.param


def _ids(seed: int, n: int = 120) -> torch.Tensor:
    """Ids with repeats, unsorted, some of them absent: as a batch with negatives holds."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(NUM_IDS - 5, (n // 4,), generator=g).repeat_interleave(4)[
        torch.randperm(n, generator=g)
    ]


def _table(sparse: bool, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(NUM_IDS, DIM, sparse=sparse)


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.coalesce().to_dense() if grad.is_sparse else grad


def _values_and_grads(fn, params: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """fn() and the gradients of a weighted sum of it (weights that differ per element)."""
    for p in params:
        p.grad = None
    out = fn()
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    (out * weights).sum().backward()
    return out.detach(), [p.grad for p in params]


def test_ids_are_the_distinct_ids_and_inverse(path):
    ids = _ids(0)
    got = Ids.of(ids, distinct=True)
    assert got.pairs is ids
    if path == "device":  # no torch.unique where it waits for the device
        assert got.distinct is None and got.inverse is None
        return
    assert torch.equal(got.distinct, ids.unique())
    assert torch.equal(got.distinct[got.inverse], ids)
    assert Ids.of(ids, distinct=False).distinct is None


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_rows_are_the_embedding_lookup(path, sparse):
    """`ops.rows` against ``table(ids)``; with a sparse table, a row-sparse gradient."""
    ids = _ids(1)
    ours, plain = _table(sparse), _table(sparse)
    lookup = Ids.of(ids, distinct=sparse)
    got, (grad,) = _values_and_grads(lambda: ops.rows(ours, lookup), [ours.weight])
    expected, (expected_grad,) = _values_and_grads(lambda: plain(ids), [plain.weight])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert grad.is_sparse == sparse
    torch.testing.assert_close(_dense(grad), _dense(expected_grad))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_distinct_rows_are_the_rows_of_the_distinct_ids(sparse):
    """`ops.distinct_rows` against ``weight[distinct]``; with a sparse table its gradient
    holds each distinct row once, in increasing order (what `RowSparseAdam` checks)."""
    ids = Ids.of(_ids(2), distinct=True)
    ours, plain = _table(sparse), _table(sparse)
    got, (grad,) = _values_and_grads(lambda: ops.distinct_rows(ours, ids), [ours.weight])
    expected, (expected_grad,) = _values_and_grads(
        lambda: plain.weight[ids.distinct], [plain.weight]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(_dense(grad), expected_grad)
    if sparse:
        assert grad.is_sparse
        assert torch.equal(grad._indices()[0], ids.distinct)


def test_coalesced_rows_is_index_select():
    """`ops.CoalescedRows` against ``index_select``: the same rows, and a gradient that is
    the index_select's, row-sparse: the upstream gradient's rows at the given rows."""
    weight = torch.randn(NUM_IDS, DIM, requires_grad=True)
    rows = _ids(3).unique()
    got, (grad,) = _values_and_grads(lambda: ops.CoalescedRows.apply(weight, rows), [weight])
    expected, (expected_grad,) = _values_and_grads(lambda: weight.index_select(0, rows), [weight])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert grad.is_sparse and torch.equal(grad._indices()[0], rows)
    torch.testing.assert_close(grad.to_dense(), expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_pair_linear_is_the_linear_layer_on_the_concatenation(sparse):
    """`ops.pair_linear` (each half of the layer once per distinct id) against the layer on
    ``[user_rows[u]; item_rows[i]]`` per pair: values and every gradient."""
    users, items = Ids.of(_ids(4), True), Ids.of(_ids(5), True)
    torch.manual_seed(0)
    layer = nn.Linear(2 * DIM, 8)
    user_table, item_table = _table(sparse, 1), _table(sparse, 2)
    params = [layer.weight, layer.bias, user_table.weight, item_table.weight]

    def fast() -> torch.Tensor:
        user_rows = ops.distinct_rows(user_table, users)
        item_rows = ops.distinct_rows(item_table, items)
        return ops.pair_linear(layer, users, items, user_rows, item_rows)

    def plain() -> torch.Tensor:
        pairs = [user_table.weight[users.pairs], item_table.weight[items.pairs]]
        return layer(torch.cat(pairs, dim=1))

    got, grads = _values_and_grads(fast, params)
    expected, expected_grads = _values_and_grads(plain, params)
    torch.testing.assert_close(got, expected)
    for name, grad, expected_grad in zip(
        ("weight", "bias", "user", "item"), grads, expected_grads, strict=True
    ):
        torch.testing.assert_close(_dense(grad), expected_grad, msg=name)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_squared_norms_are_the_sum_over_pairs(path, sparse):
    """`ops.squared_norms` (once per distinct id, weighted by its count, on the CPU) against
    the squared norms of every pair's row, summed."""
    ids = _ids(6)
    tables = [_table(sparse, 3), nn.Embedding(NUM_IDS, 1, sparse=sparse)]
    params = [t.weight for t in tables]

    def plain() -> torch.Tensor:
        return torch.stack([F.embedding(ids, t.weight).square().sum() for t in tables])

    got, grads = _values_and_grads(lambda: torch.stack(ops.squared_norms(tables, ids)), params)
    expected, expected_grads = _values_and_grads(plain, params)
    torch.testing.assert_close(got, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.is_sparse == sparse
        torch.testing.assert_close(_dense(grad), _dense(expected_grad))
