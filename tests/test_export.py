"""Export (`python -m recsys.export`): the files run in a Python that never imports recsys and
give the checkpoint's logits; a file that does not is refused with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recsys import export
from recsys.data import FeatureSpec
from recsys.data.store import FeatureStore
from recsys.errors import InputError, exit_on_user_error
from recsys.models.neighbors import EASE
from recsys.recommender import Recommender
from recsys.train import run as train
from tests.conftest import compose_cfg, compose_train

# runs the exported file with torch or onnxruntime only, on inputs saved by the test
RUNNER = """
import sys, numpy as np
path, fmt, inputs, out = sys.argv[1:]
arrays = dict(np.load(inputs))
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path)
    logits = session.run(["logits"], arrays)[0]
else:
    import torch
    program = torch.export.load(path)
    logits = program.module()(*(torch.from_numpy(a) for a in arrays.values())).detach().numpy()
assert not any(m == "recsys" or m.startswith("recsys.") for m in sys.modules), "recsys imported"
np.save(out, logits)
"""


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, data_dir, cache_dir) -> dict[str, str]:
    out = {}
    for name, overrides in {"neumf": [], "dlrm": ["model=dlrm"]}.items():
        cfg = compose_train(
            data_dir,
            cache_dir,
            tmp_path_factory.mktemp(name),
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=20",
            *overrides,
        )
        out[name] = train(cfg)["best_model_path"]
    return out


def _export(ckpt, fmt, data_dir, cache_dir, tmp_path, *overrides) -> dict:
    suffix = export.FORMATS[fmt]
    cfg = compose_cfg(
        "export",
        data_dir,
        cache_dir,
        tmp_path,
        f"ckpt_path={ckpt}",
        f"format={fmt}",
        f"output={tmp_path}/model{suffix}",
        *overrides,
    )
    return export.run(cfg)


def _run_elsewhere(path: str, fmt: str, inputs: dict, tmp_path: Path) -> np.ndarray:
    """The file's logits, computed by a fresh Python without recsys on its path."""
    np.savez(tmp_path / "inputs.npz", **inputs)
    out = tmp_path / "logits.npy"
    subprocess.run(
        [sys.executable, "-c", RUNNER, path, fmt, str(tmp_path / "inputs.npz"), str(out)],
        check=True,
        cwd=tmp_path,  # not the repository: recsys is not importable from the working folder
        env={"PATH": "/usr/bin:/bin"},
    )
    return np.load(out)


@pytest.mark.parametrize(
    "fmt",
    ["torch_export", pytest.param("onnx", marks=pytest.mark.slow)],  # onnx: ~10 s
)
def test_neumf_runs_without_recsys_from_raw_ids(ckpts, fmt, data_dir, cache_dir, tmp_path):
    files = _export(ckpts["neumf"], fmt, data_dir, cache_dir, tmp_path)
    card = json.loads(Path(files["card"]).read_text())
    assert set(card["inputs"]) == {"user_id", "item_id"} and card["parity"]["max_abs_diff"] <= 1e-5
    assert "weights" not in files  # a small model's ONNX weights are inside the file
    # a user maps raw ids to codes with the files beside the model
    users = pd.read_parquet(files["user_ids"]).set_index("user_id").code
    items = pd.read_parquet(files["item_ids"]).set_index("item_id").code
    raw = [("1", "50"), ("1", "172"), ("200", "1"), ("943", "1682"), ("5", "99")]
    inputs = {
        "user_id": users[[u for u, _ in raw]].to_numpy(np.int64),
        "item_id": items[[i for _, i in raw]].to_numpy(np.int64),
    }
    got = _run_elsewhere(files["model"], fmt, inputs, tmp_path)
    cfg = compose_cfg("serve", data_dir, cache_dir, tmp_path, f"ckpt_path={ckpts['neumf']}")
    rec = Recommender.from_config(cfg)
    expected = rec.score(rec.user_codes([u for u, _ in raw]), rec.item_codes([i for _, i in raw]))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dlrm_runs_without_recsys_from_flat_features(ckpts, data_dir, cache_dir, tmp_path):
    files = _export(ckpts["dlrm"], "torch_export", data_dir, cache_dir, tmp_path)
    card = json.loads(Path(files["card"]).read_text())
    assert list(card["inputs"]) == ["dense_features", "sparse_values", "sparse_lengths"]
    cfg = compose_cfg("serve", data_dir, cache_dir, tmp_path, f"ckpt_path={ckpts['dlrm']}")
    rec = Recommender.from_config(cfg)
    users, items = torch.tensor([0, 3, 3, 900, 17, 4]), torch.tensor([0, 1, 1500, 7, 42, 1681])
    batch = rec.dm.data.features.make_batch(users, items)
    assert batch.sparse_features.keys() == card["sparse_keys"]
    _, inputs, _ = export.exportable(rec.model.net, batch)  # the flattening the card describes
    got = _run_elsewhere(
        files["model"], "torch_export", {k: v.numpy() for k, v in inputs.items()}, tmp_path
    )
    np.testing.assert_allclose(got, rec.score(users.numpy(), items.numpy()), atol=1e-5, rtol=0)


def test_an_unfaithful_export_exits_non_zero_with_the_difference(
    ckpts, data_dir, cache_dir, tmp_path, monkeypatch, capsys
):
    loaded = export.run_exported
    monkeypatch.setattr(  # as if the written file computed something else
        export, "run_exported", lambda *a: loaded(*a) + np.float32(1e-3)
    )
    cfg = compose_cfg(
        "export",
        data_dir,
        cache_dir,
        tmp_path,
        f"ckpt_path={ckpts['neumf']}",
        "format=torch_export",
    )
    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(export.run)(cfg)
    assert exit_.value.code != 0
    assert "differs from the checkpoint by up to 0.001" in capsys.readouterr().err
    with pytest.raises(export.ParityError, match="up to nan"):
        export.check_parity(np.array([np.nan]), np.array([0.0]), 1e-5, Path("m.pt2"))


def test_bad_format_or_suffix_is_refused(ckpts, data_dir, cache_dir, tmp_path):
    def cfg(*overrides):
        ckpt = f"ckpt_path={ckpts['neumf']}"
        return compose_cfg("export", data_dir, cache_dir, tmp_path, ckpt, *overrides)

    with pytest.raises(InputError, match="not one of"):
        export.run(cfg("format=tflite"))
    with pytest.raises(InputError, match="writes a .onnx file"):
        export.run(cfg("format=onnx", f"output={tmp_path}/model.pt2"))


def test_models_gathering_a_users_history_are_refused():
    spec = FeatureSpec.of_ids(num_users=3, num_items=4)
    users, items = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    batch = FeatureStore(spec, None, None).make_batch(users, items)
    with pytest.raises(export.ExportUnsupported, match="EASE scores a pair by gathering"):
        export.exportable(EASE(spec, l2_reg=1.0).fit(users, items), batch)
