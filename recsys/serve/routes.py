"""The service's routes (see `recsys.serve`): ``public`` needs no API key (``/health``),
``router`` holds the others, which `recsys.serve.app.create_app` guards with the key.

The handlers are coroutines. A small request is scored on the event loop: it takes less CPU
than a hop to the thread pool costs under the GIL (`docs/method-notes.md`). A request that
scores more than ``serve.inline_scores`` pairs by a matrix product, or runs more than
``serve.inline_forward`` pairs through the model's forward, is answered in a worker thread
(`respond`), so that the loop answers ``/health`` and other requests meanwhile. Concurrency
comes from ``serve.workers``.

Request bodies are strict: unknown fields are refused, and a number or a boolean is not
taken for another type (``true`` is no user id, ``"5"`` no k); so is k in a query (digits
only: ``5_0`` or ``+5`` are refused, as `int` would read them)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from recsys.errors import InputError
from recsys.recommender import Recommender
from recsys.serve import ops
from recsys.serve.dependencies import Limits, get_limits, get_recommender, get_scoring

Rec = Annotated[Recommender, Depends(get_recommender)]
Limit = Annotated[Limits, Depends(get_limits)]
Scoring = Annotated[CapacityLimiter, Depends(get_scoring)]

public = APIRouter()
router = APIRouter()


def digits(value: object) -> object:
    """A query's k as written: digits only (``int()`` also reads ``5_0``, `` 5`` and ``+5``)."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,9}", value):
        raise ValueError("k must be a whole number written with the digits 0-9 only")
    return value


K = Annotated[int, BeforeValidator(digits), Query(ge=1)]


class Strict(BaseModel):
    """A request body: unknown fields refused, no conversions between types."""

    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(Strict):
    user_ids: list[str | int] = Field(min_length=1)
    k: int = Field(10, ge=1)
    exclude_seen: bool = True
    fallback: Literal["popular"] | None = None


class Pair(Strict):
    user_id: str | int
    item_id: str | int


class ScoreRequest(Strict):
    pairs: list[Pair] = Field(min_length=1)


@public.get("/health")
@public.head("/health", include_in_schema=False)
async def health(request: Request) -> JSONResponse:
    return ops.health(request.app)


@router.get("/metadata")
async def get_metadata(rec: Rec) -> dict:
    return rec.metadata()


@router.get("/recommend")
async def get_recommend(
    rec: Rec,
    limits: Limit,
    scoring: Scoring,
    user_id: str,
    k: K = 10,
    exclude_seen: bool = True,
    fallback: Literal["popular"] | None = None,
) -> JSONResponse:
    check_work(1, k, rec, limits)
    return await respond(
        lambda: recommendations(rec, [user_id], k, exclude_seen, fallback)[0],
        rec.catalogue_items,
        rec.forward_items,
        limits,
        scoring,
    )


@router.post("/recommend")
async def post_recommend(
    rec: Rec, limits: Limit, scoring: Scoring, request: RecommendRequest
) -> JSONResponse:
    users = len(request.user_ids)
    check_batch(users, "users", limits)
    check_work(users, request.k, rec, limits)
    return await respond(
        lambda: {
            "results": recommendations(
                rec, request.user_ids, request.k, request.exclude_seen, request.fallback
            )
        },
        users * rec.catalogue_items,
        users * rec.forward_items,
        limits,
        scoring,
    )


@router.get("/similar")
async def get_similar(
    rec: Rec, limits: Limit, scoring: Scoring, item_id: str, k: K = 10
) -> JSONResponse:
    check_k(k, rec, limits)

    def answer() -> dict:
        (code,) = rec.item_codes([item_id])
        top, sims = rec.similar(int(code), min(k, rec.num_items - 1))
        return {"item_id": item_id, "items": items(rec, top, sims, "similarity")}

    return await respond(answer, rec.num_items, 0, limits, scoring)


@router.post("/score")
async def post_score(
    rec: Rec, limits: Limit, scoring: Scoring, request: ScoreRequest
) -> JSONResponse:
    check_batch(len(request.pairs), "pairs", limits)

    def answer() -> dict:
        users = rec.user_codes([p.user_id for p in request.pairs])
        item_codes = rec.item_codes([p.item_id for p in request.pairs])
        logits = rec.score(users, item_codes)
        probs = rec.probabilities(logits)
        scores = [
            {
                "user_id": str(p.user_id),
                "item_id": str(p.item_id),
                "score": float(s),
                "probability": float(probs[i]) if probs is not None else None,
            }
            for i, (p, s) in enumerate(zip(request.pairs, logits.tolist(), strict=True))
        ]
        return {"scores": scores}

    return await respond(answer, 0, len(request.pairs), limits, scoring)


async def respond(
    answer: Callable[[], dict],
    scores: int,
    forward: int,
    limits: Limits,
    scoring: CapacityLimiter,
) -> JSONResponse:
    """``answer()`` as JSON, computed and encoded in a worker thread when the request scores
    more than ``limits.inline_scores`` pairs by a matrix product (``scores``) or runs more
    than ``limits.inline_forward`` pairs through the model's forward (``forward``), else on
    the event loop. The threads' requests are scored ``limits.scoring_threads`` at a time
    (``scoring``); the others wait for their turn."""
    if scores > limits.inline_scores or forward > limits.inline_forward:
        return await to_thread.run_sync(lambda: JSONResponse(answer()), limiter=scoring)
    return JSONResponse(answer())


def check_k(k: int, rec: Recommender, limits: Limits) -> None:
    max_k = min(limits.max_k, rec.num_items)
    if k > max_k:
        raise InputError(f"k={k} is more than the {max_k} items a request may ask for")


def check_batch(size: int, what: str, limits: Limits) -> None:
    if size > limits.max_batch:
        raise InputError(f"{size} {what}; at most {limits.max_batch} per request")


def check_work(users: int, k: int, rec: Recommender, limits: Limits) -> None:
    """Refuse a request whose answer would hold more than ``max_results`` items (users x k),
    or whose model would score more than ``max_pairs`` (user, item) pairs through its forward
    (users x the catalogue, for a model that does not factorise)."""
    check_k(k, rec, limits)
    if users * k > limits.max_results:
        raise InputError(
            f"{users} users x k={k} = {users * k} items to answer; at most "
            f"serve.max_results={limits.max_results} per request: ask for fewer users or a "
            "smaller k"
        )
    pairs = users * rec.forward_items
    if pairs > limits.max_pairs:
        raise InputError(
            f"{users} users x {rec.forward_items} items = {pairs} (user, item) pairs for this "
            f"model to score (it does not factorise); at most serve.max_pairs="
            f"{limits.max_pairs} per request: send at most "
            f"{limits.max_pairs // rec.forward_items} users per request"
        )


def items(rec: Recommender, codes: np.ndarray, values: np.ndarray | None, name: str) -> list[dict]:
    """The items' display records, each with its ``name`` value (score, similarity)."""
    records = rec.item_records
    if values is None:
        return [dict(records[c]) for c in codes.tolist()]
    return [{**records[c], name: v} for c, v in zip(codes.tolist(), values.tolist(), strict=True)]


def recommendations(
    rec: Recommender,
    raw_ids: list,
    k: int,
    exclude_seen: bool,
    fallback: str | None,
) -> list[dict]:
    """One answer per user: the model's top k (``source: model``) or, for an unknown user
    with ``fallback=popular``, the most popular items (``source: popular``)."""
    codes = rec.user_codes(raw_ids, missing_ok=fallback is not None)
    known = codes >= 0
    top, logits = rec.recommend(codes[known], k, exclude_seen)
    popular = items(rec, rec.popular[:k].numpy(), None, "") if not known.all() else []
    answers, j = [], 0
    for raw, ok in zip(raw_ids, known.tolist(), strict=True):
        answer = {"user_id": str(raw), "source": "model" if ok else "popular"}
        if ok:
            answer["items"] = items(rec, top[j], logits[j], "score")
            j += 1
        else:
            answer["items"] = popular
        answers.append(answer)
    return answers
