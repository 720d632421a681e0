"""The FastAPI app of a `Recommender`: the routers of `recsys.serve.routes`, the request
limits of `Limits` (body size before parsing, work per request, the Host header, the API key
on every route but ``/health``), and errors as JSON: an unknown id 404, bad input
(`InputError`) 422, a body over the limit 413, and any other failure (a model fault, a bug)
500 with a generic body, its traceback in the log."""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from anyio import CapacityLimiter
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from omegaconf import DictConfig
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys.errors import InputError
from recsys.recommender import Recommender, UnknownIdError
from recsys.serve import routes
from recsys.serve.dependencies import Limits, check_api_key

log = logging.getLogger(__name__)


def create_app(rec: Recommender, api_key: str | None = None, **limits) -> FastAPI:
    """The HTTP app over ``rec`` (its routes get it through `get_recommender`), with the
    request limits of `Limits` (``limits``: its other fields). With an API key, the OpenAPI
    schema needs it too, and the ``/docs`` and ``/redoc`` pages (which fetch the schema
    without it) are off.

    Raises:
        InputError: a setting that cannot work (`Limits`), or ``max_pairs`` below what one
            user of ``rec``'s model costs.
    """
    settings = Limits(api_key, **limits)
    if rec.forward_items > settings.max_pairs:
        raise InputError(
            f"serve.max_pairs={settings.max_pairs} is less than the {rec.forward_items} "
            "(user, item) pairs that this model scores for one user (it does not factorise): "
            "every /recommend would be refused; raise serve.max_pairs"
        )
    model = rec.metadata()["model"]
    about = ", ".join(filter(None, [model.get("variant"), rec.source]))
    keyed = settings.api_key is not None
    app = FastAPI(
        title=f"recsys: {model['net'].rsplit('.', 1)[-1]} ({about})",
        openapi_url=None if keyed else "/openapi.json",
        docs_url=None if keyed else "/docs",
        redoc_url=None if keyed else "/redoc",
    )
    app.state.summary = app.title.removeprefix("recsys: ")  # for the log
    app.state.recommender = rec
    app.state.limits = settings
    app.state.scoring = CapacityLimiter(settings.scoring_threads)
    app.add_exception_handler(UnknownIdError, unknown_id)
    app.add_exception_handler(InputError, bad_input)
    app.include_router(routes.public)
    app.include_router(routes.router, dependencies=[Depends(check_api_key)])
    if keyed:

        async def openapi() -> dict:
            return app.openapi()

        app.add_api_route(
            "/openapi.json", openapi, dependencies=[Depends(check_api_key)], include_in_schema=False
        )
    # the last added runs first: the Host header, then the body size, then the app
    app.add_middleware(ServerErrors)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    return app


def app_from_config(cfg: DictConfig) -> FastAPI:
    """Load the checkpoint of ``cfg`` and build its app. Bad ``serve`` settings are refused
    before the model loads; a model of data without ids or with row features, or with
    weights that are not finite, when it loads (`recsys.scoring.require_pairs`,
    `recsys.recommender.require_finite`)."""
    settings = Limits.from_config(cfg.serve)
    torch.set_num_threads(cfg.serve.torch_threads)
    rec = Recommender.from_config(cfg, "serve")
    return create_app(rec, **asdict(settings))


async def unknown_id(_: Request, e: UnknownIdError) -> JSONResponse:
    """404 naming the first few unknown ids (``unknown``) and how many there are."""
    body = {"detail": str(e), "unknown": {e.kind: e.shown}, "unknown_count": len(e.ids)}
    return JSONResponse(body, status_code=404)


async def bad_input(_: Request, e: InputError) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, status_code=422)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before it is parsed,
    at once when its Content-Length says so, else as soon as the chunks read so far pass the
    limit (a chunked body declares no length). FastAPI's own ``max_body_size`` does the same
    but answers a plain "Content Too Large" that names neither the limit nor the fix."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self, size: str | None) -> str:
        """Names the body's size when it was declared (a chunked body is not read to its end)."""
        size = f"{size} bytes, more than" if size else "more than"
        return (
            f"the request body is {size} serve.max_body_bytes={self.max_bytes}: "
            "send fewer users (POST /recommend) or pairs (POST /score) per request"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            answer = JSONResponse({"detail": self.message(length)}, status_code=413)
            return await answer(scope, receive, send)
        read = 0

        async def receive_limited() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:  # FastAPI passes HTTPException on as a 413 answer
                    raise HTTPException(413, self.message(None))
            return message

        await self.app(scope, receive_limited, send)


class ServerErrors:
    """ASGI middleware: an exception that no handler maps to an answer (a model fault, a bug:
    not the request's fault) is logged with its traceback and answered 500 with a generic
    body that does not echo it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        except Exception:
            if started:  # too late to answer: the server closes the connection
                raise
            log.exception("%s %s failed: answered 500", scope["method"], scope["path"])
            detail = "internal server error: the request could not be answered; see the log"
            await JSONResponse({"detail": detail}, status_code=500)(scope, receive, send)
