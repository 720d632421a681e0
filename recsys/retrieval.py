"""Top-k without scoring every item: an approximate nearest-neighbour index (FAISS) over a
factorised model's item vectors, and two-stage ranking (a candidate model retrieves N items
per user, the ranker scores only those).

Every retriever answers ``top_k(users, k, exclude)`` as `recsys.scoring.CatalogueScorer` does
(the exhaustive one), and the scores it returns are the model's own logits (its forward over
the (user, candidate) pairs), so only *which* items come back may differ from exhaustive
scoring: `recall_at_k` measures how often.

Which models an index serves (`inner_product_part`): the logit, or one tower of it, must be
an inner product <user vector, item vector> plus terms that do not depend on the item.

- NeuMF ``gmf`` (h . (p_u * q_i) + b = <p_u, h * q_i> + b) and MF (p_u . q_i + b_i + b_u + b
  = <[p_u; 1], [q_i; b_i + b]> + b_u): the index ranks by the logit itself.
- NeuMF ``neumf`` and Hybrid without side features: the index ranks by the GMF tower
  (neumf) or the dot product (Hybrid) and retrieves ``num_candidates`` items, which the full
  model scores: a two-stage ranker inside one model.
- NeuMF ``mlp``, EASE and ItemKNN (a user's history row times an [I, I] matrix), DLRM and
  Hybrid with side features: no inner product; refused (`AnnUnsupported`). A ranker that does
  not factorise takes its candidates from another checkpoint (`TwoStageRetriever`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from recsys.data.negatives import PositiveSet
from recsys.data.store import FeatureStore
from recsys.errors import InputError, require_extra
from recsys.models.protocols import Factorised
from recsys.scoring import CatalogueScorer

log = logging.getLogger(__name__)

INDEXES = ("hnsw", "ivf_flat", "flat")
MAX_PAIRS = 1 << 18  # (user, candidate) pairs per forward: bounded memory for many users
MODES = ("exact", "ann")


class AnnUnsupported(InputError):
    """A model whose logit has no inner-product part for an index to search."""


@dataclass(frozen=True)
class AnnSettings:
    """The index over the item vectors (FAISS; `InnerProductIndex`).

    ``index``: ``hnsw`` (a graph: ``hnsw_m`` links per node, ``ef_construction`` and
    ``ef_search`` the candidate lists of building and searching, more is better recall and
    slower), ``ivf_flat`` (``nlist`` k-means cells, null: 4 sqrt(items); ``nprobe`` of them
    searched) or ``flat`` (exhaustive, for checks)."""

    index: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int | None = None
    nprobe: int = 16

    def __post_init__(self):
        if self.index not in INDEXES:
            raise InputError(f"ann.index={self.index!r} is not one of {INDEXES}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe"):
            if getattr(self, name) < 1:
                raise InputError(f"ann.{name}={getattr(self, name)} must be at least 1")
        if self.nlist is not None and self.nlist < 1:
            raise InputError(f"ann.nlist={self.nlist} must be at least 1, or null")

    @property
    def augmented(self) -> bool:
        """Whether the index searches L2 over norm-equalised vectors (``ivf_flat``) rather
        than the inner product (`InnerProductIndex`)."""
        return self.index == "ivf_flat"


@dataclass(frozen=True)
class RetrievalSettings:
    """How `recsys.recommender.Recommender` finds a user's top k.

    ``retrieval``: ``exact`` (every item scored) or ``ann`` (the index of ``ann``).
    ``candidates``: a checkpoint or training run folder of a factorised model of the same
    data, whose top ``num_candidates`` items per user the model then scores (two-stage).
    ``num_candidates``: the items per user that the index or the candidate model hands to
    the model's exact scoring (at least k: a request for more takes k)."""

    retrieval: str = "exact"
    ann: AnnSettings = field(default_factory=AnnSettings)
    candidates: str | None = None
    num_candidates: int = 100

    def __post_init__(self):
        if self.retrieval not in MODES:
            raise InputError(f"retrieval={self.retrieval!r} is not one of {MODES}")
        if self.num_candidates < 1:
            raise InputError(f"num_candidates={self.num_candidates} must be at least 1")

    @classmethod
    def from_config(cls, node: Mapping) -> RetrievalSettings:
        """From the ``retrieval``, ``ann``, ``candidates`` and ``num_candidates`` keys of a
        config node (``cfg.serve``, or ``cfg`` for predict.py); missing keys: the defaults."""
        ann = dict(node.get("ann") or {})
        unknown = sorted(set(ann) - {f.name for f in fields(AnnSettings)})
        if unknown:
            raise InputError(
                f"ann: unknown settings {unknown}; the index takes "
                f"{[f.name for f in fields(AnnSettings)]}"
            )
        return cls(
            retrieval=node.get("retrieval", "exact"),
            ann=AnnSettings(**ann),
            candidates=node.get("candidates"),
            num_candidates=node.get("num_candidates", 100),
        )

    def describe(self) -> dict:
        out = {"retrieval": self.retrieval, "candidates": self.candidates}
        if self.retrieval == "ann":
            out["ann"] = asdict(self.ann)
        if self.retrieval == "ann" or self.candidates:
            out["num_candidates"] = self.num_candidates
        return out


class Retriever(Protocol):
    """Anything with `CatalogueScorer.top_k`'s signature."""

    def top_k(
        self, users: torch.Tensor, k: int, exclude: PositiveSet | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class InnerProductPart:
    """A factorised model's logit (or one tower of it) as <user_vectors[u], item_vectors[i]>
    plus terms without the item. ``whole``: whether that is the whole logit (the index ranks
    by the logit itself) or one tower (the index proposes candidates)."""

    user_vectors: torch.Tensor  # [num_users, D]
    item_vectors: torch.Tensor  # [num_items, D]
    whole: bool
    name: str


@torch.inference_mode()
def inner_product_part(net: nn.Module, num_users: int) -> InnerProductPart:
    """The inner-product part of a factorised net's logit, read through its own catalogue
    scoring (``item_part`` and ``score_catalogue``): the logit is affine in the item vector
    of that part, so scoring each user against the unit vectors, minus against the zero
    vector, gives the user's vector.

    Raises:
        AnnUnsupported: the net has no such part (see the module notes).

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.models import NeuMF
            >>> net = NeuMF(FeatureSpec.of_ids(num_users=4, num_items=6), variant="gmf").eval()
            >>> part = inner_product_part(net, num_users=4)
            >>> part.whole, tuple(part.user_vectors.shape), tuple(part.item_vectors.shape)
            (True, (4, 32), (6, 32))
            >>> dots = part.user_vectors @ part.item_vectors.T  # the logits less the head's bias
            >>> logits = net.score_catalogue(torch.arange(4), net.item_part())
            >>> torch.allclose(dots + net.head.bias, logits, atol=1e-6)
            True
    """
    name = type(net).__name__
    variant = getattr(net, "variant", None)
    about = f"{name}" + (f" (variant {variant})" if variant else "")
    if not (isinstance(net, Factorised) and net.factorised):
        raise AnnUnsupported(
            f"{about} does not factor into user and item vectors (it reads side or dense "
            "features per pair), so there is no index to search: serve it with "
            "retrieval=exact, or two-stage with candidates=<checkpoint or run folder of a "
            "factorised model of the same data> (e.g. model=ncf model.variant=gmf)"
        )
    part = net.item_part()
    if "gmf" in part:  # NeuMF gmf / neumf: <p_u, h_gmf * q_i> [G, I]
        items = part["gmf"].T
        whole = set(part) == {"gmf"}

        def probe(v: torch.Tensor) -> dict:
            return {"gmf": v.T}

    elif "item_bias" in part:  # MF: <[p_u; 1], [q_i; b_i + b]> (the probe gives the 1)
        items = torch.cat([part["dot"], part["item_bias"][:, None]], dim=1)
        whole = True

        def probe(v: torch.Tensor) -> dict:
            return {"dot": v[:, :-1], "item_bias": v[:, -1]}

    elif "dot" in part and "mlp" in part:  # Hybrid: <u, i> + MLP([u; i])
        items, whole = part["dot"], False
        width = part["mlp"].shape[1]

        def probe(v: torch.Tensor) -> dict:
            return {"dot": v, "mlp": v.new_zeros(len(v), width), "mlp_rest": part["mlp_rest"]}

    else:
        raise AnnUnsupported(
            f"{about} has no inner-product part for an index to search (its catalogue "
            f"scoring takes {sorted(part)}): serve it with retrieval=exact; retrieval=ann "
            "serves MF, NeuMF gmf and neumf, and Hybrid without side features"
        )
    dim = items.shape[1]
    users = torch.arange(num_users)
    basis, zero = torch.eye(dim, dtype=items.dtype), items.new_zeros(1, dim)
    user_vectors = net.score_catalogue(users, probe(basis)) - net.score_catalogue(
        users, probe(zero)
    )
    label = "logit" if whole else ("GMF tower" if "gmf" in part else "dot product")
    return InnerProductPart(user_vectors.float(), items.float().contiguous(), whole, label)


def _faiss():
    require_extra("serve", "faiss")
    import faiss

    return faiss


def index_key(item_vectors: torch.Tensor, settings: AnnSettings) -> str:
    """What an index is built from: the item vectors' bytes, the index settings and the FAISS
    version (a saved index is reused only when all three are the same)."""
    faiss = _faiss()
    digest = hashlib.sha256(item_vectors.numpy().tobytes())
    build = {k: v for k, v in asdict(settings).items() if k not in ("ef_search", "nprobe")}
    space = "l2-augmented" if settings.augmented else "inner-product"
    layout = [build, list(item_vectors.shape), space, faiss.__version__]
    digest.update(json.dumps(layout).encode())
    return digest.hexdigest()[:16]


class InnerProductIndex:
    """A FAISS index over item vectors [I, D] whose `search` gives the items of largest inner
    product with a user vector.

    ``hnsw`` and ``flat`` search the inner product itself (``METRIC_INNER_PRODUCT``: graph
    links chosen by it). ``ivf_flat`` searches L2 over item vectors made one norm (Bachrach et
    al., RecSys 2014): each item vector gets one more coordinate, sqrt(M^2 - |x|^2) with M the
    largest norm, and a user vector a 0 there; then |q - x|^2 = |q|^2 + M^2 - 2 q.x orders
    items as -q.x does, and the k-means cells are not taken over by the longest vectors.

    With ``cache_dir`` set, the index is read from ``<cache_dir>/<stem>.<key>.faiss`` when
    that file exists (``key``: `index_key`, so an index of other vectors or settings is never
    reused) and written there otherwise."""

    def __init__(
        self,
        item_vectors: torch.Tensor,
        settings: AnnSettings,
        cache: Path | None = None,
    ):
        faiss = _faiss()
        self.settings = settings
        self.num_items, self.dim = item_vectors.shape
        self.key = index_key(item_vectors, settings)
        self.path = cache.with_name(f"{cache.name}.{self.key}.faiss") if cache else None
        self.loaded = self.path is not None and self.path.is_file()
        if self.loaded:
            self.index = faiss.read_index(str(self.path))
        else:
            self.index = self._build(self._items(item_vectors).numpy())
            if self.path is not None:
                self._save()
        if settings.index == "hnsw":
            self.index.hnsw.efSearch = settings.ef_search
        elif settings.index == "ivf_flat":
            self.index.nprobe = min(settings.nprobe, self.index.nlist)
        # searches use as many threads as torch (serve.torch_threads per worker)
        faiss.omp_set_num_threads(torch.get_num_threads())

    def _items(self, item_vectors: torch.Tensor) -> torch.Tensor:
        """The vectors the index holds: the item vectors, one norm when the settings say
        ``augmented``."""
        if not self.settings.augmented:
            return item_vectors.float().contiguous()
        x = item_vectors.double()
        norms = x.square().sum(1)
        extra = (norms.max() - norms).clamp_min(0).sqrt()
        return torch.cat([x, extra[:, None]], 1).float().contiguous()

    def _build(self, x: np.ndarray):
        faiss, s, d = _faiss(), self.settings, x.shape[1]
        if s.index == "flat":
            index = faiss.IndexFlatIP(d)
        elif s.index == "hnsw":
            index = faiss.IndexHNSWFlat(d, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = s.ef_construction
        else:
            nlist = s.nlist or max(1, int(4 * math.sqrt(len(x))))
            nlist = min(nlist, len(x))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            index.train(x)
        index.add(x)
        return index

    def _save(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            _faiss().write_index(self.index, str(tmp))
            tmp.replace(self.path)  # atomic: workers starting together never read half a file
        except (OSError, RuntimeError) as e:  # FAISS raises RuntimeError for its I/O
            log.warning("the ANN index is not saved (%s): it is built again at each start", e)
            tmp.unlink(missing_ok=True)

    def search(
        self,
        user_vectors: torch.Tensor,
        n: int,
        skip: list[np.ndarray] | None = None,
    ) -> torch.Tensor:
        """The n items [U, n] of largest inner product per user vector, best first; -1 where
        the index found fewer. ``skip``: per user, item codes the search passes over (FAISS
        filters them while it searches, so the list searched need not grow with them)."""
        faiss, n = _faiss(), min(n, self.num_items)
        queries = user_vectors.float()
        if self.settings.augmented:
            queries = torch.cat([queries, queries.new_zeros(len(queries), 1)], 1)
        queries = np.ascontiguousarray(queries.numpy())
        if skip is None:
            _, ids = self.index.search(queries, n, params=self._params(n))
            return torch.from_numpy(ids)
        out = np.empty((len(queries), n), dtype=np.int64)
        for row, (query, codes) in enumerate(zip(queries, skip, strict=True)):
            # the selectors live until the search is done (FAISS keeps raw pointers)
            batch = faiss.IDSelectorBatch(codes)
            selector = faiss.IDSelectorNot(batch)
            _, out[row : row + 1] = self.index.search(
                query[None], n, params=self._params(n, selector)
            )
        return torch.from_numpy(out)

    def _params(self, n: int, selector=None):
        """Search settings per call, not on the index: searches may run side by side."""
        faiss, s = _faiss(), self.settings
        if s.index == "hnsw":  # the list searched must hold the n asked for
            return faiss.SearchParametersHNSW(efSearch=max(s.ef_search, n), sel=selector)
        if s.index == "ivf_flat":
            return faiss.SearchParametersIVF(nprobe=self.index.nprobe, sel=selector)
        return faiss.SearchParameters(sel=selector) if selector is not None else None


@torch.inference_mode()
def pair_scores(
    net: nn.Module, features: FeatureStore, users: torch.Tensor, items: torch.Tensor
) -> torch.Tensor:
    """Logits [U, N] of each user [U] with each of its items [U, N] (codes; -1: none, scored
    -inf), through the net's forward on the pairs."""
    valid = items >= 0
    flat_users = users.repeat_interleave(items.shape[1]).split(MAX_PAIRS)
    flat_items = items.clamp_min(0).reshape(-1).split(MAX_PAIRS)
    chunks = [net(features.make_batch(u, i)) for u, i in zip(flat_users, flat_items, strict=True)]
    logits = torch.cat(chunks) if chunks else torch.empty(0)
    return logits.view(items.shape).masked_fill(~valid, float("-inf"))


def unseen(
    users: torch.Tensor, items: torch.Tensor, n: int, exclude: PositiveSet | None
) -> torch.Tensor:
    """The first n items [U, n] of each row of ``items`` [U, M] that are not in ``exclude``
    (nor -1), order kept; -1 where a row has fewer."""
    keep = items >= 0
    if exclude is not None:
        flat_users = users.repeat_interleave(items.shape[1])
        seen = exclude.contains(flat_users, items.clamp_min(0).reshape(-1)).view(items.shape)
        keep &= ~seen
    # stable: kept items first, in their order
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]
    out = items.gather(1, order)
    return out.masked_fill(~keep.gather(1, order), -1)


def rerank(
    net: nn.Module, features: FeatureStore, users: torch.Tensor, candidates: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best [U, k] of each user's candidates [U, N] by the net's logits, and those."""
    scores = pair_scores(net, features, users, candidates)
    best, pos = scores.topk(min(k, scores.shape[1]), dim=1)
    return candidates.gather(1, pos), best


class AnnRetriever:
    """Top-k of a factorised model from an index over its item vectors: the index retrieves
    ``num_candidates`` unseen items per user (passing over the user's items as it searches),
    the model's forward scores them, the best k are returned. A user for whom the index
    finds fewer than k unseen items is scored exhaustively (``exact``)."""

    def __init__(
        self,
        exact: CatalogueScorer,
        features: FeatureStore,
        settings: RetrievalSettings,
        cache: Path | None = None,
    ):
        self.exact, self.features, self.settings = exact, features, settings
        self.net, self.num_items = exact.net, exact.num_items
        part = inner_product_part(exact.net, features.spec.num_users)
        # the item vectors live in the index only (a catalogue of 1M items: 130 MB a copy)
        self.user_vectors, self.whole, self.tower = part.user_vectors, part.whole, part.name
        self.index = InnerProductIndex(part.item_vectors, settings.ann, cache)

    def candidates(
        self, users: torch.Tensor, n: int, exclude: PositiveSet | None = None
    ) -> torch.Tensor:
        """n item codes [U, n] per user from the index, none in ``exclude``; -1 where it found
        fewer."""
        vectors = self.user_vectors[users]
        if exclude is None:
            return self.index.search(vectors, n)
        lengths, items = exclude.items_of(users)
        skip = [c.numpy() for c in items.split(lengths.tolist())]
        return self.index.search(vectors, n, skip)

    @torch.inference_mode()
    def top_k(
        self, users: torch.Tensor, k: int, exclude: PositiveSet | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `CatalogueScorer.top_k`, from the index's candidates."""
        if not 1 <= k <= self.num_items:
            raise ValueError(f"k={k} must be between 1 and the {self.num_items} items")
        cands = self.candidates(users, max(k, self.settings.num_candidates), exclude)
        top, best = rerank(self.net, self.features, users, cands, k)
        short = torch.isinf(best).any(dim=1) if len(users) else torch.zeros(0, dtype=torch.bool)
        if short.any():  # too few unseen items among the candidates: score every item
            top[short], best[short] = self.exact.top_k(users[short], k, exclude)
        return top, best


class TwoStageRetriever:
    """Top-k of a ranker over the candidates of another model of the same data: the
    ``candidates`` retriever's top ``num_candidates`` unseen items per user, scored by the
    ranker's forward (``net``, ``features``)."""

    def __init__(
        self, candidates: Retriever, net: nn.Module, features: FeatureStore, num_candidates: int
    ):
        self.candidates, self.net, self.features = candidates, net.eval(), features
        self.num_candidates = num_candidates
        self.num_items = features.spec.num_items

    @torch.inference_mode()
    def top_k(
        self, users: torch.Tensor, k: int, exclude: PositiveSet | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `CatalogueScorer.top_k`, over the candidate model's items.

        Raises:
            ValueError: k is not in 1..num_items, or a user has fewer than k items left.
        """
        if not 1 <= k <= self.num_items:
            raise ValueError(f"k={k} must be between 1 and the {self.num_items} items")
        n = min(max(k, self.num_candidates), self.num_items)
        cands = candidates_of(self.candidates, users, n, exclude, self.num_items)
        top, best = rerank(self.net, self.features, users, cands, k)
        short = torch.isinf(best).any(dim=1) if len(users) else torch.zeros(0, dtype=torch.bool)
        if short.any() and isinstance(self.candidates, AnnRetriever):
            # the index found fewer than k unseen items: the candidate model's exact top n
            exact = candidates_of(self.candidates.exact, users[short], n, exclude, self.num_items)
            top[short], best[short] = rerank(self.net, self.features, users[short], exact, k)
        if len(users) and torch.isinf(best).any():
            user = int(users[torch.isinf(best).any(dim=1).nonzero()[0, 0]])
            raise ValueError(f"user code {user} has fewer than k={k} items left to recommend")
        return top, best


def candidates_of(
    retriever: Retriever,
    users: torch.Tensor,
    n: int,
    exclude: PositiveSet | None,
    num_items: int,
) -> torch.Tensor:
    """A retriever's n best items [U, n] per user, none in ``exclude``; -1 where a user has
    fewer left. An index whose inner product is the whole logit hands its own order; any
    other retriever is asked for n plus the most items a user has in ``exclude``."""
    if isinstance(retriever, AnnRetriever) and retriever.whole:
        return retriever.candidates(users, n, exclude)
    extra = int(exclude.positives_of(users).max()) if exclude is not None and len(users) else 0
    top, _ = retriever.top_k(users, min(n + extra, num_items), None)
    return unseen(users, top, n, exclude)


def recall_at_k(found: torch.Tensor, exhaustive: torch.Tensor) -> float:
    """Mean over users of the share of the exhaustive top-k [U, k] that ``found`` [U, k]
    returns too (recall@k of a retriever against scoring every item); order does not count.

    Example::

            >>> import torch
            >>> recall_at_k(torch.tensor([[3, 1], [5, 9]]), torch.tensor([[1, 3], [5, 6]]))
            0.75
    """
    if found.shape != exhaustive.shape:
        raise ValueError(f"top-k shapes differ: {tuple(found.shape)} and {tuple(exhaustive.shape)}")
    if not len(found):
        return float("nan")
    hits = (found[:, :, None] == exhaustive[:, None, :]).any(dim=2).sum(dim=1)
    return float((hits.double() / exhaustive.shape[1]).mean())


def retrieval_recall(
    retriever: Retriever,
    exhaustive: Retriever,
    users: torch.Tensor,
    k: int,
    exclude: PositiveSet | None = None,
) -> float:
    """`recall_at_k` of ``retriever``'s top-k against ``exhaustive``'s for ``users``."""
    found, _ = retriever.top_k(users, k, exclude)
    truth, _ = exhaustive.top_k(users, k, exclude)
    return recall_at_k(found, truth)
