"""EASE and ItemKNN (`recsys.models.neighbors`) against their definitions computed another way,
and their scoring paths against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.data import FeatureSpec
from recsys.data.store import FeatureStore
from recsys.models import EASE, ItemKNN
from recsys.scoring import CatalogueScorer


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
