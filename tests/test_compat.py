"""Checkpoints written by earlier versions still load, whatever has moved or been renamed since.

``fixtures/main-c8cca92-neumf-ml100k.ckpt`` was written by ``recsys.train.run`` at commit
c8cca92 (NeuMF, ``gmf_dim=4 mlp_dim=4 mlp_layers=[8,4]``, ml-100k with the default data
settings, 5 training steps); ``fixtures/main-c8cca92-neumf-ml100k.json`` holds what that
version's `Recommender` answered from it (pair logits, user 1's top 5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.evaluate import run as evaluate
from recsys.recommender import Recommender
from tests.conftest import compose_cfg

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MAIN_C8CCA92 = FIXTURES / "main-c8cca92-neumf-ml100k.ckpt"


@pytest.fixture(scope="module")
def rec(data_dir, cache_dir, tmp_path_factory) -> Recommender:
    out = tmp_path_factory.mktemp("serve")
    cfg = compose_cfg("serve", data_dir, cache_dir, out, f"ckpt_path={MAIN_C8CCA92}")
    return Recommender.from_config(cfg)


def test_a_checkpoint_of_main_c8cca92_answers_as_it_did(rec):
    expected = json.loads(MAIN_C8CCA92.with_suffix(".json").read_text())
    saved = torch.load(MAIN_C8CCA92, weights_only=True)["state_dict"]
    loaded = rec.model.state_dict()
    for name, weights in saved.items():
        torch.testing.assert_close(loaded[name], weights, msg=name)
    users, items = zip(*expected["pairs"], strict=True)
    logits = rec.score(rec.user_codes(list(users)), rec.item_codes(list(items)))
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5)
    top, _ = rec.recommend(rec.user_codes(["1"]), 5)
    assert [str(rec.item_index[c]) for c in top[0]] == expected["top5_user_1"]


def test_a_checkpoint_of_main_c8cca92_evaluates(data_dir, cache_dir, tmp_path):
    cfg = compose_cfg(
        "evaluate",
        data_dir,
        cache_dir,
        tmp_path,
        f"ckpt_path={MAIN_C8CCA92}",
        "trainer.accelerator=cpu",
        "latency_repeats=5",
    )
    metrics = evaluate(cfg)
    assert 0.0 < metrics["test/auroc"] < 1.0
    assert "popularity/test/auroc" in metrics
