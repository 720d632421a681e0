"""Train/validation/test splits of the interaction rows, as index tensors (int32 below 2**31
rows)."""

from __future__ import annotations

import numpy as np
import torch

from recsys.data.preprocess import index_dtype
from recsys.data.store import Interactions

SPLITS = ("random", "temporal", "leave_one_out", "source")
VAL_ROWS = ("previous", "random")


def split_indices(
    inter: Interactions,
    kind: str,
    val: float,
    test: float,
    seed: int,
    val_row: str = "previous",
) -> dict[str, torch.Tensor]:
    """Row indices of each split.

    - ``random``: a seeded permutation; ``val`` and ``test`` are fractions of all rows.
    - ``temporal``: for each user, the latest ``test`` fraction of their rows (by timestamp)
      are test rows and the ``val`` fraction before them validation rows.
    - ``leave_one_out``: each user's latest row is the test row; the validation row is the
      one before it (``val_row="previous"``) or one of the user's other rows drawn uniformly
      with ``seed`` (``val_row="random"``, as He et al. 2017 tune NCF: the rows right before
      the test row stay in training). Users with fewer than 3 rows keep all of them for
      training.

    Ties in time are broken by row order, so every split is deterministic. ``source`` (the
    dataset's own split, e.g. Criteo's time order) is `source_split`.
    """
    if kind == "source":
        raise ValueError("data.split.kind=source is the dataset's own split: see source_split")
    if kind not in SPLITS:
        raise ValueError(f"data.split.kind={kind!r} is not one of {SPLITS}")
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"split fractions val={val}, test={test} must be in [0, 1) and sum < 1")
    if val_row not in VAL_ROWS:
        raise ValueError(f"data.split.val_row={val_row!r} is not one of {VAL_ROWS}")
    n = len(inter)
    split = np.zeros(n, dtype=np.int8)  # 0 train, 1 val, 2 test, in original row order
    if kind == "random":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        n_test, n_val = round(n * test), round(n * val)
        split[perm[:n_test]] = 2
        split[perm[n_test : n_test + n_val]] = 1
        del perm
        return _rows_of(split)

    ts = inter.timestamps.numpy()
    if (ts < 0).any():
        raise ValueError(
            f"data.split.kind={kind!r} needs timestamps, but this dataset has none for "
            f"{int((ts < 0).sum()):,} rows; use data.split.kind=random"
        )
    users = inter.users.numpy()
    order = np.lexsort((ts, users))  # by user, then time, then row (the sort is stable)
    sorted_users = users[order]
    counts = np.bincount(sorted_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_u = counts[sorted_users]
    from_end = n_u - 1 - (np.arange(n) - starts[sorted_users])
    if kind == "leave_one_out":
        eligible = n_u >= 3
        is_test = eligible & (from_end == 0)
        if val_row == "previous":
            is_val = eligible & (from_end == 1)
        else:  # per user, uniform over its rows but the last: 1 .. count - 1 from the end
            draws = np.random.default_rng(seed).random(len(counts))
            users = np.flatnonzero(counts >= 3)
            from_end_val = 1 + np.floor(draws[users] * (counts[users] - 1)).astype(np.int64)
            is_val = np.zeros(n, dtype=bool)
            is_val[starts[users] + counts[users] - 1 - from_end_val] = True
    else:
        n_test = np.floor(n_u * test + 0.5)
        n_val = np.floor(n_u * (test + val) + 0.5)
        is_test, is_val = from_end < n_test, (from_end >= n_test) & (from_end < n_val)
    split[order[is_val]] = 1
    split[order[is_test]] = 2
    return _rows_of(split)


def _rows_of(split: np.ndarray) -> dict[str, torch.Tensor]:
    """Sorted row indices of each split from the split code of every row (0 train, 1 val,
    2 test), int32 below 2**31 rows (4 bytes a row, not 8: they index tensors as well)."""
    dtype = index_dtype(len(split))
    return {
        name: torch.from_numpy(np.flatnonzero(split == code).astype(dtype))
        for code, name in enumerate(("train", "val", "test"))
    }


def source_split(meta: dict, source: str) -> dict[str, torch.Tensor]:
    """The rows of each split as the dataset defines them (``split: {train: [start, stop],
    ...}`` in its metadata: Criteo's time order), for ``data.split.kind=source``."""
    bounds = meta.get("split")
    if bounds is None:
        raise ValueError(
            f"{source} has no split of its own: use data.split.kind=random, temporal or "
            "leave_one_out"
        )
    dtype = torch.int32 if meta["num_interactions"] < 2**31 else torch.int64
    return {name: torch.arange(*bounds[name], dtype=dtype) for name in ("train", "val", "test")}
