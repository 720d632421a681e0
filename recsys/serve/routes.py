"""The service's routes (see `recsys.serve`): ``public`` needs no API key (``/health``),
``router`` holds the others, which `recsys.serve.app.create_app` guards with the key.

The handlers are coroutines that score on the event loop: a factorised model's request takes
less CPU than a hop to the thread pool costs under the GIL (`docs/method-notes.md`).
Concurrency comes from ``serve.workers``."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from recsys.recommender import Recommender
from recsys.serve import ops
from recsys.serve.dependencies import Limits, get_limits, get_recommender

Rec = Annotated[Recommender, Depends(get_recommender)]
Limit = Annotated[Limits, Depends(get_limits)]

public = APIRouter()
router = APIRouter()


class RecommendRequest(BaseModel):
    user_ids: list[str | int] = Field(min_length=1)
    k: int = Field(10, ge=1)
    exclude_seen: bool = True
    fallback: Literal["popular"] | None = None


class Pair(BaseModel):
    user_id: str | int
    item_id: str | int


class ScoreRequest(BaseModel):
    pairs: list[Pair] = Field(min_length=1)


@public.get("/health")
async def health(request: Request) -> JSONResponse:
    return ops.health(request.app)


@router.get("/metadata")
async def get_metadata(rec: Rec) -> dict:
    return rec.metadata()


@router.get("/recommend")
async def get_recommend(
    rec: Rec,
    limits: Limit,
    user_id: str,
    k: int = Query(10, ge=1),
    exclude_seen: bool = True,
    fallback: Literal["popular"] | None = None,
) -> JSONResponse:
    return JSONResponse(recommendations(rec, limits, [user_id], k, exclude_seen, fallback)[0])


@router.post("/recommend")
async def post_recommend(rec: Rec, limits: Limit, request: RecommendRequest) -> JSONResponse:
    check_batch(len(request.user_ids), "users", limits)
    results = recommendations(
        rec, limits, request.user_ids, request.k, request.exclude_seen, request.fallback
    )
    return JSONResponse({"results": results})


@router.get("/similar")
async def get_similar(
    rec: Rec, limits: Limit, item_id: str, k: int = Query(10, ge=1)
) -> JSONResponse:
    check_k(k, rec, limits)
    (code,) = rec.item_codes([item_id])
    top, sims = rec.similar(int(code), min(k, rec.num_items - 1))
    return JSONResponse({"item_id": item_id, "items": items(rec, top, sims, "similarity")})


@router.post("/score")
async def post_score(rec: Rec, limits: Limit, request: ScoreRequest) -> JSONResponse:
    check_batch(len(request.pairs), "pairs", limits)
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
    return JSONResponse({"scores": scores})


def check_k(k: int, rec: Recommender, limits: Limits) -> None:
    max_k = min(limits.max_k, rec.num_items)
    if k > max_k:
        raise ValueError(f"k={k} is more than the {max_k} items a request may ask for")


def check_batch(size: int, what: str, limits: Limits) -> None:
    if size > limits.max_batch:
        raise ValueError(f"{size} {what}; at most {limits.max_batch} per request")


def items(rec: Recommender, codes: np.ndarray, values: np.ndarray | None, name: str) -> list[dict]:
    """The items' display records, each with its ``name`` value (score, similarity)."""
    records = rec.item_records
    if values is None:
        return [dict(records[c]) for c in codes.tolist()]
    return [{**records[c], name: v} for c, v in zip(codes.tolist(), values.tolist(), strict=True)]


def recommendations(
    rec: Recommender,
    limits: Limits,
    raw_ids: list,
    k: int,
    exclude_seen: bool,
    fallback: str | None,
) -> list[dict]:
    """One answer per user: the model's top k (``source: model``) or, for an unknown user
    with ``fallback=popular``, the most popular items (``source: popular``)."""
    check_k(k, rec, limits)
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
