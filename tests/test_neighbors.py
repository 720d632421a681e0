"""EASE and ItemKNN (`recsys.models.neighbors`) against their definitions computed another way,
and their scoring paths against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys import evaluate
from recsys.data import FeatureSpec
from recsys.data.store import FeatureStore
from recsys.models import EASE, ItemKNN
from recsys.scoring import CatalogueScorer
from recsys.train import build
from recsys.train import run as train
from tests.conftest import compose_cfg, compose_train


@pytest.fixture
def pairs():
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, 30, (300,), generator=g)
    items = torch.randint(0, 12, (300,), generator=g)
    return FeatureSpec.of_ids(num_users=30, num_items=12), users, items


def _matrix(users, items, spec):
    x = np.zeros((spec.num_users, spec.num_items))
    x[users.numpy(), items.numpy()] = 1.0
    return x


def test_ease_is_a_ridge_regression_of_each_item_on_the_others(pairs):
    spec, users, items = pairs
    net = EASE(spec, l2_reg=3.0).fit(users, items)
    x = _matrix(users, items, spec)
    for j in range(spec.num_items):
        others = [i for i in range(spec.num_items) if i != j]
        a = x[:, others]
        w = np.linalg.solve(a.T @ a + 3.0 * np.eye(len(others)), a.T @ x[:, j])
        np.testing.assert_allclose(net.W[others, j].numpy(), w, rtol=1e-4, atol=1e-6)
        assert net.W[j, j] == 0


def test_itemknn_keeps_each_items_k_nearest_by_shrunk_cosine(pairs):
    spec, users, items = pairs
    net = ItemKNN(spec, k=3, shrink=2.0).fit(users, items)
    x = _matrix(users, items, spec)
    for i in range(spec.num_items):
        sims = {}
        for j in range(spec.num_items):
            if j != i:
                both = float((x[:, i] * x[:, j]).sum())
                sims[j] = both / (np.sqrt(x[:, i].sum() * x[:, j].sum()) + 2.0)
        nearest = sorted(sims, key=lambda j: (-sims[j], j))[:3]
        expected = np.zeros(spec.num_items)
        expected[nearest] = [sims[j] for j in nearest]
        np.testing.assert_allclose(net.W[:, i].numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [EASE, ItemKNN])
def test_pairs_and_the_catalogue_score_alike_and_a_checkpoint_reloads_fitted(pairs, cls):
    spec, users, items = pairs
    net = cls(spec).fit(users, items)
    features = FeatureStore(spec, None, None)
    every = torch.arange(spec.num_users).repeat_interleave(spec.num_items)
    scores = net(features.make_batch(every, torch.arange(spec.num_items).repeat(spec.num_users)))
    catalogue = CatalogueScorer(net, features, spec.num_items).scores(torch.arange(30))
    torch.testing.assert_close(scores.view(30, 12), catalogue)
    # a user's score of an item is the sum of the weights from the user's items
    x = torch.from_numpy(_matrix(users, items, spec)).float()
    torch.testing.assert_close(catalogue, x @ net.W)
    again = cls(spec)
    again.load_state_dict(net.state_dict())
    torch.testing.assert_close(again.W, net.W)
    assert torch.equal(again.history, net.history)


@pytest.mark.parametrize("model", ["ease", "itemknn"])
def test_trained_tested_and_evaluated_like_every_model(model, data_dir, cache_dir, tmp_path):
    """Through train.py's loop: fitted before the fit, no optimizer step, the best checkpoint
    tested against popularity, and evaluate.py reproduces it from the checkpoint."""
    cfg = compose_train(
        data_dir,
        cache_dir,
        tmp_path / "train",
        f"model={model}",
        "data.feedback=implicit",
        "data.split.kind=leave_one_out",
        "data.ranking=sampled",
        "trainer.max_epochs=1",
    )
    metrics = train(cfg)
    assert metrics["test/hr@10"] > metrics["popularity/test/hr@10"] + 0.1
    assert "test/logloss" not in metrics  # scores that rank, not logits
    # the tested weights are the fit's, untouched by the loop
    ckpt = torch.load(metrics["best_model_path"], weights_only=True)
    _, fitted, _ = build(cfg)
    assert torch.equal(ckpt["state_dict"]["net.W"], fitted.net.W)
    path = f"ckpt_path={metrics['best_model_path']}"
    again = evaluate.run(compose_cfg("evaluate", data_dir, cache_dir, tmp_path / "eval", path))
    for name in ("test/hr@10", "test/ndcg@10", "test/auroc"):
        assert again[name] == metrics[name], name
