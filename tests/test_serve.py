"""Serving (`python -m recsys.serve`): answers checked against the model's own forward and the
raw ratings file, errors for bad input, the API key, and one real uvicorn process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from recsys.recommender import Recommender
from recsys.serve import create_app, get_recommender
from recsys.train import run as train
from tests.conftest import compose_cfg, compose_train

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path_factory, data_dir, cache_dir, *overrides: str) -> str:
    out = tmp_path_factory.mktemp("train")
    return train(compose_train(data_dir, cache_dir, out, *overrides))["best_model_path"]


def _recommender(ckpt, data_dir, cache_dir, tmp_path) -> Recommender:
    cfg = compose_cfg("serve", data_dir, cache_dir, tmp_path, f"ckpt_path={ckpt}")
    return Recommender.from_config(cfg)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data_dir, cache_dir) -> str:
    """NeuMF on ml-100k, explicit feedback (BCE: its logits are probabilities)."""
    return _train(tmp_path_factory, data_dir, cache_dir, "trainer.max_epochs=1")


@pytest.fixture(scope="module")
def rec(ckpt, data_dir, cache_dir, tmp_path_factory) -> Recommender:
    return _recommender(ckpt, data_dir, cache_dir, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(rec) -> TestClient:
    return TestClient(create_app(rec))


@pytest.fixture(scope="module")
def ratings(data_dir) -> pd.DataFrame:
    return pd.read_csv(
        data_dir / "ml-100k" / "u.data", sep="\t", names=["user", "item", "rating", "ts"], dtype=str
    )


@torch.no_grad()
def forward_scores(rec: Recommender, user_code: int) -> np.ndarray:
    """Logits of one user against every item through the model's forward (one pair a row)."""
    items = torch.arange(rec.num_items)
    batch = rec.dm.data.features.make_batch(torch.full_like(items, user_code), items)
    return rec.model(batch).numpy()


def test_recommend_is_the_forward_top_k_among_unseen_items(client, rec, ratings):
    answer = client.get("/recommend", params={"user_id": "1", "k": 10}).json()
    assert answer["user_id"] == "1" and answer["source"] == "model"
    got = [i["item_id"] for i in answer["items"]]
    seen = set(ratings[ratings.user == "1"].item)
    assert len(got) == 10 and not seen & set(got)
    # independent: every item through forward, the user's rated items (from u.data) removed
    scores = pd.Series(forward_scores(rec, int(rec.user_codes(["1"])[0])), rec.item_index)
    expected = scores.drop(list(seen)).nlargest(10)
    assert got == list(expected.index)
    np.testing.assert_allclose([i["score"] for i in answer["items"]], expected.values, atol=1e-4)
    titles = rec.item_info.set_index("item_id").title
    assert [i["title"] for i in answer["items"]] == list(titles[got])
    assert {"year", "genres"} <= set(answer["items"][0])


def test_recommend_with_seen_items_and_in_batches(client, rec):
    everything = client.get("/recommend?user_id=1&k=5&exclude_seen=false").json()["items"]
    scores = pd.Series(forward_scores(rec, int(rec.user_codes(["1"])[0])), rec.item_index)
    assert [i["item_id"] for i in everything] == list(scores.nlargest(5).index)
    batch = client.post("/recommend", json={"user_ids": ["1", 2, "3"], "k": 4}).json()
    singles = [client.get(f"/recommend?user_id={u}&k=4").json() for u in ("1", "2", "3")]
    for got, single in zip(batch["results"], singles, strict=True):  # same up to rounding
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in single["items"]]
        np.testing.assert_allclose(
            [i["score"] for i in got["items"]], [i["score"] for i in single["items"]], atol=1e-5
        )


def test_unknown_ids_are_404_naming_them_or_get_popular_items(client, rec):
    r = client.get("/recommend?user_id=424242&k=3")
    assert r.status_code == 404 and "424242" in r.json()["detail"]
    assert r.json()["unknown"] == {"user_id": ["424242"]}
    r = client.post("/recommend", json={"user_ids": ["1", "x1", "x2"], "k": 3})
    assert r.status_code == 404 and r.json()["unknown"] == {"user_id": ["x1", "x2"]}
    r = client.get("/recommend?user_id=424242&k=3&fallback=popular").json()
    assert r["source"] == "popular"
    train_counts = rec.dm.protocol.item_popularity()
    top3 = rec.item_index[train_counts.argsort(descending=True, stable=True)[:3].numpy()]
    assert [i["item_id"] for i in r["items"]] == list(top3)
    assert client.get("/similar?item_id=nope").status_code == 404
    r = client.post("/score", json={"pairs": [{"user_id": 1, "item_id": "no-such-item"}]})
    assert r.status_code == 404 and r.json()["unknown"] == {"item_id": ["no-such-item"]}


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("GET", "/recommend?user_id=1&k=0", None),
        ("GET", "/recommend?user_id=1&k=abc", None),
        ("GET", "/recommend?user_id=1&k=100000", None),
        ("GET", "/recommend?k=10", None),
        ("GET", "/recommend?user_id=1&fallback=random", None),
        ("GET", "/recommend?user_id=1&exclude_seen=perhaps", None),
        ("GET", "/similar?item_id=1&k=-1", None),
        ("POST", "/recommend", {"user_ids": [], "k": 3}),
        ("POST", "/recommend", {"user_ids": ["1"], "k": "many"}),
        ("POST", "/score", {"pairs": []}),
        ("POST", "/score", {"pairs": [{"user_id": "1"}]}),
        ("POST", "/score", "not json"),
    ],
)
def test_bad_parameters_are_422(client, method, path, body):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = client.request(method, path, **kwargs)
    assert r.status_code == 422, r.text
    assert "detail" in r.json()


def test_similar_items_by_cosine_of_item_vectors(client, rec):
    answer = client.get("/similar?item_id=1&k=5").json()["items"]
    vectors = rec.model.net.item_embeddings().detach()
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    code = int(rec.item_codes(["1"])[0])
    sims = pd.Series((vectors @ vectors[code]).numpy(), rec.item_index).drop("1")
    assert [i["item_id"] for i in answer] == list(sims.nlargest(5).index)
    np.testing.assert_allclose([i["similarity"] for i in answer], sims.nlargest(5), atol=1e-5)


def test_score_gives_the_forward_probabilities(client, rec):
    pairs = [{"user_id": "1", "item_id": "50"}, {"user_id": 7, "item_id": 100}]
    scores = client.post("/score", json={"pairs": pairs}).json()["scores"]
    for p, s in zip(pairs, scores, strict=True):
        user = int(rec.user_codes([p["user_id"]])[0])
        logit = forward_scores(rec, user)[int(rec.item_codes([p["item_id"]])[0])]
        assert s["score"] == pytest.approx(float(logit), abs=1e-4)
        assert s["probability"] == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-5)


def test_metadata_has_the_run_test_metrics(client, ckpt):
    meta = client.get("/metadata").json()
    run_metrics = pd.read_json(Path(ckpt).parents[1] / "metrics.json", typ="series")
    assert meta["data"]["source"] == "ml-100k"
    assert (meta["data"]["users"], meta["data"]["items"]) == (943, 1682)
    assert meta["metrics"]["test/auroc"] == pytest.approx(run_metrics["test/auroc"])
    assert meta["metrics_note"] is None
    assert meta["model"]["factorised_scoring"] is True
    assert meta["model"]["calibrated"] is True  # BCE on explicit feedback


@pytest.fixture(scope="module")
def run_past_best(tmp_path_factory, data_dir, cache_dir) -> Path:
    """A run folder whose last.ckpt (written every 7 steps: step 14) is not the best
    checkpoint that the run tested (the epoch's end, step 20)."""
    out = tmp_path_factory.mktemp("train")
    overrides = [
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=20",
        "callbacks.last_checkpoint.every_n_train_steps=7",
    ]
    train(compose_train(data_dir, cache_dir, out, *overrides))
    return out


def test_test_metrics_only_for_the_checkpoint_they_were_measured_on(
    run_past_best, ckpt, data_dir, cache_dir, tmp_path
):
    measured = json.loads((run_past_best / "metrics.json").read_text())
    best = Path(measured["best_model_path"])
    assert (measured["best_epoch"], measured["best_step"]) == (0, 20)

    def metadata(path: Path) -> dict:
        rec = _recommender(path, data_dir, cache_dir, tmp_path)
        return TestClient(create_app(rec)).get("/metadata").json()

    # files named relative to the folder that holds the run: no absolute path is served
    named = {**measured, "best_model_path": str(best.relative_to(run_past_best.parent))}
    assert metadata(best)["metrics"] == named
    last = run_past_best / "checkpoints" / "last.ckpt"
    meta = metadata(last)
    assert meta["metrics"] is None
    assert (meta["checkpoint"], meta["run"]) == ("last.ckpt", run_past_best.name)
    note = meta["metrics_note"]
    assert f"holds the figures of {named['best_model_path']} (epoch 0, step 20)" in note
    assert "not of this checkpoint (epoch 0, step 14)" in note
    assert f"python evaluate.py ckpt_path={run_past_best.name}/checkpoints/last.ckpt" in note
    assert str(run_past_best.parent) not in json.dumps(meta)
    # a last.ckpt written with the best (the default: every epoch's end) holds its weights
    same = metadata(Path(ckpt).parent / "last.ckpt")
    assert same["metrics"]["test/auroc"] == metadata(Path(ckpt))["metrics"]["test/auroc"]
    # a copy of the best checkpoint outside any run: no run, no metrics
    alone = tmp_path / "copy" / "model.ckpt"
    alone.parent.mkdir()
    alone.write_bytes(best.read_bytes())
    meta = metadata(alone)
    assert meta["metrics"] is None and "not in a training run folder" in meta["metrics_note"]
    assert (meta["checkpoint"], meta["run"]) == ("model.ckpt", None)
    assert str(tmp_path) not in json.dumps(meta)


def test_api_key_is_required_on_every_route_but_health(rec):
    client = TestClient(create_app(rec, api_key="s3cret"))
    assert client.get("/health").status_code == 200
    routes = [
        ("GET", "/metadata", None),
        ("GET", "/recommend?user_id=1", None),
        ("POST", "/recommend", {"user_ids": ["1"]}),
        ("GET", "/similar?item_id=1", None),
        ("POST", "/score", {"pairs": [{"user_id": "1", "item_id": "1"}]}),
    ]
    for method, path, body in routes:
        assert client.request(method, path, json=body).status_code == 401
        wrong = {"X-API-Key": "guess"}
        assert client.request(method, path, json=body, headers=wrong).status_code == 401
        right = {"X-API-Key": "s3cret"}
        assert client.request(method, path, json=body, headers=right).status_code == 200


class OneUser:
    """A recommender that knows the user ``u`` and recommends it the item ``z``: what a test
    (or another service) hands the routes instead of a model."""

    num_items = 2
    catalogue_items = 2  # factorised: scored with a matrix product, not pair by pair
    forward_items = 0
    item_records = [{"item_id": "y"}, {"item_id": "z"}]

    def user_codes(self, raw_ids: list, missing_ok: bool = False) -> np.ndarray:
        return np.array([0 if str(r) == "u" else -1 for r in raw_ids])

    def recommend(self, codes: np.ndarray, k: int, exclude_seen: bool = True):
        return np.ones((len(codes), k), dtype=np.int64), np.full((len(codes), k), 9.0)


def test_the_recommender_is_swapped_through_dependency_overrides(rec):
    app = create_app(rec, api_key="s3cret")
    client, key = TestClient(app), {"X-API-Key": "s3cret"}
    app.dependency_overrides[get_recommender] = OneUser
    answer = client.get("/recommend?user_id=u&k=1", headers=key).json()
    assert answer == {"user_id": "u", "source": "model", "items": [{"item_id": "z", "score": 9.0}]}
    assert client.get("/recommend?user_id=u&k=1").status_code == 401  # still behind the key
    app.dependency_overrides.clear()
    assert client.get("/recommend?user_id=u", headers=key).status_code == 404  # the model's users
    assert client.get("/recommend?user_id=1&k=1", headers=key).json()["items"][0]["title"]


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("hybrid", ["model=hybrid"]),
        ("hybrid+side", ["model=hybrid", "model.use_side_features=true"]),
        ("dlrm", ["model=dlrm"]),
        ("gmf bpr", ["model.variant=gmf", "model.loss=bpr", "data.feedback=implicit"]),
        ("neumf implicit", ["data.feedback=implicit"]),
    ],
)
def test_every_model_serves(name, overrides, tmp_path_factory, data_dir, cache_dir, tmp_path):
    ckpt = _train(
        tmp_path_factory,
        data_dir,
        cache_dir,
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=20",
        *overrides,
    )
    rec = _recommender(ckpt, data_dir, cache_dir, tmp_path)
    client = TestClient(create_app(rec))
    answer = client.get("/recommend?user_id=5&k=10").json()
    scores = pd.Series(forward_scores(rec, int(rec.user_codes(["5"])[0])), rec.item_index)
    seen = rec.history(int(rec.user_codes(["5"])[0])).item_id
    assert [i["item_id"] for i in answer["items"]] == list(scores.drop(seen).nlargest(10).index)
    assert rec.scorer.factorised == (name in ("hybrid", "gmf bpr", "neumf implicit"))
    assert rec.forward_items == (0 if rec.scorer.factorised else rec.num_items)
    assert rec.catalogue_items == rec.num_items - rec.forward_items
    assert client.get("/similar?item_id=1&k=3").status_code == 200
    scored = client.post("/score", json={"pairs": [{"user_id": 5, "item_id": 1}]}).json()
    # probabilities only from BCE on explicit feedback: under implicit feedback sigmoid(logit)
    # is the chance of the positive in a 1 : num_negatives mix, BPR logits only order items
    calibrated = name not in ("gmf bpr", "neumf implicit")
    assert (scored["scores"][0]["probability"] is not None) == calibrated
    assert scored["scores"][0]["score"] == pytest.approx(float(scores["1"]), abs=1e-4)
    assert client.get("/metadata").json()["model"]["calibrated"] is calibrated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ready_is_called_once_connections_are_accepted(client):
    """`ReadyServer` calls back once the app has started and its socket listens: the kernel
    accepts a connection made inside the callback, and a request from another thread is
    answered."""
    import uvicorn

    from recsys.serve import ReadyServer, listening_socket

    port, answers = _free_port(), []

    def ask() -> None:
        try:
            answers.append(httpx.get(f"http://127.0.0.1:{port}/health").status_code)
        finally:
            server.should_exit = True

    def on_ready() -> None:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # refused: raises
        threading.Thread(target=ask).start()  # the event loop answers it

    server = ReadyServer(uvicorn.Config(client.app, log_level="warning"), on_ready)
    server.run(sockets=[listening_socket("127.0.0.1", port)])
    assert answers == [200]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_real_server_process(workers, ckpt, data_dir, cache_dir, tmp_path):
    """`python -m recsys.serve run_dir=<run>` (its best checkpoint) with one or two worker
    processes on loopback, the API key from the environment: once its log says ``ready:``,
    every request is answered at the first try."""
    port = _free_port()
    env = {**os.environ, "RECSYS_API_KEY": "k1", "RECSYS_CACHE_DIR": str(cache_dir)}
    run_dir = Path(ckpt).parents[1]
    cmd = [sys.executable, "-m", "recsys.serve", f"run_dir={run_dir}", f"serve.port={port}"]
    cmd += [f"serve.workers={workers}", f"hydra.run.dir={tmp_path}"]
    log_path = tmp_path / "server.out"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while "ready: serving" not in log_path.read_text():
            assert server.poll() is None, f"the server exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no ready line in 120 s:\n{log_path.read_text()}"
            time.sleep(0.1)
        ready = next(line for line in log_path.read_text().splitlines() if "ready:" in line)
        assert f"ready: serving NeuMF (neumf, ml-100k) on {base} ({ckpt}, {workers} worker" in ready
        key = {"X-API-Key": "k1"}
        assert httpx.get(f"{base}/recommend?user_id=1").status_code == 401
        for _ in range(4):  # new connections, spread over the workers
            r = httpx.get(f"{base}/recommend?user_id=1&k=10", headers=key)
            assert r.status_code == 200 and len(r.json()["items"]) == 10
            assert all(i["title"] for i in r.json()["items"])
        meta = httpx.get(f"{base}/metadata", headers=key).json()
        assert (meta["checkpoint"], meta["run"]) == (Path(ckpt).name, run_dir.name)
        r = httpx.get(f"{base}/recommend?user_id=424242", headers=key)
        assert r.status_code == 404 and "424242" in r.json()["detail"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
