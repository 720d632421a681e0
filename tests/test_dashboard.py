"""The dashboard: its settings, the data behind its pages, every page through Streamlit's
`AppTest` on a real tiny model, and (slow) the launched server in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf
from streamlit.testing.v1 import AppTest
from websockets.sync.client import connect

from recsys import dashboard
from recsys.dashboard import app
from recsys.recommender import Recommender
from recsys.train import run as train
from tests.conftest import compose_cfg, compose_train

APP = str(Path(dashboard.__file__).with_name("app.py"))
PAGE_TIMEOUT = 60  # seconds for one AppTest run (the first loads the model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, cache_dir) -> Path:
    """The run folder of a one-epoch NeuMF on ml-100k (explicit ratings, csv log), with
    ``.hydra/overrides.yaml`` as a launched run has. No ranking metrics: ``data.ranking=full``
    would take a minute more (the pages show whatever metrics a run has)."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_train(data_dir, cache_dir, out, "logger=csv", "trainer.max_epochs=1")
    train(cfg)
    (out / ".hydra").mkdir()
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model.gmf_dim=32"]))
    return out


@pytest.fixture(scope="module")
def second_run(trained, tmp_path_factory) -> Path:
    """A second run folder for the Compare page: the first one's figures, lowered, under
    another override and one the first run does not have (compare reads nothing else)."""
    out = tmp_path_factory.mktemp("run2")
    metrics = json.loads((trained / "metrics.json").read_text())
    metrics["test/auroc"] -= 0.05
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / ".hydra").mkdir()
    overrides = ["model.gmf_dim=8", "model.dropout=0.1"]
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return out


def make_settings(data_dir, cache_dir, tmp_path, *overrides: str):
    """`dashboard.settings` of conf/dashboard.yaml composed with ``overrides``."""
    return dashboard.settings(compose_cfg("dashboard", data_dir, cache_dir, tmp_path, *overrides))


@pytest.fixture
def page(monkeypatch):
    """Run one page of the app with the given settings: ``page(settings, "recommend")``."""

    def _run(settings, name: str) -> AppTest:
        monkeypatch.setenv(dashboard.CONFIG_ENV, OmegaConf.to_yaml(settings))
        at = AppTest.from_file(APP, default_timeout=PAGE_TIMEOUT)
        at.query_params["page"] = name
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert [t.value for t in at.title] == [app.PAGES[name][0]]
        return at

    return _run


@pytest.fixture
def model_settings(trained, second_run, data_dir, cache_dir, tmp_path):
    return make_settings(
        data_dir, cache_dir, tmp_path, f"run_dir={trained}", f"runs=[{trained},{second_run}]"
    )


# --- settings -----------------------------------------------------------------------------
def test_settings_refuse_what_cannot_be_shown(data_dir, cache_dir, tmp_path):
    with pytest.raises(ValueError, match="nothing to show: pass run_dir="):
        make_settings(data_dir, cache_dir, tmp_path)
    with pytest.raises(ValueError, match="holds no metrics.json"):
        make_settings(data_dir, cache_dir, tmp_path, f"run_dir={tmp_path}")
    (tmp_path / "metrics.json").write_text(json.dumps({"best_model_path": ""}))
    with pytest.raises(ValueError, match="names no best checkpoint.*ckpt_path="):
        make_settings(data_dir, cache_dir, tmp_path, f"run_dir={tmp_path}")
    with pytest.raises(ValueError, match="ckpt_path=.*nope.ckpt does not exist"):
        make_settings(data_dir, cache_dir, tmp_path, f"ckpt_path={tmp_path}/nope.ckpt")
    with pytest.raises(ValueError, match="runs: .*missing is not a folder"):
        make_settings(data_dir, cache_dir, tmp_path, f"runs=[{tmp_path}/missing]")


def test_settings_from_run_dir_and_command(trained, data_dir, cache_dir, tmp_path):
    cfg = compose_cfg(
        "dashboard", data_dir, cache_dir, tmp_path, f"run_dir={trained}", "serve.port=8765"
    )
    best = json.loads((trained / "metrics.json").read_text())["best_model_path"]
    argv, env = dashboard.streamlit_command(cfg)
    assert argv[1:5] == ["-m", "streamlit", "run", str(dashboard.APP)]
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert argv[argv.index("--server.port") + 1] == "8765"
    settings = OmegaConf.create(env[dashboard.CONFIG_ENV])
    assert settings.ckpt_path == best and settings.run_dir == str(trained)
    # a checkpoint given directly finds its run folder (for the learning curves)
    by_ckpt = make_settings(data_dir, cache_dir, tmp_path, f"ckpt_path={best}")
    assert by_ckpt.run_dir == str(trained)


# --- what the pages show ------------------------------------------------------------------
@pytest.fixture(scope="module")
def rec(trained, data_dir, cache_dir, tmp_path_factory) -> Recommender:
    settings = make_settings(
        data_dir, cache_dir, tmp_path_factory.mktemp("s"), f"run_dir={trained}"
    )
    return dashboard.load_recommender(OmegaConf.to_yaml(settings))


def test_predictions_are_the_models_probabilities(rec):
    frame = dashboard.predictions(rec, ("test",))
    rows = rec.dm.rows["test"].numpy()
    inter = rec.dm.data.interactions
    assert len(frame) == len(rows) and (frame["split"] == "test").all()
    logits = rec.score(inter.users[rows].numpy(), inter.items[rows].numpy())
    np.testing.assert_allclose(frame["probability"], 1 / (1 + np.exp(-logits)), rtol=1e-5)
    np.testing.assert_array_equal(frame["rating"], inter.ratings[rows].numpy())
    one = dashboard.predictions(rec, dashboard.HELD_OUT, ["1"])
    assert set(one["user_id"]) == {"1"} and set(one["split"]) <= {"val", "test"}
    assert len(one) == (rec.history(int(rec.user_codes(["1"])[0]))["split"] != "train").sum()


def test_item_tables(rec):
    recs = dashboard.recommendations(rec, "1", 7)
    seen = set(dashboard.user_history(rec, "1")["item_id"])
    assert len(recs) == 7 and not seen & set(recs["item_id"])
    assert recs["probability"].is_monotonic_decreasing and recs["probability"].between(0, 1).all()
    star_wars = dashboard.search_items(rec, "star wars")
    assert len(star_wars) and rec.item_info["title"].iloc[star_wars].str.contains("Star Wars").all()
    assert dashboard.search_items(rec, "50")[0] == rec.item_codes(["50"])[0]  # then "1950"...
    similar = rec.similar_table(int(star_wars[0]), 5)
    assert len(similar) == 5 and similar["similarity"].is_monotonic_decreasing


def test_run_figures(trained, rec):
    curves = dashboard.learning_curves(trained)
    assert {"train/loss", "val/loss", "val/auroc"} <= set(curves.metric)
    assert not curves.metric.str.startswith("test/").any() and set(curves.epoch) == {0}
    assert dashboard.learning_curves(trained / "csv") is None
    table = dashboard.metrics_table(rec.metrics).set_index("metric")
    assert table.loc["test/auroc", "model"] == rec.metrics["test/auroc"]
    auroc_baseline = rec.metrics["popularity/test/auroc"]
    assert table.loc["test/auroc", "popularity baseline"] == auroc_baseline
    assert not table.index.str.startswith("popularity/").any()


def test_data_figures(rec):
    counts = dashboard.interaction_counts(rec)
    assert counts["rating"]["interactions"].sum() == len(rec.dm.data.interactions)
    assert set(counts["rating"]["rating"]) == {1, 2, 3, 4, 5}
    assert counts["per user"]["interactions"].sum() == len(rec.dm.data.interactions)
    genres = dashboard.item_field_counts(rec.item_info, "genres")
    assert (
        "Drama" in set(genres["value"]) and not genres["value"].str.contains("|", regex=False).any()
    )
    years = dashboard.item_field_counts(rec.item_info, "year")
    assert years["value"].is_monotonic_increasing and years["value"].min() > 1900
    frame = pd.DataFrame({"author": ["A", "A", "B", ""]})
    assert dashboard.item_field_counts(frame, "author").to_dict("list") == {
        "value": ["A", "B"],
        "items": [2, 1],
    }


# --- the pages ----------------------------------------------------------------------------
def test_recommend_page(page, model_settings):
    at = page(model_settings, "recommend")
    user = at.selectbox[0].value
    assert [s.value for s in at.subheader] == [f"History of user {user}", f"Top 10 for user {user}"]
    history, top = (d.value for d in at.dataframe)
    assert len(history) > 0 and {"title", "genres", "rating", "split"} <= set(history.columns)
    assert len(top) == 10 and top["probability"].is_monotonic_decreasing
    at.slider[0].set_value(5).run()
    assert len(at.dataframe[1].value) == 5


def test_similar_page(page, model_settings):
    at = page(model_settings, "similar")
    at.text_input[0].input("star wars").run()
    assert at.selectbox[0].value is not None
    assert at.subheader[0].value.startswith("Nearest to Star Wars")
    neighbours = at.dataframe[1].value
    assert len(neighbours) == 10 and neighbours["similarity"].is_monotonic_decreasing
    at.text_input[0].input("no such title at all").run()
    assert "No item has the id" in at.info[0].value


def test_testing_page(page, model_settings, rec):
    at = page(model_settings, "testing")
    tiles = {m.label: m.value for m in at.metric}
    assert tiles["Checkpoint's test AUROC"] == f"{rec.metrics['test/auroc']:.4f}"
    assert int(tiles["Held-out rows"]) == len(at.dataframe[0].value) > 0
    assert len(at.get("vega_lite_chart")) == 1
    next(r for r in at.radio if r.label == "Rows").set_value("A random sample of users").run()
    frame = at.dataframe[0].value
    assert frame["user_id"].nunique() == 50 and set(frame["split"]) == {"val", "test"}
    assert at.metric[2].value != "n/a"  # both labels among 50 users' rows


def test_performance_page(page, model_settings):
    at = page(model_settings, "performance")
    assert [s.value for s in at.subheader] == [
        "Test metrics",
        "Learning curves",
        "Predicted scores on the test rows",
        "The data",
    ]
    assert [m.label for m in at.metric] == ["test/auroc"]  # the headline figures it has
    assert not at.info
    # learning curves 2, score histogram, 3 interaction charts, year and genre counts
    assert len(at.get("vega_lite_chart")) == 8


def test_compare_page(page, model_settings, trained, second_run):
    at = page(model_settings, "compare")
    table = at.dataframe[0].value
    assert list(table["run"]) == [str(trained), str(second_run)]  # best test/auroc first
    assert list(table["model.gmf_dim"]) == ["32", "8"]
    assert list(table["model.dropout"]) == ["(default)", "0.1"]
    assert len(at.image) == 1
    at.text_area[0].input("").run()
    assert "No runs to compare" in at.info[0].value


def test_pages_without_their_input(page, trained, data_dir, cache_dir, tmp_path):
    runs_only = make_settings(data_dir, cache_dir, tmp_path, f"runs=[{tmp_path}]")
    for name in ("recommend", "similar", "testing", "performance"):
        assert page(runs_only, name).info[0].value == app.NO_MODEL
    assert "no metrics.json below" in page(runs_only, "compare").info[0].value
    # a checkpoint outside its run folder: no metrics.json, no learning curves
    alone = tmp_path / "model.ckpt"
    shutil.copy(json.loads((trained / "metrics.json").read_text())["best_model_path"], alone)
    at = page(make_settings(data_dir, cache_dir, tmp_path, f"ckpt_path={alone}"), "performance")
    assert [i.value.split(":")[0].split(" in ")[0] for i in at.info] == [
        "No test metrics for this checkpoint",
        "No csv/metrics.csv",
    ]
    assert "is not in a training run folder" in at.info[0].value


@pytest.fixture(scope="module")
def implicit_run(tmp_path_factory, data_dir, cache_dir) -> Path:
    """The run folder of an implicit-feedback NeuMF (BCE, 4 sampled negatives per positive),
    20 steps, whose last.ckpt (written every 7 steps: step 14) is not the best checkpoint it
    tested (step 20)."""
    out = tmp_path_factory.mktemp("implicit")
    overrides = [
        "data.feedback=implicit",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=20",
        "callbacks.last_checkpoint.every_n_train_steps=7",
    ]
    train(compose_train(data_dir, cache_dir, out, *overrides))
    return out


def chart_encodings(at: AppTest, channel: str) -> list[dict]:
    """The ``channel`` (x, y) encoding of every chart on the page."""
    specs = [json.loads(chart.proto.spec) for chart in at.get("vega_lite_chart")]
    return [spec["encoding"][channel] for spec in specs if channel in spec.get("encoding", {})]


def test_implicit_feedback_scores_are_logits(page, implicit_run, data_dir, cache_dir, tmp_path):
    """sigmoid(logit) of a model trained against sampled negatives is no probability of an
    interaction: the pages show logits, on axes of their own range."""
    settings = make_settings(data_dir, cache_dir, tmp_path, f"run_dir={implicit_run}")
    rec = dashboard.load_recommender(OmegaConf.to_yaml(settings))
    assert not rec.calibrated and dashboard.score_column(rec) == "logit"
    frame = dashboard.predictions(rec, ("test",))
    rows = rec.dm.rows["test"].numpy()
    inter = rec.dm.data.interactions
    logits = rec.score(inter.users[rows].numpy(), inter.items[rows].numpy())
    np.testing.assert_allclose(frame["logit"], logits)
    assert "probability" not in frame
    assert "probability" not in dashboard.recommendations(rec, "1", 5)
    at = page(settings, "testing")
    (y,) = chart_encodings(at, "y")
    assert y["title"] == "predicted logit" and "domain" not in y.get("scale", {})
    assert "Logits, not probabilities" in at.caption[0].value
    assert "among 1 positive and 4 sampled negatives" in at.caption[0].value
    at = page(settings, "performance")
    assert "predicted logit" in [x.get("title") for x in chart_encodings(at, "x")]


def test_a_checkpoint_its_run_did_not_test_shows_no_test_metrics(
    page, implicit_run, data_dir, cache_dir, tmp_path
):
    measured = json.loads((implicit_run / "metrics.json").read_text())
    best = make_settings(data_dir, cache_dir, tmp_path, f"run_dir={implicit_run}")
    tiles = {m.label: m.value for m in page(best, "testing").metric}
    assert tiles["Checkpoint's test AUROC"] == f"{measured['test/auroc']:.4f}"
    last = implicit_run / "checkpoints" / "last.ckpt"
    settings = make_settings(data_dir, cache_dir, tmp_path, f"ckpt_path={last}")
    at = page(settings, "performance")
    assert not at.metric  # no headline figures of another checkpoint
    info = at.info[0].value
    assert info.startswith("No test metrics for this checkpoint: ")
    assert "(epoch 0, step 20), not of this checkpoint (epoch 0, step 14)" in info
    assert f"python evaluate.py ckpt_path={last}" in info
    assert "no test metrics" in at.sidebar.markdown[0].value
    tiles = {m.label: m.value for m in page(settings, "testing").metric}
    assert tiles["Checkpoint's test AUROC"] == "n/a"


# --- the launched dashboard in a browser ---------------------------------------------------
# page -> text that shows it rendered with the model's answers
KEY_TEXT = {
    "recommend": "Top 10 for user",
    "similar": "Nearest to",
    "testing": "AUROC on these rows",
    "performance": "Predicted scores on the test rows",
    "compare": "2 runs;",
}


class Chromium:
    """Headless Chromium driven over the DevTools protocol: Streamlit renders over a
    websocket after the page has loaded, so the test polls the page instead of relying on
    ``--virtual-time-budget``."""

    def __init__(self, binary: str, profile: Path, width: int = 1400, height: int = 1000):
        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError(f"{binary} did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as response:
            target = next(t for t in json.load(response) if t["type"] == "page")
        self.socket = connect(target["webSocketDebuggerUrl"], max_size=None)
        self.calls = 0

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries the call's id
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def open(self, url: str, text: str, timeout: float = 90) -> str:
        """Go to ``url`` and wait until ``text`` shows and the page has stopped changing;
        returns the page's text."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        idle = (
            "!document.querySelector('[data-testid=\"stStatusWidget\"]') && "
            "!document.querySelector('[data-testid=\"stSkeleton\"]') && "
            "Array.from(document.images).every(i => i.complete)"
        )
        body, unchanged = "", 0
        while time.monotonic() < deadline:
            time.sleep(0.5)
            previous, body = body, self.evaluate("document.body.innerText") or ""
            unchanged = unchanged + 1 if body == previous else 0
            # the running indicator shows only after a while: wait for 3 s without change
            if text in body and unchanged >= 6 and self.evaluate(idle):
                return body
        raise AssertionError(f"{url} did not show {text!r} in {timeout} s; it shows:\n{body}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dashboard_in_browser(trained, second_run, data_dir, cache_dir, tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("no chromium binary: .ci/run installs it (apt-get install -y chromium)")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "recsys.dashboard",
        f"run_dir={trained}",
        f"runs=[{trained},{second_run}]",
        f"serve.port={port}",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    log = (tmp_path / "dashboard.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    shots = Path(os.environ.get("RECSYS_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    browser = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health") as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"the dashboard did not start: {(tmp_path / 'dashboard.log').read_text()}"
                )
            time.sleep(0.5)
        browser = Chromium(binary, tmp_path / "profile")
        for name, text in KEY_TEXT.items():
            body = browser.open(f"http://127.0.0.1:{port}/?page={name}", text)
            browser.screenshot(shots / f"dashboard_{name}.png")
            assert "Traceback" not in body, body
            assert (
                browser.evaluate(
                    "document.querySelectorAll('[data-testid=\"stException\"]').length"
                )
                == 0
            ), body
            assert app.PAGES[name][0] in body
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert all((shots / f"dashboard_{name}.png").stat().st_size > 10_000 for name in KEY_TEXT)
