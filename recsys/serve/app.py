"""The FastAPI app of a `Recommender`: the routers of `recsys.serve.routes`, the API key on
every route but ``/health``, and errors as JSON (an unknown id 404, a bad value 422)."""

from __future__ import annotations

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from omegaconf import DictConfig

from recsys.recommender import Recommender, UnknownIdError
from recsys.serve import routes
from recsys.serve.dependencies import Limits, check_api_key


def create_app(
    rec: Recommender, api_key: str | None = None, max_k: int = 1000, max_batch: int = 1000
) -> FastAPI:
    """The HTTP app over ``rec`` (its routes get it through `get_recommender`), with the
    request limits of `Limits`."""
    model = rec.metadata()["model"]
    about = ", ".join(filter(None, [model.get("variant"), rec.source]))
    app = FastAPI(title=f"recsys: {model['net'].rsplit('.', 1)[-1]} ({about})")
    app.state.summary = app.title.removeprefix("recsys: ")  # for the log
    app.state.recommender = rec
    app.state.limits = Limits(api_key, max_k, max_batch)
    app.add_exception_handler(UnknownIdError, unknown_id)
    app.add_exception_handler(ValueError, bad_value)
    app.include_router(routes.public)
    app.include_router(routes.router, dependencies=[Depends(check_api_key)])
    return app


def app_from_config(cfg: DictConfig) -> FastAPI:
    """Load the checkpoint of ``cfg`` and build its app. A model of data without ids or with
    row features is refused here, at startup (`recsys.scoring.require_pairs`)."""
    torch.set_num_threads(cfg.serve.torch_threads)
    rec = Recommender.from_config(cfg, "serve")
    return create_app(rec, cfg.serve.api_key, cfg.serve.max_k, cfg.serve.max_batch)


async def unknown_id(_: Request, e: UnknownIdError) -> JSONResponse:
    return JSONResponse({"detail": str(e), "unknown": {e.kind: e.ids}}, status_code=404)


async def bad_value(_: Request, e: ValueError) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, status_code=422)
