"""The dashboard's Streamlit script, one function per page; `recsys.dashboard.run` starts it
(``streamlit run app.py`` with the settings in ``RECSYS_DASHBOARD_CONFIG``)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics.functional.classification import binary_auroc

from recsys import compare, dashboard
from recsys.errors import InputError
from recsys.recommender import Recommender

# the headline figures of the Performance page, where the run has them
HEADLINE = [
    "test/auroc",
    "test/hr@10",
    "test/ndcg@10",
    "test/coverage@10",
    "test/novelty@10",
    "test/personalization@10",
]
FIT_KEYS = ("best_epoch", "best_step", "last_epoch", "last_step")  # where val/* come from
LABEL_NAMES = {0: "negative", 1: "positive"}
LABEL_COLOURS = alt.Scale(domain=["negative", "positive"], range=["#e45756", "#4c78a8"])
NO_MODEL = (
    "No model to show: start the dashboard with run_dir=<training run folder> or "
    "ckpt_path=<checkpoint> for this page."
)


def model(cfg: DictConfig) -> Recommender | None:
    """The settings' model (loaded once per process) with its summary in the sidebar; None,
    with the reason on the page, when there is none or it does not load."""
    if cfg.ckpt_path is None:
        st.info(NO_MODEL)
        return None
    try:
        rec = dashboard.load_recommender(OmegaConf.to_yaml(cfg))
    except (ValueError, FileNotFoundError) as e:
        st.error(f"Could not load {cfg.ckpt_path}: {e}")
        return None
    meta = rec.metadata()
    auroc = (rec.metrics or {}).get("test/auroc")
    st.sidebar.markdown(
        f"**{meta['data']['source']}** · {meta['model']['net'].rsplit('.', 1)[-1]}  \n"
        f"{rec.num_users:,} users · {rec.num_items:,} items  \n"
        + (f"test AUROC {auroc:.4f}" if auroc is not None else "no test metrics"),
        help=rec.metrics_note,
    )
    st.sidebar.caption(str(rec.ckpt_path))
    return rec


def item_table(rec: Recommender, frame: pd.DataFrame, lead: list[str]) -> None:
    """``frame`` as a table: the ``lead`` columns (rank, score, rating...), then the title and
    the dataset's fields, the raw item id last."""
    fields = [f for f in dashboard.display_fields(rec) if f not in ("item_id", "title")]
    st.dataframe(
        frame[[*lead, "title", *fields, "item_id"]],
        hide_index=True,
        column_config={"title": st.column_config.TextColumn(width="medium")},
    )


def has_covers(rec: Recommender) -> bool:
    return "image_url" in rec.item_info.columns


def recommend_page(cfg: DictConfig) -> None:
    rec = model(cfg)
    if rec is None:
        return
    activity = dashboard.user_activity(rec)
    labels = dict(zip(activity.index, activity.to_numpy(), strict=True))
    pick, top, unseen = st.columns([3, 2, 1], vertical_alignment="bottom")
    user = pick.selectbox(
        "User (type to search the raw ids; most active first)",
        activity.index,
        format_func=lambda u: f"{u} · {labels[u]} interactions",
    )
    k = top.slider("Top K", 1, 50, min(cfg.k, 50))
    exclude_seen = unseen.checkbox("Unseen items only", value=True)
    history = dashboard.user_history(rec, user)
    recs = dashboard.recommendations(rec, user, k, exclude_seen)
    score = dashboard.score_column(rec)
    left, right = st.columns(2)
    with left:
        counts = history["split"].value_counts()
        st.subheader(f"History of user {user}")
        st.caption(", ".join(f"{counts.get(s, 0)} {s}" for s in ("train", "val", "test")))
        item_table(rec, history, ["rating", "split", *(["date"] if "date" in history else [])])
    with right:
        st.subheader(f"Top {k} for user {user}")
        st.caption(dashboard.score_meaning(rec))
        if has_covers(rec):
            st.html(dashboard.cover_cards(recs, score))
            with st.expander("As a table"):
                item_table(rec, recs, ["rank", score])
        else:
            item_table(rec, recs, ["rank", score])


def similar_page(cfg: DictConfig) -> None:
    rec = model(cfg)
    if rec is None:
        return
    search, top = st.columns([4, 1], vertical_alignment="bottom")
    query = search.text_input("Search an item by title or id", placeholder="e.g. Star Wars")
    k = top.slider("Neighbours", 1, 50, min(cfg.k, 50))
    codes = dashboard.search_items(rec, query)
    if len(codes) == 0:
        st.info(f"No item has the id {query!r} or a title containing it.")
        return
    titles, ids = rec.item_info["title"].to_numpy(), rec.item_index
    item = st.selectbox(
        f"Item ({len(codes)} matches, most popular first)"
        if query.strip()
        else f"Item (the {len(codes)} most popular)",
        codes.tolist(),
        format_func=lambda c: f"{titles[c]} ({ids[c]})",
    )
    chosen = rec.item_info.iloc[[item]]
    st.subheader(f"Nearest to {titles[item]}")
    st.caption("cosine similarity of the model's item vectors")
    neighbours = rec.similar_table(item, k)
    if has_covers(rec):
        card, cards = st.columns([1, 6])
        card.html(dashboard.cover_cards(chosen))
        cards.html(dashboard.cover_cards(neighbours, "similarity"))
    else:
        item_table(rec, chosen, [])
    item_table(rec, neighbours, ["rank", "similarity"])


def testing_page(cfg: DictConfig) -> None:
    rec = model(cfg)
    if rec is None:
        return
    inter = rec.dm.data.interactions
    held_out = torch.cat([rec.dm.rows[s] for s in dashboard.HELD_OUT])
    candidates = dashboard.user_activity(rec)
    candidates = candidates[candidates.index.isin(rec.user_index[inter.users[held_out].numpy()])]
    mode = st.radio("Rows", ["One user", "A random sample of users"], horizontal=True)
    if mode == "One user":
        users = [
            st.selectbox(
                "User (with held-out rows; most active first)",
                candidates.index,
                format_func=lambda u: f"{u} · {candidates[u]} interactions",
            )
        ]
    else:
        size, seed = st.columns(2)
        n = size.slider("Users", 1, min(500, len(candidates)), min(50, len(candidates)))
        rng = np.random.default_rng(int(seed.number_input("Seed", 0, value=0)))
        users = rng.choice(candidates.index.to_numpy(), n, replace=False).tolist()
    frame = dashboard.predictions(rec, dashboard.HELD_OUT, users)
    score = dashboard.score_column(rec)
    test_auroc = (rec.metrics or {}).get("test/auroc")
    tiles = st.columns(3)
    tiles[0].metric("Held-out rows", f"{len(frame):,}")
    tiles[1].metric(
        "Checkpoint's test AUROC",
        "n/a" if test_auroc is None else f"{test_auroc:.4f}",
        help=rec.metrics_note,
    )
    if frame["label"].nunique() == 2:
        shown = binary_auroc(
            torch.tensor(frame[score].to_numpy()), torch.tensor(frame["label"].to_numpy())
        )
        tiles[2].metric("AUROC on these rows", f"{float(shown):.4f}")
    else:
        tiles[2].metric("AUROC on these rows", "n/a", help="needs both labels among the rows")
    st.caption(
        f"{score} of each val/test row against the rating given; colour: the label the "
        f"model was trained to predict ({rec.dm.feedback} feedback). "
        + dashboard.score_meaning(rec)
    )
    strip = (
        alt.Chart(frame.assign(label=frame["label"].map(LABEL_NAMES)))
        .transform_calculate(jitter="random()")
        .mark_circle(size=45, opacity=0.65)
        .encode(
            x=alt.X("rating:O", title="actual rating", axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("jitter:Q"),
            y=alt.Y(
                f"{score}:Q",
                title=f"predicted {score}",
                scale=alt.Scale(domain=[0, 1]) if rec.calibrated else alt.Scale(zero=False),
            ),
            color=alt.Color("label:N", title="label", scale=LABEL_COLOURS),
            tooltip=["user_id", "title", "rating", "split", alt.Tooltip(score, format=".3f")],
        )
        .properties(height=380)
    )
    st.altair_chart(strip, width="stretch")
    st.dataframe(frame.sort_values(score, ascending=False), hide_index=True)


@st.cache_resource(show_spinner="Scoring the test rows...")
def test_predictions(_rec: Recommender, ckpt_path: str) -> pd.DataFrame:
    """`dashboard.predictions` of every test row, once per checkpoint."""
    return dashboard.predictions(_rec, ("test",))


def bar_chart(frame: pd.DataFrame, x: str, y: str, title: str, x_title: str, years: bool) -> None:
    """Bars of ``y`` per ``x``: categories in the frame's order, or years on a number line."""
    axis = (
        alt.X(f"{x}:Q", title=x_title, axis=alt.Axis(format="d"))
        if years
        else alt.X(f"{x}:N", title=x_title, sort=None, axis=alt.Axis(labelAngle=-45))
    )
    chart = (
        alt.Chart(frame, title=title)
        .mark_bar()
        .encode(x=axis, y=alt.Y(f"{y}:Q", title=y), tooltip=[x, y])
        .properties(height=260)
    )
    st.altair_chart(chart, width="stretch")


def histogram(frame: pd.DataFrame, x: str, title: str) -> None:
    chart = (
        alt.Chart(frame, title=title)
        .mark_bar()
        .encode(x=alt.X(f"{x}:Q", bin=alt.Bin(maxbins=40)), y=alt.Y("count():Q", title="count"))
        .properties(height=260)
    )
    st.altair_chart(chart, width="stretch")


def performance_page(cfg: DictConfig) -> None:
    rec = model(cfg)
    if rec is None:
        return
    st.subheader("Test metrics")
    if rec.metrics is None:
        st.info(f"No test metrics for this checkpoint: {rec.metrics_note}.")
    else:
        table = dashboard.metrics_table(rec.metrics).set_index("metric")
        headline = [m for m in HEADLINE if m in table.index]
        for tile, name in zip(st.columns(max(len(headline), 1)), headline, strict=False):
            value, base = table.loc[name]
            tile.metric(
                name,
                f"{value:.4f}",
                None if np.isnan(base) else f"{value - base:+.4f} vs popularity",
            )
        best = {k: v for k, v in rec.metrics.items() if k in FIT_KEYS}
        st.caption(
            "the figures of the tested checkpoint ("
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in best.items())
            + ") and of the popularity baseline on the same rows"
        )
        number = st.column_config.NumberColumn(format="%.4f")
        st.dataframe(table, column_config={"model": number, "popularity baseline": number})

    st.subheader("Learning curves")
    curves = dashboard.learning_curves(Path(cfg.run_dir)) if cfg.run_dir else None
    if curves is None:
        where = cfg.run_dir or f"a run folder above {rec.ckpt_path}"
        st.info(f"No csv/metrics.csv in {where}: train with logger=csv (the default) for these.")
    else:
        losses, figures = st.columns(2)
        loss = curves[curves.metric.str.contains("loss")]
        others = sorted(set(curves.metric) - set(loss.metric))
        with losses:
            line_chart(loss, "loss per epoch")
        with figures:
            if others:
                preferred = [m for m in ("val/ndcg@10", "val/auroc") if m in others]
                default = others.index(preferred[0]) if preferred else 0
                shown = st.selectbox("Validation metric", others, index=default)
                line_chart(curves[curves.metric == shown], f"{shown} per epoch")

    st.subheader("Predicted scores on the test rows")
    scores = test_predictions(rec, str(rec.ckpt_path))
    score = dashboard.score_column(rec)
    scores = scores.assign(label=scores["label"].map(LABEL_NAMES))
    chart = (
        alt.Chart(scores)
        .mark_bar(opacity=0.6)
        .encode(
            x=alt.X(f"{score}:Q", bin=alt.Bin(maxbins=50), title=f"predicted {score}"),
            y=alt.Y("count():Q", stack=None, title="test rows"),
            color=alt.Color("label:N", title="label", scale=LABEL_COLOURS),
        )
        .properties(height=280)
    )
    st.altair_chart(chart, width="stretch")
    st.caption(f"{len(scores):,} test rows, by their label. {dashboard.score_meaning(rec)}")

    st.subheader("The data")
    counts = dashboard.interaction_counts(rec)
    cols = st.columns(3)
    with cols[0]:
        bar_chart(counts["rating"], "rating", "interactions", "Ratings", "rating", years=False)
    with cols[1]:
        histogram(counts["per user"], "interactions", "Interactions per user")
    with cols[2]:
        histogram(counts["per item"], "interactions", "Interactions per item")
    fields = [f for f in dashboard.display_fields(rec) if f not in ("item_id", "title")]
    for col, field in zip(st.columns(max(len(fields), 1)), fields, strict=False):
        with col:
            values = dashboard.item_field_counts(rec.item_info, field)
            bar_chart(values, "value", "items", f"Items by {field}", field, field == "year")


def line_chart(curves: pd.DataFrame, title: str) -> None:
    chart = (
        alt.Chart(curves, title=title)
        .mark_line(point=True)
        .encode(
            x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("value:Q", scale=alt.Scale(zero=False)),
            color="metric:N",
            tooltip=["metric", "epoch", alt.Tooltip("value", format=".4f")],
        )
        .properties(height=280)
    )
    st.altair_chart(chart, width="stretch")


def compare_page(cfg: DictConfig) -> None:
    text = st.text_area(
        "Run or sweep folders, one per line (every folder below them with a metrics.json)",
        value="\n".join(cfg.runs),
    )
    paths = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not paths:
        st.info("No runs to compare: enter folders above, or start with runs=[<folders>].")
        return
    try:
        runs = dashboard.load_runs(paths)
    except FileNotFoundError as e:
        st.info(str(e))
        return
    metrics = [m for m in dashboard.metric_columns(runs) if runs[m].notna().any()]
    if not metrics:
        st.info("The runs hold no numeric metrics.")
        return
    columns = st.multiselect(
        "Metrics in the table",
        metrics,
        default=[c for c in compare.DEFAULT_COLUMNS if c in metrics] or metrics[:3],
    )
    metric = st.selectbox(
        "Chart metric", metrics, index=metrics.index("test/auroc") if "test/auroc" in metrics else 0
    )
    st.caption(f"{len(runs)} runs; the overrides that differ between them, then the metrics")
    table = compare.table(runs, [*columns, *([] if metric in columns else [metric])])
    st.dataframe(table.sort_values(metric, ascending=False, na_position="last"), hide_index=True)
    result = comparison(runs, metric)
    with tempfile.TemporaryDirectory() as tmp:
        st.image(compare.chart(runs, metric, Path(tmp) / "chart.png", result).read_bytes())


def comparison(runs, metric: str):
    """`recsys.compare.statistics` of ``metric``, shown as `python -m recsys.compare` gives
    it: intervals over users and each run against the first; unpaired, and said so, where
    the runs were tested on other data or candidates."""
    try:
        result = compare.statistics(runs, [metric], resamples=2000)
    except InputError as e:
        st.info(f"{e}. The tests below are unpaired.")
        result = compare.statistics(runs, [metric], unpaired=True, resamples=2000)
    shown = result.drop(columns=["metric"]).dropna(axis=1, how="all")
    if {"mean", "difference"} & set(shown):
        st.caption(
            f"{metric}: mean over users with its 95% bootstrap interval; against the first run "
            "the difference, its interval and the p-values (Holm-corrected across the runs)"
        )
        st.dataframe(shown, hide_index=True)
    return result


# page name in the address (?page=...) -> (title, page)
PAGES: dict[str, tuple[str, Callable[[DictConfig], None]]] = {
    "recommend": ("Recommend", recommend_page),
    "similar": ("Similar items", similar_page),
    "testing": ("Model testing", testing_page),
    "performance": ("Performance", performance_page),
    "compare": ("Compare runs", compare_page),
}


def main() -> None:
    st.set_page_config(page_title="recsys dashboard", layout="wide")
    try:
        cfg = dashboard.settings_from_env()
    except ValueError as e:
        st.error(str(e))
        return
    if "page" not in st.session_state:  # a new session: the page in the address, if any
        wanted = st.query_params.get("page")
        st.session_state.page = wanted if wanted in PAGES else next(iter(PAGES))
    page = st.sidebar.radio("Page", list(PAGES), key="page", format_func=lambda p: PAGES[p][0])
    st.query_params["page"] = page
    title, render = PAGES[page]
    st.title(title)
    render(cfg)


if __name__ == "__main__":
    main()
