"""Serving under bad or heavy requests and faulty models (issue 29): the body size checked
before parsing, the work per request capped, long scoring kept off the event loop, strict
request types, model faults as 500s, the API key and the Host header, and checkpoints that
cannot be served refused at start with one message."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from recsys.checkpoint import checkpoint_state
from recsys.errors import InputError
from recsys.serve import create_app, get_recommender
from recsys.serve.dependencies import Limits, default_hosts
from tests.conftest import compose_cfg
from tests.test_serve import OneUser, _recommender, ckpt, rec  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def client(rec) -> TestClient:  # noqa: F811
    return TestClient(create_app(rec))


class PairModel(OneUser):
    """`OneUser` as a model that does not factorise: it scores 1,000 items per user through
    its forward."""

    catalogue_items = 0
    forward_items = 1000


# --- the request body ----------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_unparsed(rec):  # noqa: F811
    client = TestClient(create_app(rec, max_body_bytes=1000))
    big = b"{" + b" " * 2000 + b"not json"  # parsed, it would be a 422
    r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["detail"].startswith(
        "the request body is 2009 bytes, more than serve.max_body_bytes=1000"
    )
    fits = {"user_ids": ["1"] * 100, "k": 3}
    assert client.post("/recommend", json=fits).status_code == 200


def test_a_chunked_body_is_counted_as_it_is_read_and_refused_past_the_limit(rec):  # noqa: F811
    """A chunked body declares no length: the app reads chunks until they pass the limit,
    answers 413, and reads no further."""
    app = create_app(rec, max_body_bytes=1000)
    reads, sent = [], []

    async def receive() -> dict:  # an endless body, 400 bytes a chunk
        reads.append(1)
        return {"type": "http.request", "body": b" " * 400, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/recommend",
        "raw_path": b"/recommend",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["detail"].startswith("the request body is more than serve.max_body_bytes=1000")
    assert len(reads) == 3  # 1,200 bytes read, then no more


# --- the work per request ------------------------------------------------------------------


def test_the_items_per_answer_are_capped(rec):  # noqa: F811
    client = TestClient(create_app(rec, max_results=100))
    assert client.post("/recommend", json={"user_ids": list(range(1, 11)), "k": 10}).is_success
    r = client.post("/recommend", json={"user_ids": list(range(1, 12)), "k": 10})
    assert r.status_code == 422
    assert r.json()["detail"].startswith(
        "11 users x k=10 = 110 items to answer; at most serve.max_results=100 per request"
    )


def test_the_pairs_a_model_that_does_not_factorise_scores_are_capped(rec):  # noqa: F811
    app = create_app(rec, max_pairs=5000)
    app.dependency_overrides[get_recommender] = PairModel
    client = TestClient(app)
    assert client.post("/recommend", json={"user_ids": ["u"] * 5, "k": 1}).is_success
    r = client.post("/recommend", json={"user_ids": ["u"] * 6, "k": 1})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("6 users x 1000 items = 6000 (user, item) pairs")
    assert "serve.max_pairs=5000 per request: send at most 5 users per request" in detail
    # a limit that one user of the catalogue passes is refused at start
    pair_scored = copy.copy(rec)
    pair_scored.forward_items = rec.num_items
    with pytest.raises(InputError, match="serve.max_pairs=1000 is less than the 1682"):
        create_app(pair_scored, max_pairs=1000)


class Blocking(OneUser):
    """Scoring that holds its thread (as a long forward does) until the test releases it."""

    started, released = threading.Event(), threading.Event()

    def recommend(self, codes: np.ndarray, k: int, exclude_seen: bool = True):
        self.started.set()
        if not self.released.wait(timeout=10):  # never released: /health did not answer
            raise TimeoutError("the test did not release the scoring")
        return super().recommend(codes, k, exclude_seen)


@pytest.mark.parametrize(
    "model,limits,request_",
    [
        ("pair-scored", {"inline_forward": 999}, ("GET", "/recommend?user_id=u&k=1", None)),
        (
            "factorised",
            {"inline_scores": 3},
            ("POST", "/recommend", {"user_ids": ["u", "u"], "k": 1}),
        ),
    ],
)
def test_long_scoring_runs_off_the_event_loop(rec, model, limits, request_):  # noqa: F811
    """While a request that runs more than ``inline_forward`` pairs through the model's
    forward (1,000 items of a model scored pair by pair), or one that scores more than
    ``inline_scores`` pairs, is being scored, ``/health`` answers (on the loop it would wait
    for the scoring to end: here, for ever)."""
    pair_scored = model == "pair-scored"
    blocking = type(
        "B",
        (Blocking,),
        {"forward_items": 1000 if pair_scored else 0, "catalogue_items": 0 if pair_scored else 2},
    )
    blocking.started, blocking.released = threading.Event(), threading.Event()
    app = create_app(rec, **limits)
    app.dependency_overrides[get_recommender] = blocking
    answers = []
    # one event loop for every request; the scoring's timeout answers 500, not an exception
    with TestClient(app, raise_server_exceptions=False) as client:
        method, path, body = request_
        slow = threading.Thread(
            target=lambda: answers.append(client.request(method, path, json=body))
        )
        slow.start()
        assert blocking.started.wait(timeout=10)
        health = client.get("/health")  # answered while the scoring holds its thread
        blocking.released.set()
        slow.join(timeout=10)
    assert health.status_code == 200
    # 500 (the scoring timed out) where /health waited for the scoring to end
    assert [a.status_code for a in answers] == [200], "/health was not answered meanwhile"


class Where(OneUser):
    """`OneUser` that notes the thread it scores in."""

    threads: list[str] = []

    def recommend(self, codes: np.ndarray, k: int, exclude_seen: bool = True):
        self.threads.append(threading.current_thread().name)
        return super().recommend(codes, k, exclude_seen)


@pytest.mark.parametrize("forward_items,on_loop", [(1000, True), (1001, False)])
def test_a_small_forward_is_scored_on_the_loop(rec, forward_items, on_loop):  # noqa: F811
    """A request of no more than ``inline_forward`` forward pairs is scored on the event loop
    (the thread pool's hop would cost more than the scoring); one more pair, in a thread."""
    where = type("W", (Where,), {"catalogue_items": 0, "forward_items": forward_items})
    where.threads = []
    app = create_app(rec, inline_forward=1000)
    app.dependency_overrides[get_recommender] = where
    with TestClient(app) as client:
        loop_thread = client.portal.call(lambda: threading.current_thread().name)
        assert client.get("/recommend?user_id=u&k=1").status_code == 200
    assert (where.threads == [loop_thread]) is on_loop, (where.threads, loop_thread)


class Slow(PairModel):
    """`PairModel` whose scoring takes 0.4 s and notes how many requests score at once."""

    lock = threading.Lock()
    active, most = 0, 0

    def recommend(self, codes: np.ndarray, k: int, exclude_seen: bool = True):
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.most = max(cls.most, cls.active)
        time.sleep(0.4)
        with cls.lock:
            cls.active -= 1
        return super().recommend(codes, k, exclude_seen)


@pytest.mark.parametrize("threads", [1, 2])
def test_scoring_threads_bound_the_requests_scored_at_once(rec, threads):  # noqa: F811
    """Six long requests at once are scored ``serve.scoring_threads`` at a time (anyio's
    default pool would score 40 at once, each with its forward's memory); all are answered."""
    slow = type("S", (Slow,), {"lock": threading.Lock(), "active": 0, "most": 0})
    app = create_app(rec, scoring_threads=threads, inline_forward=0)
    app.dependency_overrides[get_recommender] = slow
    with TestClient(app) as client:
        answers = []
        senders = [
            threading.Thread(
                target=lambda: answers.append(client.get("/recommend?user_id=u&k=1").status_code)
            )
            for _ in range(6)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=30)
    assert answers == [200] * 6
    assert slow.most == threads


# --- model faults --------------------------------------------------------------------------


class Broken(OneUser):
    def recommend(self, codes: np.ndarray, k: int, exclude_seen: bool = True):
        raise ValueError("operands could not be broadcast together")  # a bug, not the input


def test_a_failure_that_is_not_the_input_is_a_logged_500(rec, caplog):  # noqa: F811
    app = create_app(rec)
    app.dependency_overrides[get_recommender] = Broken
    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="recsys.serve.app"):
        r = client.get("/recommend?user_id=u&k=1")
    assert r.status_code == 500
    assert "broadcast" not in r.text and r.json()["detail"].startswith("internal server error")
    (record,) = [r for r in caplog.records if r.name == "recsys.serve.app"]
    assert "GET /recommend failed" in record.getMessage()
    assert record.exc_info[0] is ValueError  # the traceback is in the log
    # the input's faults stay 422
    assert client.get("/recommend?user_id=u&k=5").status_code == 422  # k over the 2 items


def test_weights_that_are_not_finite_are_refused_at_load(
    ckpt,  # noqa: F811
    data_dir,
    cache_dir,
    tmp_path,
):
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["net.gmf.item.weight"][7] = float("nan")
    broken = tmp_path / "nan.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(InputError) as refused:
        _recommender(broken, data_dir, cache_dir, tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{broken}: gmf.item.weight (1682, 32) holds 32 NaN or infinite")
    assert "(the first at index [7, 0])" in message


# --- who may ask ---------------------------------------------------------------------------


def test_a_non_ascii_api_key_header_is_a_wrong_key(rec):  # noqa: F811
    client = TestClient(create_app(rec, api_key="s3cret"))
    wrong = {"X-API-Key": "s3crét".encode()}
    assert client.get("/metadata", headers=wrong).status_code == 401
    assert client.get("/metadata", headers={"X-API-Key": b"\xff\xfe"}).status_code == 401
    unicode_key = TestClient(create_app(rec, api_key="clé"))
    assert unicode_key.get("/metadata", headers={"X-API-Key": "clé".encode()}).is_success


def test_an_empty_api_key_is_refused_at_start(rec, data_dir, cache_dir, tmp_path):  # noqa: F811
    for empty in ("", "  "):
        with pytest.raises(InputError, match="an empty key would turn authentication off"):
            create_app(rec, api_key=empty)
    cfg = compose_cfg("serve", data_dir, cache_dir, tmp_path, "serve.api_key=''")
    with pytest.raises(InputError, match="serve.api_key"):
        Limits.from_config(cfg.serve)
    # null turns it off
    assert compose_cfg("serve", data_dir, cache_dir, tmp_path).serve.api_key is None


def test_the_api_docs_need_the_key_when_one_is_set(rec):  # noqa: F811
    open_ = TestClient(create_app(rec))
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert open_.get(path).status_code == 200
    keyed = TestClient(create_app(rec, api_key="s3cret"))
    assert keyed.get("/docs").status_code == 404  # its page fetches the schema without a key
    assert keyed.get("/redoc").status_code == 404
    assert keyed.get("/openapi.json").status_code == 401
    schema = keyed.get("/openapi.json", headers={"X-API-Key": "s3cret"}).json()
    assert "/recommend" in schema["paths"] and "/openapi.json" not in schema["paths"]


def test_the_host_header_is_checked(rec, data_dir, cache_dir, tmp_path):  # noqa: F811
    app = create_app(rec, allowed_hosts=["api.example.com"])
    assert TestClient(app).get("/health").status_code == 400  # Host: testserver
    assert TestClient(app, base_url="http://api.example.com").get("/health").is_success
    # by default a loopback server answers loopback names only; one on every interface, any
    cfg = compose_cfg("serve", data_dir, cache_dir, tmp_path)
    assert Limits.from_config(cfg.serve).allowed_hosts == ("localhost", "127.0.0.1", "[::1]")
    assert default_hosts("::1") == ("localhost", "127.0.0.1", "[::1]")
    assert default_hosts("127.0.0.2") == ("localhost", "127.0.0.1", "[::1]", "127.0.0.2")
    assert default_hosts("0.0.0.0") == ("*",)
    cfg.serve.allowed_hosts = ["a.example.com"]
    assert Limits.from_config(cfg.serve).allowed_hosts == ("a.example.com",)


# --- request types, answers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/recommend", {"user_ids": [True], "k": 3}),
        ("POST", "/recommend", {"user_ids": [1.0], "k": 3}),
        ("POST", "/recommend", {"user_ids": ["1"], "k": True}),
        ("POST", "/recommend", {"user_ids": ["1"], "k": "5"}),
        ("POST", "/recommend", {"user_ids": ["1"], "k": 5.0}),
        ("POST", "/recommend", {"user_ids": ["1"], "exclude_seen": "false"}),
        ("POST", "/recommend", {"user_ids": ["1"], "k": 3, "padding": "x" * 1000}),
        ("POST", "/score", {"pairs": [{"user_id": True, "item_id": "1"}]}),
        ("POST", "/score", {"pairs": [{"user_id": "1", "item_id": "1", "extra": 1}]}),
        ("GET", "/recommend?user_id=1&k=5_0", None),
        ("GET", "/recommend?user_id=1&k=%2B5", None),
        ("GET", "/recommend?user_id=1&k=%205", None),
        ("GET", "/similar?item_id=1&k=1_0", None),
    ],
)
def test_strict_request_types(client, method, path, body):
    r = client.request(method, path, json=body)
    assert r.status_code == 422, r.text


def test_unknown_ids_are_named_at_most_five(client):
    ids = [f"nobody-{i}" for i in range(50)]
    r = client.post("/recommend", json={"user_ids": ["1", *ids], "k": 3})
    assert r.status_code == 404
    assert r.json()["unknown"] == {"user_id": ids[:5]} and r.json()["unknown_count"] == 50
    assert r.json()["detail"].endswith("'nobody-4' and 45 more: not in ml-100k")
    long_id = "x" * 10_000
    r = client.get("/recommend", params={"user_id": long_id})
    assert r.json()["unknown"] == {"user_id": ["x" * 63 + "…"]} and len(r.text) < 400


def test_head_health_answers_without_the_key(rec):  # noqa: F811
    client = TestClient(create_app(rec, api_key="s3cret"))
    assert client.head("/health").status_code == 200


# --- checkpoints that cannot be served -----------------------------------------------------


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("text.ckpt", "a text file", "is not a checkpoint that torch.load reads"),
        ("empty.ckpt", "", "is not a checkpoint that torch.load reads"),
        ("cut.ckpt", "half", "is not a checkpoint that torch.load reads (RuntimeError"),
        ("tensor.ckpt", torch.zeros(3), "is not a training checkpoint: it holds a Tensor"),
        ("dict.ckpt", {"weights": torch.zeros(3)}, "it holds a dict of ['weights']"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_gets_one_message(
    name,
    content,
    message,
    ckpt,  # noqa: F811
    data_dir,
    cache_dir,
    tmp_path,
):
    path = tmp_path / name
    if content == "half":
        data = Path(ckpt).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    with pytest.raises(InputError) as refused:  # the check of `python -m recsys.serve`
        checkpoint_state(path)
    assert str(refused.value).startswith(str(path)) and message in str(refused.value)
    assert "pass a" in str(refused.value)  # the fix
    with pytest.raises(InputError, match="torch.load reads|not a training checkpoint"):
        _recommender(path, data_dir, cache_dir, tmp_path)
