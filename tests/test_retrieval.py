"""Retrieval without scoring every item (`recsys.retrieval`): a FAISS index over factorised
models' item vectors and two-stage ranking, checked against exhaustive scoring on ml-100k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from recsys.data import FeatureSpec
from recsys.errors import InputError, MissingInputError
from recsys.models import NeuMF
from recsys.models.hybrid import Hybrid
from recsys.models.neighbors import EASE
from recsys.predict import run as predict
from recsys.recommender import Recommender
from recsys.retrieval import (
    AnnRetriever,
    AnnUnsupported,
    inner_product_part,
    pair_scores,
    recall_at_k,
    retrieval_recall,
)
from recsys.serve import create_app
from recsys.train import run as train
from tests.conftest import compose_cfg, compose_train

# generous index settings: recall close to 1 on ml-100k's 1,682 items
GENEROUS = {
    "hnsw": ["serve.ann.index=hnsw", "serve.ann.ef_search=256"],
    "ivf_flat": ["serve.ann.index=ivf_flat", "serve.ann.nlist=32", "serve.ann.nprobe=16"],
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, data_dir, cache_dir) -> dict[str, str]:
    """Short runs on ml-100k: GMF, MF, NeuMF and DLRM (the two-stage ranker)."""
    runs = {
        "gmf": ["model.variant=gmf"],
        "mf": ["model=mf"],
        "neumf": [],
        "dlrm": ["model=dlrm"],
    }
    out = {}
    for name, overrides in runs.items():
        folder = tmp_path_factory.mktemp(name)
        cfg = compose_train(
            data_dir,
            cache_dir,
            folder,
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=30",
            *overrides,
        )
        out[name] = train(cfg)["best_model_path"]
    return out


@pytest.fixture
def load(ckpts, data_dir, cache_dir, tmp_path):
    def _load(name: str, *overrides: str) -> Recommender:
        cfg = compose_cfg(
            "serve", data_dir, cache_dir, tmp_path, f"ckpt_path={ckpts[name]}", *overrides
        )
        return Recommender.from_config(cfg)

    return _load


USERS = torch.arange(0, 943, 5)
FEW = USERS[::10]  # where every item is a candidate


def test_recall_at_k_counts_the_exhaustive_items_found():
    exhaustive = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = torch.tensor([[4, 3, 2, 1], [5, 6, 0, 9]])  # order does not count
    assert recall_at_k(found, exhaustive) == pytest.approx((1.0 + 0.5) / 2)
    assert recall_at_k(exhaustive, exhaustive) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        recall_at_k(found[:, :2], exhaustive)


def test_exact_retrieval_has_recall_one(load):
    rec = load("gmf")
    assert rec.retriever is rec.scorer
    assert retrieval_recall(rec.retriever, rec.scorer, USERS, 10, rec.seen) == 1.0


@pytest.mark.parametrize("name", ["gmf", "mf"])
@pytest.mark.parametrize("index", ["hnsw", "ivf_flat"])
def test_ann_top_k_is_the_exhaustive_top_k(load, name, index):
    exact, ann = load(name), load(name, "serve.retrieval=ann", *GENEROUS[index])
    assert ann.retriever.whole  # the index ranks by the logit itself
    # the serving limits' count: the candidates through the forward, no catalogue product
    assert (ann.catalogue_items, ann.forward_items) == (0, 100)
    assert retrieval_recall(ann.retriever, exact.scorer, USERS, 10, exact.seen) >= 0.95
    top, logits = ann.recommend(USERS.numpy(), 10)
    # the scores are the model's forward on the returned pairs, best first
    forward = pair_scores(exact.model.net, exact.dm.data.features, USERS, torch.as_tensor(top))
    np.testing.assert_allclose(logits, forward.numpy(), atol=1e-5)
    assert (np.diff(logits, axis=1) <= 0).all()
    # never a seen item; every item when asked
    seen = exact.seen.contains(USERS.repeat_interleave(10), torch.as_tensor(top).reshape(-1))
    assert not seen.any()
    top, _ = ann.recommend(USERS.numpy(), 10, exclude_seen=False)
    everything, _ = exact.recommend(USERS.numpy(), 10, exclude_seen=False)
    assert recall_at_k(torch.as_tensor(top), torch.as_tensor(everything)) >= 0.95


def test_the_index_is_saved_beside_the_checkpoint_and_reused(load, ckpts):
    first = load("gmf", "serve.retrieval=ann", "serve.ann.hnsw_m=12")
    path = first.retriever.index.path
    assert path.parent == first.ckpt_path.parent and path.is_file()
    assert path.name.startswith(first.ckpt_path.name) and not first.retriever.index.loaded
    again = load("gmf", "serve.retrieval=ann", "serve.ann.hnsw_m=12")
    assert again.retriever.index.loaded and again.retriever.index.path == path
    np.testing.assert_array_equal(
        again.recommend(USERS.numpy(), 5)[0], first.recommend(USERS.numpy(), 5)[0]
    )
    other_search = load(
        "gmf", "serve.retrieval=ann", "serve.ann.hnsw_m=12", "serve.ann.ef_search=64"
    )
    assert other_search.retriever.index.loaded  # search settings are not part of the key
    assert other_search.retriever.index.index.hnsw.efSearch == 64
    other = load("gmf", "serve.retrieval=ann", "serve.ann.hnsw_m=8")  # another build: its own
    assert other.retriever.index.path != path and not other.retriever.index.loaded
    neumf = load("neumf", "serve.retrieval=ann", "serve.ann.hnsw_m=12")  # other vectors
    assert neumf.retriever.index.key != first.retriever.index.key


def test_neumf_takes_candidates_from_its_gmf_tower(load):
    exact = load("neumf")
    every = load("neumf", "serve.retrieval=ann", f"serve.num_candidates={exact.num_items}")
    assert not every.retriever.whole and every.retriever.tower == "GMF tower"
    # every item a candidate: the full model's top-k exactly
    assert retrieval_recall(every.retriever, exact.scorer, FEW, 10, exact.seen) == 1.0
    few = load("neumf", "serve.retrieval=ann", "serve.num_candidates=50")
    top, logits = few.recommend(USERS.numpy(), 10)
    forward = pair_scores(exact.model.net, exact.dm.data.features, USERS, torch.as_tensor(top))
    np.testing.assert_allclose(logits, forward.numpy(), atol=1e-5)


def test_models_without_an_inner_product_are_refused(load):
    spec = FeatureSpec.of_ids(num_users=5, num_items=7)
    with pytest.raises(AnnUnsupported, match="no inner-product part.*retrieval=exact"):
        inner_product_part(NeuMF(spec, variant="mlp", mlp_dim=4, mlp_layers=[4]), 5)
    ease = EASE(spec).fit(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    with pytest.raises(AnnUnsupported, match="no inner-product part"):
        inner_product_part(ease, 5)
    with pytest.raises(AnnUnsupported, match="DLRM does not factor.*candidates="):
        load("dlrm", "serve.retrieval=ann")


def test_user_vectors_give_the_logits(load):
    """<user vector, item vector> is the logit up to a term without the item."""
    for name in ("gmf", "mf"):
        rec = load(name)
        part = inner_product_part(rec.model.net, rec.num_users)
        dots = part.user_vectors[USERS] @ part.item_vectors.T
        logits = rec.scorer.scores(USERS)
        offset = logits - dots
        torch.testing.assert_close(offset, offset[:, :1].expand_as(offset), atol=1e-5, rtol=0)


def test_two_stage_ranks_the_candidate_models_items(load, ckpts):
    ranker = load("dlrm")
    gmf = load("gmf")
    two = load("dlrm", f"serve.candidates={ckpts['gmf']}", "serve.num_candidates=40")
    top, logits = two.recommend(USERS.numpy(), 10)
    # independent: the GMF's own top 40 unseen, scored by DLRM's forward one pair a row
    cands, _ = gmf.recommend(USERS.numpy(), 40)
    scores = pair_scores(ranker.model.net, ranker.dm.data.features, USERS, torch.as_tensor(cands))
    best, pos = scores.topk(10, dim=1)
    np.testing.assert_array_equal(top, np.take_along_axis(cands, pos.numpy(), axis=1))
    np.testing.assert_allclose(logits, best.numpy(), atol=1e-5)
    assert two.metadata()["retrieval"]["candidates"] == ckpts["gmf"]
    # every item a candidate: the ranker's exhaustive top-k; and the run folder is taken
    run_dir = Path(ckpts["gmf"]).parents[1]
    every = load("dlrm", f"serve.candidates={run_dir}", f"serve.num_candidates={two.num_items}")
    assert retrieval_recall(every.retriever, ranker.scorer, FEW, 10, ranker.seen) == 1.0
    # candidates from the index of the candidate model
    ann = load("dlrm", f"serve.candidates={ckpts['gmf']}", "serve.retrieval=ann")
    assert ann.candidate_model.retriever.whole


def test_candidates_of_other_data_or_not_factorised_are_refused(
    load, ckpts, data_dir, cache_dir, tmp_path_factory
):
    folder = tmp_path_factory.mktemp("synthetic")
    cfg = compose_train(
        data_dir,
        cache_dir,
        folder,
        "data=synthetic",
        "data.num_users=200",
        "data.num_items=100",
        "data.num_rows=2000",
        "model.variant=gmf",
        "trainer.max_epochs=1",
    )
    other = train(cfg)["best_model_path"]
    with pytest.raises(InputError, match="trained on other data"):
        load("dlrm", f"serve.candidates={other}")
    with pytest.raises(InputError, match="use a factorised model"):
        load("gmf", f"serve.candidates={ckpts['dlrm']}")
    with pytest.raises(MissingInputError, match="does not exist"):
        load("dlrm", f"serve.candidates={folder}/nothing.ckpt")


def _spy_on_the_index(monkeypatch) -> list:
    """The users of every `AnnRetriever.top_k` call from now on."""
    calls, top_k = [], AnnRetriever.top_k

    def spied(self, users, *args, **kwargs):
        calls.append(users.tolist())
        return top_k(self, users, *args, **kwargs)

    monkeypatch.setattr(AnnRetriever, "top_k", spied)
    return calls


def test_the_service_answers_from_the_index(load, monkeypatch):
    rec = load("gmf", "serve.retrieval=ann", *GENEROUS["hnsw"])
    client = TestClient(create_app(rec))
    calls = _spy_on_the_index(monkeypatch)
    answer = client.get("/recommend?user_id=1&k=5").json()
    assert calls == [rec.user_codes(["1"]).tolist()]
    top, logits = rec.recommend(rec.user_codes(["1"]), 5)
    assert [i["item_id"] for i in answer["items"]] == rec.item_index[top[0]].tolist()
    meta = client.get("/metadata").json()["retrieval"]
    assert meta["retrieval"] == "ann" and meta["ann"]["index"] == "hnsw"


def test_predict_retrieves_from_the_index_too(
    ckpts, load, data_dir, cache_dir, tmp_path, monkeypatch
):
    calls = _spy_on_the_index(monkeypatch)
    cfg = compose_cfg(
        "predict",
        data_dir,
        cache_dir,
        tmp_path,
        f"ckpt_path={ckpts['gmf']}",
        "retrieval=ann",
        "user_ids=[1,2]",
        "k=5",
    )
    frame = pd.read_csv(predict(cfg)["output"], dtype={"user_id": str, "item_id": str})
    assert calls  # predict.py asked the index
    rec = load("gmf", "serve.retrieval=ann")
    top, _ = rec.recommend(rec.user_codes(["1", "2"]), 5)
    assert frame.item_id.tolist() == rec.item_index[top.reshape(-1)].tolist()


def test_the_towers_that_propose_candidates():
    """NeuMF: its GMF tower's user vectors; Hybrid without side features: its dot product's."""
    spec = FeatureSpec.of_ids(num_users=5, num_items=7)
    neumf = NeuMF(spec, variant="neumf", gmf_dim=4, mlp_dim=4, mlp_layers=[8, 4]).eval()
    part = inner_product_part(neumf, 5)
    h = neumf.head.weight[0, :4]
    assert not part.whole and part.name == "GMF tower"
    torch.testing.assert_close(part.user_vectors, neumf.gmf.user.weight.detach())
    torch.testing.assert_close(part.item_vectors, (neumf.gmf.item.weight * h).detach())
    hybrid = Hybrid(spec, embedding_dim=4, mlp_layers=[8]).eval()
    part = inner_product_part(hybrid, 5)
    assert not part.whole and part.name == "dot product"
    torch.testing.assert_close(part.user_vectors, hybrid.user.weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(part.item_vectors, hybrid.item.weight.detach())
