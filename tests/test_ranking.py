"""Ranking evaluation: saved leave-one-out candidates, full-ranking masks, metrics in runs."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate

from recsys.data.spec import FeatureSpec, SparseFeature
from recsys.lit.module import RecommenderModule
from recsys.train import run

LOO = [
    "data=movielens",
    "data.variant=100k",
    "data.feedback=implicit",
    "data.split.kind=leave_one_out",
]


def _dm(make_cfg, *overrides):
    dm = instantiate(make_cfg(*LOO, *overrides).data)
    dm.prepare_data()
    dm.setup()
    return dm


def _ranking_batches(dm, split="test"):
    loaders = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    return list(loaders[1])


def test_loo_candidates_saved_and_identical_across_runs(make_cfg, tmp_path):
    dm = _dm(make_cfg, "data.ranking=sampled")
    first = torch.cat([b.items for b in _ranking_batches(dm)])
    saved = dm.protocol.candidates_path(dm.processed_dir, "test")
    assert saved.is_file()
    assert first.shape == (dm.spec.num_users, 100)  # one held-out item + 99 negatives each
    again = torch.cat([b.items for b in _ranking_batches(_dm(make_cfg, "data.ranking=sampled"))])
    assert torch.equal(first, again)
    saved.unlink()  # regenerated from the seed: the same candidates
    regenerated = torch.cat(
        [b.items for b in _ranking_batches(_dm(make_cfg, "data.ranking=sampled"))]
    )
    assert torch.equal(first, regenerated)
    other_seed = _dm(make_cfg, "data.ranking=sampled", "seed=3")
    assert not torch.equal(first, torch.cat([b.items for b in _ranking_batches(other_seed)]))


def test_sampled_candidates_hold_the_test_item_and_no_other_positive(make_cfg):
    dm = _dm(make_cfg, "data.ranking=sampled")
    inter = dm.data.interactions
    test_item = torch.full((dm.spec.num_users,), -1)
    test_item[inter.users[dm.rows["test"]]] = inter.items[dm.rows["test"]]
    for b in _ranking_batches(dm):
        assert torch.equal(b.items[:, 0], test_item[b.users]) and b.relevant[:, 0].all()
        users = b.users.repeat_interleave(99)
        assert not dm.positives.contains(users, b.items[:, 1:].flatten()).any()


def test_full_ranking_masks_training_items(make_cfg):
    dm = _dm(make_cfg, "data.ranking=full")
    inter = dm.data.interactions
    b = _ranking_batches(dm)[0]
    assert b.items.shape[1] == dm.spec.num_items
    for q in range(3):
        user = b.users[q]
        train = inter.items[dm.rows["train"]][inter.users[dm.rows["train"]] == user]
        val = inter.items[dm.rows["val"]][inter.users[dm.rows["val"]] == user]
        test = inter.items[dm.rows["test"]][inter.users[dm.rows["test"]] == user]
        invalid = (~b.valid[q]).nonzero().flatten()
        assert torch.equal(invalid, torch.cat([train, val]).unique())
        assert torch.equal(b.relevant[q].nonzero().flatten(), test)


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_runs_report_ranking_metrics(make_cfg, mode):
    metrics = run(
        make_cfg(
            *LOO,
            f"data.ranking={mode}",
            "trainer.max_epochs=1",
        )
    )
    for name in (
        "val/ndcg@10",
        "test/hr@10",
        "test/ndcg@10",
        "test/mrr",
        "test/recall@20",
        "test/users_per_sec",
    ):
        assert name in metrics, name
    assert 0 < metrics["test/hr@10"] <= 1 and metrics["test/ndcg@10"] <= metrics["test/hr@10"]
    if mode == "full":
        for name in ("coverage@10", "novelty@10", "diversity@10", "personalization@10"):
            assert f"test/{name}" in metrics, name
        assert 0 < metrics["test/coverage@10"] <= 1


def test_item_statistics_travel_in_the_state_dict():
    """The module holds the training data's item statistics as buffers; a checkpoint without
    them (an older recsys) still loads, and list metrics then ask for them."""
    spec = FeatureSpec.of_ids(2, 3, side=(SparseFeature("genres", "item", 4, multi_hot=True),))
    kwargs = {"net": "recsys.models.Popularity", "spec": spec.to_dict()}
    module = RecommenderModule(**kwargs)
    assert module.item_popularity.shape == (3,) and module.item_vectors.shape == (3, 4)
    vectors = torch.eye(3, 4)
    module.set_item_statistics(torch.tensor([3.0, 0.0, 1.0]), vectors)
    fresh = RecommenderModule(**kwargs)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.item_popularity, module.item_popularity)
    assert torch.equal(fresh.item_vectors.float(), vectors)
    old = {k: v for k, v in module.state_dict().items() if not k.startswith("item_")}
    fresh = RecommenderModule(**kwargs)
    fresh.load_state_dict(old)  # strict: the missing buffers keep their (empty) values
    with pytest.raises(RuntimeError, match="set_item_statistics"):
        fresh._list_metrics(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="item vectors of shape None"):
        fresh.set_item_statistics(torch.ones(3))


def test_validation_and_test_candidates_are_drawn_independently(make_cfg, tmp_path):
    """Both splits' queries in the same user order (as ml-1m's rows come, sorted by user) must
    not give validation the test's negatives: each split draws with a seed of its own."""
    dm = _dm(make_cfg, "data.ranking=sampled")
    inter = dm.data.interactions
    rows = dict(dm.rows)
    for split in ("val", "test"):
        rows[split] = rows[split][torch.argsort(inter.users[rows[split]], stable=True)]
    dm.protocol.prepare(tmp_path, lambda: (dm.data, rows))
    negatives = {}
    for split in ("val", "test"):
        table = pq.read_table(dm.protocol.candidates_path(tmp_path, split))
        assert torch.equal(
            torch.from_numpy(table.column("user").to_numpy().copy()), inter.users[rows[split]]
        )
        negatives[split] = table.column("negatives").to_pylist()
    shared = [
        len(set(v) & set(t)) for v, t in zip(negatives["val"], negatives["test"], strict=True)
    ]
    # two independent draws of 99 among ~1,600 items share about 99 * 99 / 1,600 = 6 items
    assert sum(shared) / len(shared) < 10
