"""A Streamlit dashboard over a trained model and its runs (conf/dashboard.yaml).

    python -m recsys.dashboard run_dir=<run folder> [runs=[<run or sweep folders>]]
    python -m recsys.dashboard ckpt_path=<run>/checkpoints/<name>.ckpt [serve.port=8501]

Pages (sidebar, or ``?page=<name>`` in the address): ``recommend`` (a user's history beside
their top-K), ``similar`` (an item's nearest items), ``testing`` (predicted scores against the
held-out ratings), ``performance`` (learning curves, test metrics, score and data
distributions) and ``compare`` (the table of `recsys.compare` over ``runs``).

`run` checks the config, resolves every path and hands it to ``streamlit run app.py`` in the
environment variable ``RECSYS_DASHBOARD_CONFIG``, as serve does for its workers; the app reads
it back with `settings_from_env`. The functions here build what the pages show from a
`Recommender`: every score comes from `Recommender.score` or `Recommender.recommend`.
"""

from __future__ import annotations

import logging
import os
import sys
from html import escape
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from recsys.errors import InputError, require_extra

require_extra("dashboard", "streamlit")  # before its first import

import streamlit as st  # noqa: E402

from recsys import compare  # noqa: E402
from recsys.checkpoint import best_checkpoint, run_dir_from_config, run_folder  # noqa: E402
from recsys.recommender import Recommender  # noqa: E402

log = logging.getLogger(__name__)

CONFIG_ENV = "RECSYS_DASHBOARD_CONFIG"  # the resolved settings, for the Streamlit process
APP = Path(__file__).with_name("app.py")
HELD_OUT = ("val", "test")
SCORE_CHUNK = 65536  # rows per forward pass when scoring many interactions


# --- configuration ------------------------------------------------------------------------
def settings(cfg: DictConfig) -> DictConfig:
    """What the app needs from ``cfg``, checked, with absolute paths: ``ckpt_path`` (from
    ``run_dir`` when not given), ``run_dir`` (the checkpoint's run when not given; None
    outside a run), ``runs``, ``k``, ``paths`` (data_dir, cache_dir), ``data`` and
    ``allow_new_data``. ``ckpt_path`` is None for a dashboard of ``runs`` only."""
    ckpt, run_dir = cfg.get("ckpt_path"), cfg.get("run_dir")
    runs = [Path(p).resolve() for p in cfg.get("runs") or []]
    if ckpt is None and run_dir is None and not runs:
        raise InputError(
            "nothing to show: pass run_dir=<training run folder>, "
            "ckpt_path=<run>/checkpoints/<name>.ckpt or runs=[<run or sweep folders>]"
        )
    if run_dir is not None:
        run_dir = run_dir_from_config(cfg).resolve()
        if not run_dir.is_dir():
            raise InputError(f"run_dir={run_dir} is not a folder; pass a training run's folder")
    if ckpt is not None:
        ckpt = Path(ckpt).resolve()
        if not ckpt.exists():
            raise InputError(f"ckpt_path={ckpt} does not exist; pass a training checkpoint")
        run_dir = run_dir or run_folder(ckpt)
    elif run_dir is not None:
        ckpt = best_checkpoint(run_dir)
    for folder in runs:
        if not folder.is_dir():
            raise InputError(f"runs: {folder} is not a folder; pass run or sweep folders")
    data = cfg.get("data")
    return OmegaConf.create(
        {
            "ckpt_path": None if ckpt is None else str(ckpt),
            "run_dir": None if run_dir is None else str(run_dir),
            "runs": [str(p) for p in runs],
            "k": int(cfg.get("k", 10)),
            "paths": {
                "data_dir": str(Path(cfg.paths.data_dir).resolve()),
                "cache_dir": str(Path(cfg.paths.cache_dir).resolve()),
            },
            "data": OmegaConf.to_container(data, resolve=True) if data is not None else {},
            "allow_new_data": bool(cfg.get("allow_new_data", False)),
        }
    )


def settings_from_env() -> DictConfig:
    """The settings that `run` passed to the Streamlit process."""
    if CONFIG_ENV not in os.environ:
        raise ValueError(
            f"{CONFIG_ENV} is not set: start the dashboard with "
            "python -m recsys.dashboard run_dir=<run folder> (or ckpt_path=..., runs=[...])"
        )
    return OmegaConf.create(os.environ[CONFIG_ENV])


def streamlit_command(cfg: DictConfig) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` command line and its environment (with the settings)."""
    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        str(cfg.serve.host),
        "--server.port",
        str(cfg.serve.port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]
    env = {**os.environ, CONFIG_ENV: OmegaConf.to_yaml(settings(cfg))}
    return argv, env


def run(cfg: DictConfig) -> None:
    """Serve the dashboard until stopped (Ctrl-C): this process becomes ``streamlit run``,
    so stopping it stops the server."""
    argv, env = streamlit_command(cfg)
    log.info("dashboard on http://%s:%d", cfg.serve.host, cfg.serve.port)
    os.execve(sys.executable, argv, env)


# --- loading ------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the model and its data...")
def load_recommender(settings_yaml: str) -> Recommender:
    """The `Recommender` of the settings' checkpoint, once per process."""
    cfg = OmegaConf.create(settings_yaml)
    return Recommender.from_config(
        OmegaConf.masked_copy(cfg, ["ckpt_path", "paths", "data", "allow_new_data"])
    )


@st.cache_resource(ttl=60, show_spinner=False)
def load_runs(paths: tuple[str, ...]) -> pd.DataFrame:
    """`recsys.compare.load_runs`, reread at most once a minute (sweeps may still run)."""
    return compare.load_runs([Path(p) for p in paths])


# --- what the pages show ------------------------------------------------------------------
def score_column(rec: Recommender) -> str:
    """The name of the shown score: ``probability`` for calibrated models (binary
    cross-entropy on explicit feedback), else ``logit``."""
    return "probability" if rec.calibrated else "logit"


def shown_scores(rec: Recommender, logits: np.ndarray) -> np.ndarray:
    """Probabilities for calibrated models, else the logits."""
    return rec.probabilities(logits) if rec.calibrated else logits


def score_meaning(rec: Recommender) -> str:
    """What the shown score is, in a sentence."""
    if rec.calibrated:
        return "Probabilities: the sigmoid of the logit, the chance of a positive label."
    if rec.model.hparams.loss == "bpr":
        return "Logits, not probabilities: BPR logits only order items."
    return (
        "Logits, not probabilities: under implicit feedback the sigmoid of a logit is the "
        f"chance that a pair is the positive among 1 positive and {rec.dm.num_negatives} "
        "sampled negatives."
    )


def user_activity(rec: Recommender) -> pd.Series:
    """Interactions per raw user id (every split), most active users first."""
    counts = torch.bincount(rec.dm.data.interactions.users, minlength=rec.num_users).numpy()
    return (
        pd.Series(counts, index=rec.user_index, name="interactions")
        .sort_values(ascending=False, kind="stable")
        .rename_axis("user_id")
    )


def display_fields(rec: Recommender) -> list[str]:
    """The item columns shown in tables: id, title and the dataset's fields, no image URL."""
    return [c for c in rec.item_info.columns if c != "image_url"]


def user_history(rec: Recommender, user_id: str) -> pd.DataFrame:
    """The user's interactions for display: item fields, rating, split and date (when the
    data has timestamps), newest first."""
    frame = rec.history(int(rec.user_codes([user_id])[0]))
    if (frame["timestamp"] > 0).any():
        frame["date"] = pd.to_datetime(frame["timestamp"], unit="s").dt.date
    return frame.drop(columns=["timestamp"]).reset_index(drop=True)


def recommendations(
    rec: Recommender, user_id: str, k: int, exclude_seen: bool = True
) -> pd.DataFrame:
    """The user's top-k items with their fields (``image_url`` included) and scores."""
    codes, logits = rec.recommend(rec.user_codes([user_id]), k, exclude_seen)
    frame = rec.item_info.iloc[codes[0]].reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    frame[score_column(rec)] = shown_scores(rec, logits[0])
    return frame


def search_items(rec: Recommender, query: str, limit: int = 100) -> np.ndarray:
    """Item codes: the item whose id is ``query``, then those whose title contains it
    (case-insensitive), most popular first; the most popular items for an empty query."""
    query = query.strip()
    popular = rec.popular.numpy()
    if not query:
        return popular[:limit]
    info = rec.item_info.iloc[popular]
    same_id = (info["item_id"] == query).to_numpy()
    in_title = info["title"].str.contains(query, case=False, regex=False, na=False).to_numpy()
    return np.concatenate([popular[same_id], popular[in_title & ~same_id]])[:limit]


def predictions(
    rec: Recommender, splits: tuple[str, ...], user_ids: list[str] | None = None
) -> pd.DataFrame:
    """The model's scores of the rows of ``splits`` (of ``user_ids`` only, when given),
    beside what happened: ``user_id``, ``item_id``, ``title``, ``rating``, ``label``,
    ``split`` and the score (`score_column`)."""
    inter = rec.dm.data.interactions
    wanted = None if user_ids is None else torch.as_tensor(rec.user_codes(user_ids))
    parts = []
    for split in splits:
        rows = rec.dm.rows[split]
        if wanted is not None:
            rows = rows[torch.isin(inter.users[rows], wanted)]
        parts.append((split, rows))
    rows = torch.cat([r for _, r in parts])
    users, items = inter.users[rows].numpy(), inter.items[rows].numpy()
    logits = np.concatenate(
        [
            rec.score(users[i : i + SCORE_CHUNK], items[i : i + SCORE_CHUNK])
            for i in range(0, len(rows), SCORE_CHUNK)
        ]
        or [np.empty(0, dtype=np.float32)]
    )
    return pd.DataFrame(
        {
            "user_id": rec.user_index[users],
            "item_id": rec.item_index[items],
            "title": rec.item_info["title"].to_numpy()[items],
            "rating": inter.ratings[rows].numpy(),
            "label": inter.labels[rows].numpy().astype(int),
            "split": np.repeat([s for s, _ in parts], [len(r) for _, r in parts]),
            score_column(rec): shown_scores(rec, logits),
        }
    )


def metrics_table(metrics: dict) -> pd.DataFrame:
    """The run's metrics (``<stage>/<name>``), one row each, with the popularity baseline's
    value of the same metric beside it (``popularity/test/auroc`` beside ``test/auroc``)."""
    numbers = {k: v for k, v in metrics.items() if "/" in k and isinstance(v, int | float)}
    baseline = {k.removeprefix("popularity/"): v for k, v in numbers.items() if "popularity/" in k}
    rows = [
        {"metric": k, "model": v, "popularity baseline": baseline.get(k, np.nan)}
        for k, v in sorted(numbers.items())
        if not k.startswith("popularity/")
    ]
    return pd.DataFrame(rows, columns=["metric", "model", "popularity baseline"])


def learning_curves(run_dir: Path) -> pd.DataFrame | None:
    """The logged figures per epoch from ``<run>/csv/metrics.csv``, long: ``epoch``,
    ``metric``, ``value`` (the epoch's last value; ``train/loss`` is the epoch mean). None
    without the log. The test figures, logged once after training, are left out."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    # runs logged before the epoch mean was logged once per epoch call it train/loss_epoch
    log_frame = pd.read_csv(path).rename(columns={"train/loss_epoch": "train/loss"})
    figures = [
        c
        for c in log_frame.columns
        if c.startswith(("train/", "val/"))
        and c not in ("train/loss_step", "train/samples_per_sec")
    ]
    curves = (
        log_frame.melt(id_vars="epoch", value_vars=figures, var_name="metric")
        .dropna(subset=["value"])
        .groupby(["metric", "epoch"], as_index=False)
        .last()
    )
    return curves[["epoch", "metric", "value"]]


def interaction_counts(rec: Recommender) -> dict[str, pd.DataFrame]:
    """Distributions of the interactions (every split): ``rating`` (rows per rating value)
    and ``per user`` / ``per item`` (interactions of each user / item)."""
    inter = rec.dm.data.interactions
    ratings = pd.Series(inter.ratings.numpy()).value_counts().sort_index()
    return {
        "rating": ratings.rename_axis("rating").reset_index(name="interactions"),
        "per user": pd.DataFrame(
            {"interactions": torch.bincount(inter.users, minlength=rec.num_users).numpy()}
        ),
        "per item": pd.DataFrame(
            {"interactions": torch.bincount(inter.items, minlength=rec.num_items).numpy()}
        ),
    }


def item_field_counts(item_info: pd.DataFrame, field: str, top: int = 20) -> pd.DataFrame:
    """Items per value of a display field (``value``, ``items``): every year for ``year``,
    each of the ``|``-separated values for multi-valued fields (genres), else the ``top``
    most frequent values (authors, publishers). Empty values and years 0 are left out."""
    values = item_info[field].astype(str).str.strip()
    values = values[values.ne("") & values.ne("0")]
    if values.str.contains("|", regex=False).any():
        values = values.str.split("|").explode()
    counts = values.value_counts().rename_axis("value").reset_index(name="items")
    if field == "year":
        counts["value"] = pd.to_numeric(counts["value"], errors="coerce")
        return counts.dropna().sort_values("value").reset_index(drop=True)
    return counts.head(top)


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The numeric metrics of the compared runs (named ``<stage>/<metric>``)."""
    return [c for c in runs if "/" in c and pd.api.types.is_numeric_dtype(runs[c])]


# the cover shown where an item has no image URL or its image does not load
PLACEHOLDER = "data:image/svg+xml," + quote(
    '<svg xmlns="http://www.w3.org/2000/svg" width="120" height="180">'
    '<rect width="120" height="180" fill="#e8e8ee"/>'
    '<rect x="30" y="50" width="60" height="80" rx="4" fill="none" stroke="#9a9aae" '
    'stroke-width="4"/><path d="M42 70h36M42 86h36M42 102h24" stroke="#9a9aae" '
    'stroke-width="4"/><text x="60" y="158" font-family="sans-serif" font-size="13" '
    'fill="#7a7a8e" text-anchor="middle">no cover</text></svg>'
)


COVER_STYLE = (
    "<style>.recsys-cards{display:flex;flex-wrap:wrap;gap:14px;font-size:0.8rem;"
    "line-height:1.25}.recsys-cards>div{width:130px}.recsys-cover{width:120px;height:180px;"
    f"border-radius:4px;overflow:hidden;margin-bottom:4px;background:url('{PLACEHOLDER}') "
    "center/cover}.recsys-cover img{position:relative;display:block;width:100%;height:100%;"
    "object-fit:cover}.recsys-cover img::before{content:'';position:absolute;inset:0;"
    f"background:url('{PLACEHOLDER}') center/cover}}</style>"
)


def cover_cards(frame: pd.DataFrame, score: str | None = None) -> str:
    """HTML (for ``st.html``) of one card per item: the cover from ``image_url`` or a
    placeholder, the title (the id for items without one), author and year when the data has
    them, and the ``score`` column when given.

    An image that does not load shows the placeholder too, with no script (Streamlit strips
    ``onerror``): the card's background is the placeholder, and so is the ``::before`` of the
    image, which browsers draw over an image only when it is broken.

    Example::

        >>> html = cover_cards(pd.DataFrame({"item_id": ["1"], "title": [""], "image_url": [""]}))
        >>> "<b>1</b>" in html and PLACEHOLDER in html and "<img" not in html
        True
    """
    cards = []
    for row in frame.to_dict("records"):
        url = str(row.get("image_url") or "")
        image = f'<img src="{escape(url)}" alt="" loading="lazy">' if url else ""
        lines = [f"<b>{escape(str(row['title'] or row['item_id']))}</b>"]
        byline = " · ".join(str(row[f]) for f in ("author", "year") if str(row.get(f) or ""))
        if byline:
            lines.append(escape(byline))
        if score is not None:
            lines.append(f"{score} {row[score]:.3f}")
        cards.append(f'<div><div class="recsys-cover">{image}</div>{"<br>".join(lines)}</div>')
    return f'{COVER_STYLE}<div class="recsys-cards">{"".join(cards)}</div>'
