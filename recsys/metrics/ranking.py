"""Ranking accuracy, beyond-accuracy list metrics and efficiency helpers for evaluation.

Notation: U users (rows), C candidates per user, K length of a recommendation list,
I catalogue size (``num_items``), d item-vector dim.

- `RankingMetrics`: HR@K, NDCG@K, Recall@K and MRR from candidate scores [U, C] and a
  relevance mask [U, C]; covers the NCF leave-one-out protocol (one positive among C sampled
  candidates) and full ranking (several positives among all items).
- `catalogue_coverage`, `novelty`, `intra_list_diversity`, `personalization`: properties of the
  top-K lists [U, K] themselves.
- `latency_percentiles`, `peak_memory_mb`: serving cost.

Everything is vectorised over users; the only loops are over user chunks, to bound memory.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric


class RankingMetrics(Metric):
    """HR@K, NDCG@K, Recall@K (for each K in ``ks``) and MRR, averaged over users.

    ``update(scores, relevant)`` takes one batch of users: ``scores`` [U, C] (any real values,
    logits included; ``-inf`` may mask out candidates) and ``relevant`` [U, C] bool. Per user,
    with the candidates ranked by descending score and rank 1 the best:

    - ``hr@K``: 1 if at least one relevant candidate ranks in the top K, else 0. With one
      relevant item (leave-one-out) this is 1[rank <= K].
    - ``ndcg@K``: DCG@K / IDCG@K with binary gains, DCG@K = sum over relevant candidates with
      rank <= K of 1 / log2(rank + 1) and IDCG@K the DCG of a perfect ranking, i.e.
      sum_{i=1}^{min(R, K)} 1 / log2(i + 1) for R relevant candidates. With one relevant item
      this is 1[rank <= K] / log2(rank + 1).
    - ``recall@K``: relevant candidates in the top K / R (equal to ``hr@K`` when R = 1).
    - ``mrr``: 1 / rank of the best-ranked relevant candidate, no cut-off.

    Ties are broken pessimistically: a relevant candidate ranks below every non-relevant
    candidate with the same score. The result is deterministic, does not depend on the order of
    the candidate columns (NCF code often puts the positive in column 0, where an index-order or
    optimistic tie-break would favour it), and a model that scores every candidate alike gets
    no credit. Users without any relevant candidate are skipped (not counted as 0).

    Why not ``torchmetrics.retrieval``: checked on torchmetrics 1.9, its metrics do not fit this
    use. ``RetrievalMRR`` and ``RetrievalRecall`` treat candidates with a score <= 0 as not
    retrieved, so a positive ranked first with a negative logit scores 0 (while ``HitRate`` and
    ``NormalizedDCG`` score it 1); their ties are broken three different ways (argsort order,
    ``topk`` order, sklearn-style averaging); ``compute`` loops in Python over every query
    (about 1.3 s per metric on CPU for 6,040 leave-one-out users; there are ``3 * len(ks) + 1``
    metrics); every metric keeps all U x C scores and gathers them across ranks; and the query
    ``indexes`` must be unique across batches and ranks. Here each batch is reduced in
    ``update`` to per-metric sums over users, so the state is ``3 * len(ks) + 2`` numbers,
    DDP sync is a sum (``dist_reduce_fx="sum"``), and ``compute`` divides by the user count.
    The definitions agree with ``torchmetrics.functional.retrieval`` wherever the latter is
    well defined (positive, distinct scores); ``tests/test_ranking_metrics.py`` checks this.

    Example::

        >>> import torch
        >>> metric = RankingMetrics(ks=(1, 2))
        >>> scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.4]])  # [U, C]
        >>> relevant = torch.tensor([[True, False, False], [True, False, False]])  # [U, C]
        >>> metric.update(scores, relevant)
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}["hr@1"]
        0.5

    Wrap it in ``MetricCollection({"rank": metric}, prefix="test/")`` for ``test/hr@5`` names.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Iterable[int] = (5, 10, 20), **kwargs: Any):
        super().__init__(**kwargs)
        ks = tuple(ks)
        if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks):
            raise ValueError(f"ks={ks!r} must be a non-empty list of positive ints, e.g. [5, 10]")
        if len(set(ks)) != len(ks):
            raise ValueError(f"ks={ks!r} repeats a cut-off; list each K once")
        self.ks = tuple(sorted(ks))
        n = len(self.ks)
        self.add_state("hits", default=torch.zeros(n), dist_reduce_fx="sum")
        self.add_state("ndcg", default=torch.zeros(n), dist_reduce_fx="sum")
        self.add_state("recall", default=torch.zeros(n), dist_reduce_fx="sum")
        self.add_state("reciprocal_rank", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("users", default=torch.tensor(0.0), dist_reduce_fx="sum")
        # users whose scores hold NaN, refused in `compute`: testing each batch would read
        # back from the device
        self.add_state("nan_users", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(
        self,
        scores: torch.Tensor,
        relevant: torch.Tensor,
        users: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Adds a batch of users; ``users``: their figures if already computed (`per_user`
        of the same scores, relevance and ks)."""
        _check_ranking_inputs(scores, relevant, max(self.ks))
        if users is None:
            users = per_user(scores, relevant, self.ks)
        w = users["evaluated"].to(torch.float32)  # masks instead of indexing: no host sync
        for name in ("hits", "ndcg", "recall"):
            column = "hr" if name == "hits" else name
            stacked = torch.stack([users[f"{column}@{k}"] for k in self.ks], dim=1)  # [U, n]
            setattr(self, name, getattr(self, name) + (stacked * w.unsqueeze(1)).sum(0))
        self.reciprocal_rank += (users["mrr"] * w).sum()
        self.users += w.sum()
        self.nan_users += torch.isnan(scores).any(1).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns: ``{"hr@K", "ndcg@K", "recall@K"}`` for each K, and ``"mrr"``; 0-dim tensors.

        All are 0 when no user with a relevant candidate was seen (as torchmetrics does).

        Raises:
            ValueError: scores of some user held NaN.
        """
        if self.nan_users > 0:
            raise ValueError(
                f"scores of {int(self.nan_users)} users contain NaN, which has no rank; check "
                "the model's outputs"
            )
        users = self.users.clamp(min=1.0)
        out: dict[str, torch.Tensor] = {}
        for name, total in (("hr", self.hits), ("ndcg", self.ndcg), ("recall", self.recall)):
            for i, k in enumerate(self.ks):
                out[f"{name}@{k}"] = total[i] / users
        out["mrr"] = self.reciprocal_rank / users
        return out


def per_user(
    scores: torch.Tensor, relevant: torch.Tensor, ks: Iterable[int]
) -> dict[str, torch.Tensor]:
    """Each user's figures, float [U] each, by `RankingMetrics`' definitions: ``hr@K``,
    ``ndcg@K`` and ``recall@K`` for each K, ``mrr``, ``rank`` (1-based rank of the best-ranked
    relevant candidate, ties broken pessimistically) and ``evaluated`` (bool: the user has a
    relevant candidate; the figures of the others are 0 and count in no mean)."""
    ks = tuple(sorted(ks))
    ranked = _ranked_relevance(scores, relevant)  # [U, C] bool, column 0 = rank 1
    num_relevant = relevant.sum(1)  # [U]
    r = num_relevant.clamp(min=1)  # [U], 1 for skipped users to avoid 0 / 0
    top = ranked[:, : ks[-1]].to(torch.float32)  # [U, Kmax]
    discount = 1.0 / torch.log2(
        torch.arange(ks[-1], device=top.device, dtype=torch.float32) + 2.0
    )  # [Kmax], 1 / log2(rank + 1)
    cut = torch.tensor(ks, device=top.device) - 1  # [n] column of rank K
    hits = top.cumsum(1)[:, cut]  # [U, n] relevant candidates in the top K
    dcg = (top * discount).cumsum(1)[:, cut]  # [U, n]
    ideal = torch.minimum(r.unsqueeze(1), cut + 1) - 1  # [U, n]
    idcg = discount.cumsum(0)[ideal]  # [U, n]
    evaluated = num_relevant > 0
    w = evaluated.to(torch.float32)
    rank = ranked.to(torch.uint8).argmax(1).to(torch.float32) + 1.0  # [U]
    out = {"evaluated": evaluated, "rank": rank, "mrr": w / rank}
    for i, k in enumerate(ks):
        out[f"hr@{k}"] = (hits[:, i] > 0).to(torch.float32) * w
        out[f"ndcg@{k}"] = dcg[:, i] / idcg[:, i] * w
        out[f"recall@{k}"] = hits[:, i] / r.to(torch.float32) * w
    return out


def _check_ranking_inputs(scores: torch.Tensor, relevant: torch.Tensor, max_k: int) -> None:
    if scores.ndim != 2 or relevant.shape != scores.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} must both be "
            "[U, C]: one row of C candidate scores per user"
        )
    if not scores.is_floating_point():
        raise ValueError(f"scores has dtype {scores.dtype}; pass float scores or logits")
    if relevant.dtype != torch.bool:
        raise ValueError(f"relevant has dtype {relevant.dtype}; pass a bool mask (x.bool())")
    if max_k > scores.shape[1]:
        raise ValueError(
            f"K={max_k} exceeds the {scores.shape[1]} candidates per user; lower ks or score "
            "more candidates"
        )


def _ranked_relevance(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Relevance [U, C] reordered by descending score, relevant last within ties."""
    # Two stable sorts: non-relevant columns first, then by score; stability keeps the
    # non-relevant-first order inside each group of equal scores.
    by_label = torch.argsort(relevant.to(torch.uint8), dim=1, stable=True)
    by_score = torch.sort(scores.gather(1, by_label), dim=1, descending=True, stable=True)
    return relevant.gather(1, by_label.gather(1, by_score.indices))


def _check_topk(topk: torch.Tensor, num_items: int) -> tuple[int, int]:
    if topk.ndim != 2 or topk.shape[0] == 0 or topk.shape[1] == 0:
        raise ValueError(f"topk has shape {tuple(topk.shape)}; pass [U, K] item indices, U, K >= 1")
    if topk.is_floating_point() or topk.is_complex() or topk.dtype == torch.bool:
        raise ValueError(f"topk has dtype {topk.dtype}; pass integer item indices (int64)")
    lo, hi = int(topk.min()), int(topk.max())
    if lo < 0 or hi >= num_items:
        raise ValueError(
            f"topk holds item indices in [{lo}, {hi}] outside [0, num_items={num_items}); "
            "pass indices into the catalogue (no padding)"
        )
    return topk.shape[0], topk.shape[1]


def catalogue_coverage(topk: torch.Tensor, num_items: int) -> float:
    """Share of the catalogue that appears in at least one list: distinct items / ``num_items``.

    Args:
        topk: [U, K] item indices of each user's recommendation list.
        num_items: catalogue size I.
    """
    if num_items <= 0:
        raise ValueError(f"num_items={num_items} must be positive")
    _check_topk(topk, num_items)
    seen = torch.zeros(num_items, dtype=torch.bool, device=topk.device)
    seen[topk.flatten()] = True
    return float(seen.sum()) / num_items


def novelty(topk: torch.Tensor, item_popularity: torch.Tensor) -> float:
    """Mean self-information -log2(p_i) of the recommended items, in bits.

    p_i = n_i / N with n_i the item's interaction count in the training data and N the total
    number of training interactions (interactions, not distinct users, so repeat consumption
    counts). An item with n_i = 0 is counted as n_i = 1, giving the largest finite value
    log2(N) instead of infinity. The mean is over all U x K recommended slots.

    Args:
        topk: [U, K] item indices of each user's recommendation list.
        item_popularity: [I] non-negative training interaction counts per item.
    """
    if item_popularity.ndim != 1:
        raise ValueError(
            f"item_popularity has shape {tuple(item_popularity.shape)}; pass [num_items] counts"
        )
    counts = item_popularity.to(torch.float64)
    if bool((counts < 0).any()) or float(counts.sum()) <= 0:
        raise ValueError("item_popularity must hold non-negative counts with a positive total")
    _check_topk(topk, item_popularity.shape[0])
    p = counts.clamp(min=1.0) / counts.sum()
    return float(-torch.log2(p[topk]).mean())


def intra_list_diversity(
    topk: torch.Tensor, item_vectors: torch.Tensor, chunk_size: int = 8192
) -> float:
    """Mean over users of the mean pairwise cosine distance (1 - cos) inside each list.

    ``item_vectors`` may be multi-hot genre vectors (distances in [0, 1]) or embeddings
    (distances in [0, 2]). An item whose vector is all zeros (no genre) has cosine 0, so
    distance 1, to every other item. Figures compare only on the same vectors:
    `recsys.lit.RecommenderModule` scores every model's lists on the item feature's.

    Per list, with unit vectors v_1..v_K, the sum of cos over the K(K - 1) ordered pairs i != j
    is ||sum_i v_i||^2 - sum_i ||v_i||^2, so no [K, K] similarity matrix is built: memory is
    ``chunk_size`` x K x d floats per chunk of users.

    Args:
        topk: [U, K] item indices, K >= 2.
        item_vectors: [I, d] float features of every item.
        chunk_size: users per chunk.
    """
    if item_vectors.ndim != 2 or not item_vectors.is_floating_point():
        raise ValueError(
            f"item_vectors has shape {tuple(item_vectors.shape)} and dtype {item_vectors.dtype}; "
            "pass float [num_items, d] (multi-hot genres: x.float())"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    num_users, k = _check_topk(topk, item_vectors.shape[0])
    if k < 2:
        raise ValueError(f"topk has K={k}; intra-list diversity needs lists of at least 2 items")
    unit = F.normalize(item_vectors.float(), dim=1)  # zero rows stay zero
    total = torch.zeros((), dtype=torch.float64, device=unit.device)
    for start in range(0, num_users, chunk_size):
        v = unit[topk[start : start + chunk_size]]  # [u, K, d]
        pair_cos = v.sum(1).square().sum(1) - v.square().sum((1, 2))  # [u]
        total += (1.0 - pair_cos / (k * (k - 1))).sum(dtype=torch.float64)
    return float(total) / num_users


def personalization(topk: torch.Tensor, num_items: int) -> float:
    """1 - mean overlap |L_u ∩ L_v| / K over all pairs of distinct users u != v.

    0 when every user gets the same list, 1 when no two lists share an item. Exact for any U,
    with no sampling: with A the [U, I] user x item indicator matrix, the overlaps are the
    entries of A A^T, and their sum over u != v is sum_i c_i^2 - U K, where c_i is the number
    of lists holding item i (the column sums of A). Cost O(U K + I) time and O(I) memory.

    Args:
        topk: [U, K] item indices, U >= 2, no repeated item within a list.
        num_items: catalogue size I.
    """
    num_users, k = _check_topk(topk, num_items)
    if num_users < 2:
        raise ValueError(f"topk has {num_users} user; personalization compares pairs of users")
    ordered = topk.sort(1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("topk repeats an item within a list; each list must hold distinct items")
    c = torch.bincount(topk.flatten(), minlength=num_items)  # [I] int64, exact
    overlap = int((c * c).sum()) - num_users * k
    return 1.0 - overlap / (num_users * (num_users - 1) * k)


def latency_percentiles(
    fn: Callable[[Any], Any], inputs: Any, warmup: int = 10, repeats: int = 100
) -> dict[str, float]:
    """Times ``fn(inputs)`` with ``time.perf_counter``; returns ``{"p50_ms", "p99_ms"}``.

    Waits for queued CUDA work before each reading when CUDA is in use. Run it under
    ``torch.inference_mode()`` to time inference; wrap several arguments in a lambda.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup={warmup} must be >= 0 and repeats={repeats} >= 1")
    for _ in range(warmup):
        fn(inputs)
    cuda = torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(inputs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    q = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.99], dtype=torch.float64)
    )
    return {"p50_ms": float(q[0]) * 1e3, "p99_ms": float(q[1]) * 1e3}


def peak_memory_mb() -> float:
    """Peak memory in MiB: CUDA memory allocated by tensors once CUDA is in use (reset with
    ``torch.cuda.reset_peak_memory_stats()``), else the process's peak resident set size
    (``ru_maxrss``, cannot be reset)."""
    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
