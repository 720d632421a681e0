"""Ranking and beyond-accuracy metrics against hand-computed toy values."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MetricCollection
from torchmetrics.functional.retrieval import (
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

from recsys.metrics import (
    RankingMetrics,
    catalogue_coverage,
    intra_list_diversity,
    latency_percentiles,
    novelty,
    peak_memory_mb,
    personalization,
)
from recsys.metrics.ranking import per_user
from recsys.train import build


def _values(metric: RankingMetrics) -> dict[str, float]:
    return {k: v.item() for k, v in metric.compute().items()}


def _assert_values(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


@pytest.fixture
def leave_one_out() -> tuple[torch.Tensor, torch.Tensor]:
    """3 users x 5 candidates, one positive each, at rank 1, 3 and 5.

    User 1 has logits, some negative: order 1.5 (col 1), 0.7 (col 3), -0.5 (col 2, positive).
    """
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5],  # positive col 0 -> rank 1
            [-2.0, 1.5, -0.5, 0.7, -1.0],  # positive col 2 -> rank 3
            [0.5, 0.4, 0.3, 0.2, 0.1],  # positive col 4 -> rank 5
        ]
    )
    relevant = torch.zeros(3, 5, dtype=torch.bool)
    relevant[0, 0] = relevant[1, 2] = relevant[2, 4] = True
    return scores, relevant


def test_leave_one_out_hand_computed(leave_one_out):
    metric = RankingMetrics(ks=(1, 3, 5))
    metric.update(*leave_one_out)
    # ranks 1, 3, 5:
    # hr@1 = (1 + 0 + 0) / 3, hr@3 = (1 + 1 + 0) / 3, hr@5 = (1 + 1 + 1) / 3
    # ndcg@K = mean of 1[rank <= K] / log2(rank + 1):
    #   ndcg@1 = (1/log2(2)) / 3 = 1/3
    #   ndcg@3 = (1/log2(2) + 1/log2(4)) / 3 = (1 + 0.5) / 3 = 0.5
    #   ndcg@5 = (1 + 0.5 + 1/log2(6)) / 3 = (1.5 + 0.386853) / 3 = 0.628951
    # mrr = (1/1 + 1/3 + 1/5) / 3 = 23/45
    # recall@K = hr@K with a single positive
    hr = {1: 1 / 3, 3: 2 / 3, 5: 1.0}
    expected = {f"hr@{k}": v for k, v in hr.items()}
    expected |= {"ndcg@1": 1 / 3, "ndcg@3": 0.5, "ndcg@5": (1.5 + 1 / math.log2(6)) / 3}
    expected |= {f"recall@{k}": v for k, v in hr.items()}
    expected["mrr"] = 23 / 45
    _assert_values(_values(metric), expected)
    assert expected["ndcg@5"] == pytest.approx(0.628951, abs=1e-6)


def test_cutoffs_are_sorted_and_named(leave_one_out):
    metric = RankingMetrics(ks=[5, 1])
    metric.update(*leave_one_out)
    names = list(metric.compute())
    assert names == ["hr@1", "hr@5", "ndcg@1", "ndcg@5", "recall@1", "recall@5", "mrr"]


def test_batches_accumulate(leave_one_out):
    scores, relevant = leave_one_out
    whole, split = RankingMetrics(ks=(1, 3)), RankingMetrics(ks=(1, 3))
    whole.update(scores, relevant)
    split.update(scores[:1], relevant[:1])
    split.update(scores[1:], relevant[1:])
    _assert_values(_values(split), _values(whole))


def test_full_ranking_several_relevant():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # ranks = column + 1
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # ranks = 6 - column
            [0.3, 0.1, 0.2, 0.6, 0.5, 0.4],  # no relevant item: skipped
        ]
    )
    relevant = torch.tensor(
        [
            [1, 0, 1, 0, 0, 1],  # A: R = 3, at ranks 1, 3, 6
            [1, 1, 0, 0, 0, 0],  # B: R = 2, at ranks 6, 5
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    metric = RankingMetrics(ks=(1, 3, 5))
    metric.update(scores, relevant)
    # A: hits@1,3,5 = 1, 2, 2 -> hr 1, 1, 1; recall 1/3, 2/3, 2/3
    #    dcg@1 = 1, dcg@3 = dcg@5 = 1 + 1/log2(4) = 1.5
    #    idcg@1 = 1, idcg@3 = idcg@5 = 1 + 1/log2(3) + 1/log2(4) (min(R, K) = 3 terms)
    #    rr = 1/1
    # B: hits@1,3,5 = 0, 0, 1 -> hr 0, 0, 1; recall 0, 0, 1/2
    #    dcg@5 = 1/log2(5 + 1), idcg@5 = 1 + 1/log2(3); rr = 1/5
    idcg3_a = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    ndcg5_b = (1 / math.log2(6)) / (1 + 1 / math.log2(3))
    expected = {"hr@1": 1 / 2, "hr@3": 1 / 2, "hr@5": 2 / 2}
    expected |= {
        "ndcg@1": (1 + 0) / 2,
        "ndcg@3": (1.5 / idcg3_a + 0) / 2,  # (0.703918 + 0) / 2
        "ndcg@5": (1.5 / idcg3_a + ndcg5_b) / 2,  # (0.703918 + 0.237197) / 2
    }
    expected |= {"recall@1": (1 / 3) / 2, "recall@3": (2 / 3) / 2, "recall@5": (2 / 3 + 1 / 2) / 2}
    expected["mrr"] = (1 + 1 / 5) / 2
    _assert_values(_values(metric), expected)
    assert expected["ndcg@5"] == pytest.approx(0.470558, abs=1e-6)


def test_ties_are_pessimistic():
    scores = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5, 0.5],  # constant model: positive ranks last, 5
            [0.9, 0.9, 0.1, 0.2, 0.3],  # positive tied with one negative at the top: rank 2
        ]
    )
    relevant = torch.zeros(2, 5, dtype=torch.bool)
    relevant[0, 0] = relevant[1, 0] = True
    metric = RankingMetrics(ks=(1, 2))
    metric.update(scores, relevant)
    # ranks 5, 2: hr@1 = 0, hr@2 = (0 + 1) / 2; ndcg@2 = (0 + 1/log2(3)) / 2; mrr = (1/5 + 1/2) / 2
    expected = {"hr@1": 0.0, "hr@2": 0.5, "ndcg@1": 0.0, "ndcg@2": 0.5 / math.log2(3)}
    expected |= {"recall@1": 0.0, "recall@2": 0.5, "mrr": (1 / 5 + 1 / 2) / 2}
    _assert_values(_values(metric), expected)


def test_result_does_not_depend_on_candidate_order():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (64, 30), generator=gen).float()  # many ties
    relevant = torch.rand(64, 30, generator=gen) < 0.2
    perm = torch.randperm(30, generator=gen)
    a, b = RankingMetrics(ks=(1, 5, 10)), RankingMetrics(ks=(1, 5, 10))
    a.update(scores, relevant)
    b.update(scores[:, perm], relevant[:, perm])
    _assert_values(_values(b), _values(a))


def test_agrees_with_torchmetrics_functional():
    """Same definitions as torchmetrics.functional.retrieval on positive, distinct scores."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(40, 25, generator=gen) + 0.01
    relevant = torch.rand(40, 25, generator=gen) < 0.15
    relevant[:, 0] = True  # every user has a positive
    ks = (1, 5, 10)
    metric = RankingMetrics(ks=ks)
    metric.update(scores, relevant)
    got = _values(metric)

    def mean(fn, **kw):
        per_user = [fn(s, r, **kw) for s, r in zip(scores, relevant, strict=True)]
        return torch.stack(per_user).mean().item()

    for k in ks:
        assert got[f"hr@{k}"] == pytest.approx(mean(retrieval_hit_rate, top_k=k), abs=1e-6)
        assert got[f"ndcg@{k}"] == pytest.approx(mean(retrieval_normalized_dcg, top_k=k), abs=1e-5)
        assert got[f"recall@{k}"] == pytest.approx(mean(retrieval_recall, top_k=k), abs=1e-6)
    assert got["mrr"] == pytest.approx(mean(retrieval_reciprocal_rank), abs=1e-6)


def test_collection_prefix_and_merged_states(leave_one_out):
    scores, relevant = leave_one_out
    coll = MetricCollection({"rank": RankingMetrics(ks=(3,))}, prefix="test/")
    coll.update(scores, relevant)
    assert set(coll.compute()) == {"test/hr@3", "test/ndcg@3", "test/recall@3", "test/mrr"}
    # what DDP sync does: sum the states of the ranks
    rank0, rank1, whole = (RankingMetrics(ks=(1, 3)) for _ in range(3))
    rank0.update(scores[:2], relevant[:2])
    rank1.update(scores[2:], relevant[2:])
    whole.update(scores, relevant)
    rank0.merge_state(rank1)
    _assert_values(_values(rank0), _values(whole))


def test_empty_metric_is_zero():
    metric = RankingMetrics(ks=(1,))
    metric.update(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert set(_values(metric).values()) == {0.0}


def _ddp_worker(rank: int, port: int, scores, relevant, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metric = RankingMetrics(ks=(1, 3, 5))
    metric.update(scores[rank::2], relevant[rank::2])
    queue.put((rank, {k: v.item() for k, v in metric.compute().items()}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_matches_single_process(leave_one_out):
    scores, relevant = leave_one_out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_ddp_worker, args=(port, scores, relevant, queue), nprocs=2)
    results = dict(queue.get() for _ in range(2))
    single = RankingMetrics(ks=(1, 3, 5))
    single.update(scores, relevant)
    for rank in (0, 1):
        _assert_values(results[rank], _values(single))


@pytest.mark.parametrize(
    ("scores", "relevant", "ks", "match"),
    [
        (torch.rand(3, 5), torch.zeros(3, 4, dtype=torch.bool), (1,), "must both be"),
        (torch.rand(5), torch.zeros(5, dtype=torch.bool), (1,), "must both be"),
        (torch.rand(3, 5), torch.zeros(3, 5, dtype=torch.long), (1,), "bool mask"),
        (torch.randint(0, 5, (3, 5)), torch.zeros(3, 5, dtype=torch.bool), (1,), "float"),
        (torch.rand(3, 5), torch.zeros(3, 5, dtype=torch.bool), (10,), "K=10 exceeds the 5"),
        (torch.full((1, 5), float("nan")), torch.ones(1, 5, dtype=torch.bool), (1,), "NaN"),
    ],
)
def test_bad_ranking_inputs(scores, relevant, ks, match):
    metric = RankingMetrics(ks=ks)
    with pytest.raises(ValueError, match=match):
        metric.update(scores, relevant)
        metric.compute()  # NaN scores are counted on the device, refused here


@pytest.mark.parametrize("ks", [(), (0,), (5, 5), (2.0,)])
def test_bad_cutoffs(ks):
    with pytest.raises(ValueError, match="ks="):
        RankingMetrics(ks=ks)


def test_catalogue_coverage():
    topk = torch.tensor([[0, 1], [1, 2]])
    assert catalogue_coverage(topk, num_items=10) == pytest.approx(3 / 10)  # items {0, 1, 2}
    assert catalogue_coverage(torch.arange(10).view(5, 2), num_items=10) == 1.0


def test_novelty():
    popularity = torch.tensor([4, 2, 1, 1, 0])  # N = 8 interactions
    # p = 4/8, 2/8, 1/8, 1/8, and item 4 (unseen) floored to 1/8 -> -log2 p = 1, 2, 3, 3, 3
    topk = torch.tensor([[0, 1], [2, 4]])
    assert novelty(topk, popularity) == pytest.approx((1 + 2 + 3 + 3) / 4)


ITEM_GENRES = torch.tensor(
    [
        [1, 0, 0],  # item 0
        [1, 0, 0],  # item 1: same genres as item 0
        [0, 1, 0],  # item 2: orthogonal to item 0
        [1, 1, 0],  # item 3: cos 1/sqrt(2) with items 0, 1, 2
        [0, 0, 0],  # item 4: no genre
    ]
).float()


def test_intra_list_diversity_hand_computed():
    assert intra_list_diversity(torch.tensor([[0, 1]]), ITEM_GENRES) == pytest.approx(0.0, abs=1e-6)
    # lists [0, 1] -> 1 - 1 = 0 and [0, 2] -> 1 - 0 = 1: mean (0 + 1) / 2
    assert intra_list_diversity(torch.tensor([[0, 1], [0, 2]]), ITEM_GENRES) == pytest.approx(0.5)
    # [0, 2, 3]: pairs (0,2) 1 - 0, (0,3) and (2,3) 1 - 1/sqrt(2) -> mean of the 3 pairs
    expected = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert intra_list_diversity(torch.tensor([[0, 2, 3]]), ITEM_GENRES) == pytest.approx(expected)
    # an item without genres is at distance 1 from everything
    assert intra_list_diversity(torch.tensor([[0, 4]]), ITEM_GENRES) == pytest.approx(1.0)


def test_intra_list_diversity_matches_pairwise_matmul():
    gen = torch.Generator().manual_seed(2)
    vectors = torch.randn(50, 8, generator=gen)
    topk = torch.stack([torch.randperm(50, generator=gen)[:6] for _ in range(11)])
    unit = torch.nn.functional.normalize(vectors, dim=1)[topk]  # [U, K, d]
    sim = unit @ unit.transpose(1, 2)  # [U, K, K]
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    expected = (1 - sim[:, off_diagonal]).mean().item()
    got = intra_list_diversity(topk, vectors, chunk_size=4)  # 3 chunks, last one partial
    assert got == pytest.approx(expected, abs=1e-5)


def test_personalization_hand_computed():
    same = torch.tensor([[0, 1, 2], [2, 0, 1]])
    assert personalization(same, num_items=6) == pytest.approx(0.0)
    disjoint = torch.tensor([[0, 1], [2, 3], [4, 5]])
    assert personalization(disjoint, num_items=6) == pytest.approx(1.0)
    # pairs (0,1) share item 1 -> 1/2, (0,2) and (1,2) share nothing -> 1 - (1/2 + 0 + 0) / 3
    partial = torch.tensor([[0, 1], [1, 2], [3, 4]])
    assert personalization(partial, num_items=6) == pytest.approx(5 / 6)


def test_personalization_matches_indicator_product():
    gen = torch.Generator().manual_seed(3)
    topk = torch.stack([torch.randperm(30, generator=gen)[:5] for _ in range(17)])
    indicator = torch.zeros(17, 30).scatter_(1, topk, 1.0)  # [U, I]
    overlap = indicator @ indicator.T / 5  # [U, U]
    pairs = ~torch.eye(17, dtype=torch.bool)
    expected = 1 - overlap[pairs].mean().item()
    assert personalization(topk, num_items=30) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: catalogue_coverage(torch.tensor([[0, 10]]), 10), r"outside \[0, num_items=10\)"),
        (lambda: catalogue_coverage(torch.tensor([[-1, 0]]), 10), "outside"),
        (lambda: catalogue_coverage(torch.tensor([0, 1]), 10), r"\[U, K\]"),
        (lambda: catalogue_coverage(torch.tensor([[0.0, 1.0]]), 10), "integer item indices"),
        (lambda: novelty(torch.tensor([[0, 1]]), torch.zeros(3)), "positive total"),
        (lambda: novelty(torch.tensor([[0, 3]]), torch.ones(3)), "outside"),
        (lambda: intra_list_diversity(torch.tensor([[0], [1]]), ITEM_GENRES), "at least 2"),
        (lambda: intra_list_diversity(torch.tensor([[0, 1]]), torch.ones(5, 3).long()), "float"),
        (lambda: personalization(torch.tensor([[0, 1]]), 5), "pairs of users"),
        (lambda: personalization(torch.tensor([[0, 0], [1, 2]]), 5), "repeats an item"),
    ],
)
def test_bad_list_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_latency_percentiles_and_peak_memory():
    calls = []
    stats = latency_percentiles(calls.append, inputs=1, warmup=2, repeats=5)
    assert len(calls) == 7
    assert set(stats) == {"p50_ms", "p99_ms"}
    assert 0 <= stats["p50_ms"] <= stats["p99_ms"]
    assert peak_memory_mb() > 0
    with pytest.raises(ValueError, match="repeats=0"):
        latency_percentiles(calls.append, inputs=1, repeats=0)


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_real_top_k_lists_against_trec_eval(mode, make_cfg):
    """Each user's HR@K, NDCG@K, Recall@K and reciprocal rank of EASE's test rankings on
    ml-100k equal trec_eval's (pytrec_eval: success_K, ndcg_cut_K, recall_K, recip_rank),
    user by user. Users whose relevant items tie with another candidate are left out: there
    trec_eval breaks ties by document name, this platform pessimistically."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    split = "leave_one_out" if mode == "sampled" else "random"
    dm, module, _ = build(
        make_cfg(
            "model=ease",
            "data.feedback=implicit",
            f"data.split.kind={split}",
            f"data.ranking={mode}",
        )
    )
    qrels, run, ours = {}, {}, {}
    for batch in dm.protocol.ranking_loader("test"):
        scores = module.rank(batch)
        figures = per_user(scores, batch.relevant, (5, 10, 20))
        for q in range(len(batch)):
            valid = batch.valid[q]
            s, items, rel = scores[q][valid], batch.items[q][valid], batch.relevant[q][valid]
            if rel.sum() == 0 or len(set(s[rel].tolist()) & set(s[~rel].tolist())):
                continue
            name = f"q{len(qrels)}"
            qrels[name] = {str(int(i)): 1 for i in items[rel]}
            run[name] = {str(int(i)): float(v) for i, v in zip(items, s, strict=True)}
            ours[name] = {k: float(v[q]) for k, v in figures.items() if k != "evaluated"}
    assert len(qrels) > 300
    measures = {"success_5,10,20", "ndcg_cut_5,10,20", "recall_5,10,20", "recip_rank"}
    trec = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    names = {"hr": "success", "ndcg": "ndcg_cut", "recall": "recall"}
    for query, figures in ours.items():
        for k in (5, 10, 20):
            for ours_name, trec_name in names.items():
                assert figures[f"{ours_name}@{k}"] == pytest.approx(
                    trec[query][f"{trec_name}_{k}"], abs=1e-6
                ), (query, ours_name, k)
        assert figures["mrr"] == pytest.approx(trec[query]["recip_rank"], abs=1e-6)
