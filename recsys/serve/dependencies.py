"""What the routes are handed by FastAPI's ``Depends``: the `Recommender` and the request
limits the app was built with (`recsys.serve.app.create_app` keeps them in ``app.state``),
and the API key check. An app answers from another recommender through
``app.dependency_overrides[get_recommender]``.

They are coroutines, as the routes are: FastAPI runs a plain function in its thread pool, a
hop that costs more than a request's scoring (`recsys.serve.routes`)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Header, HTTPException, Request

from recsys.recommender import Recommender


@dataclass(frozen=True)
class Limits:
    """``api_key``: when set, every route but ``/health`` needs it in the ``X-API-Key``
    header; ``max_k``: the largest k a request may ask for; ``max_batch``: the most users
    (``POST /recommend``) or pairs (``POST /score``) per request."""

    api_key: str | None = None
    max_k: int = 1000
    max_batch: int = 1000


async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


async def get_limits(request: Request) -> Limits:
    return request.app.state.limits


async def check_api_key(request: Request, x_api_key: str | None = Header(None)) -> None:
    api_key = (await get_limits(request)).api_key
    if api_key and not (x_api_key and secrets.compare_digest(x_api_key, api_key)):
        raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header")
