"""Checkpoints written by earlier versions still load, whatever has moved or been renamed since;
a checkpoint that names a class from outside the platform does not.

The fixtures were written at commit c8cca92 by ``train.py`` on ml-100k with the default data
settings, 5 training steps:

- ``main-c8cca92-neumf-ml100k.ckpt``: NeuMF, ``model.gmf_dim=4 model.mlp_dim=4
  model.mlp_layers=[8,4]``;
- ``main-c8cca92-dlrm-ml100k-sharded.ckpt/``: a sharded checkpoint folder of ``trainer=torchrec
  model=dlrm model.embedding_dim=4 model.dense_arch_layers=[8,4] model.over_arch_layers=[8]``
  (2 CPU processes).

Beside each, a ``.json`` holds what that version's `Recommender` answered from it (pair logits,
user 1's top 5).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.checkpoint import RENAMED, RefusedCheckpoint, check_classes
from recsys.evaluate import run as evaluate
from recsys.recommender import Recommender
from recsys.runs import load_checkpoint
from tests.conftest import compose_cfg

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NEUMF = FIXTURES / "main-c8cca92-neumf-ml100k.ckpt"
SHARDED_DLRM = FIXTURES / "main-c8cca92-dlrm-ml100k-sharded.ckpt"


@pytest.mark.parametrize("ckpt", [NEUMF, SHARDED_DLRM], ids=["neumf", "sharded-dlrm"])
def test_a_checkpoint_of_main_c8cca92_answers_as_it_did(ckpt, data_dir, cache_dir, tmp_path):
    cfg = compose_cfg("serve", data_dir, cache_dir, tmp_path, f"ckpt_path={ckpt}")
    rec = Recommender.from_config(cfg)
    expected = json.loads(ckpt.with_suffix(".json").read_text())
    users, items = zip(*expected["pairs"], strict=True)
    logits = rec.score(rec.user_codes(list(users)), rec.item_codes(list(items)))
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5)
    top, _ = rec.recommend(rec.user_codes(["1"]), 5)
    assert [str(rec.item_index[c]) for c in top[0]] == expected["top5_user_1"]
    if ckpt.is_file():
        loaded = rec.model.state_dict()
        for name, weights in torch.load(ckpt, weights_only=True)["state_dict"].items():
            torch.testing.assert_close(loaded[name], weights, msg=name)


@pytest.mark.parametrize("ckpt", [NEUMF, SHARDED_DLRM], ids=["neumf", "sharded-dlrm"])
def test_a_checkpoint_of_main_c8cca92_evaluates(ckpt, data_dir, cache_dir, tmp_path):
    overrides = [f"ckpt_path={ckpt}", "trainer.accelerator=cpu", "latency_repeats=5"]
    metrics = evaluate(compose_cfg("evaluate", data_dir, cache_dir, tmp_path, *overrides))
    assert 0.0 < metrics["test/auroc"] < 1.0
    assert "popularity/test/auroc" in metrics


def _rewritten(tmp_path, change) -> Path:
    """The NeuMF fixture with ``change(checkpoint)`` applied, saved in ``tmp_path``."""
    checkpoint = torch.load(NEUMF, weights_only=True)
    change(checkpoint)
    path = tmp_path / "rewritten.ckpt"
    torch.save(checkpoint, path)
    return path


def _set_data_class(name):
    def change(checkpoint):
        checkpoint["MovieLensDataModule"]["data_class"] = name

    return change


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["hyper_parameters"].update(net="subprocess.Popen"),
        lambda c: c["hyper_parameters"].update(net="this.Popen"),  # `this` prints on import
        lambda c: c["hyper_parameters"].update(net="recsys.models.ncf.torch.load"),
        lambda c: c["hyper_parameters"]["optimizer"].update(_target_="os.system"),
        lambda c: c["hyper_parameters"].update(lr_scheduler={"_target_": "builtins.exec"}),
        lambda c: c["hyper_parameters"].update(pretrained={"_target_": "recsys.models.NeuMF"}),
        _set_data_class("subprocess.Popen"),
        _set_data_class("recsys.models.NeuMF"),
    ],
    ids=[
        "net",
        "net-not-imported",
        "net-attribute-chain",
        "optimizer",
        "lr_scheduler",
        "other-target",
        "data_class",
        "data_class-of-other-kind",
    ],
)
def test_a_checkpoint_naming_a_class_from_elsewhere_is_refused_before_import(
    change, data_dir, cache_dir, tmp_path
):
    path = _rewritten(tmp_path, change)
    cfg = compose_cfg("evaluate", data_dir, cache_dir, tmp_path, f"ckpt_path={path}")
    with pytest.raises(RefusedCheckpoint, match="recsys builds only its own classes"):
        load_checkpoint(cfg)
    assert "this" not in sys.modules


def test_trusted_and_renamed_classes_are_accepted(data_dir, cache_dir, tmp_path, monkeypatch):
    path = _rewritten(tmp_path, lambda c: c["hyper_parameters"].update(net="recsys.NeuMFv0"))
    monkeypatch.setitem(RENAMED, "recsys.NeuMFv0", "recsys.models.NeuMF")  # an earlier name
    _, model = load_checkpoint(
        compose_cfg("evaluate", data_dir, cache_dir, tmp_path, f"ckpt_path={path}")
    )
    assert type(model.net).__name__ == "NeuMF"
    checkpoint = {"hyper_parameters": {"net": "collections.OrderedDict"}}
    check_classes(checkpoint, "a.ckpt", trusted=["collections.OrderedDict"])
    with pytest.raises(RefusedCheckpoint, match=r"trusted_classes=\[collections.OrderedDict\]"):
        check_classes(checkpoint, "a.ckpt")
