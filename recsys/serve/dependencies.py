"""What the routes are handed by FastAPI's ``Depends``: the `Recommender` and the request
limits the app was built with (`recsys.serve.app.create_app` keeps them in ``app.state``),
and the API key check. An app answers from another recommender through
``app.dependency_overrides[get_recommender]``.

They are coroutines, as the routes are: FastAPI runs a plain function in its thread pool, a
hop that costs more than a request's scoring (`recsys.serve.routes`)."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, fields

from anyio import CapacityLimiter
from fastapi import Header, HTTPException, Request
from omegaconf import DictConfig

from recsys.errors import InputError
from recsys.recommender import Recommender

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class Limits:
    """The ``serve`` settings that a request meets (`conf/serve.yaml`, keys of the same names).

    Attributes:
        api_key: when set, every route but ``/health`` needs it in the ``X-API-Key`` header,
            and ``/openapi.json`` too (``/docs`` and ``/redoc`` are off); None serves without
            one. An empty key is refused: it would read as "no key".
        max_k: the largest k a request may ask for.
        max_batch: the most users (``POST /recommend``) or pairs (``POST /score``) per request.
        max_results: the most items one answer may hold (users x k).
        max_pairs: the most (user, item) pairs that the model's forward may score for one
            request: users x catalogue items for a model that does not factorise.
        inline_scores: requests that score more (user, item) pairs than this from a factorised
            model's vectors (a matrix product over the catalogue) are answered in a worker
            thread, so that the event loop answers ``/health`` and other requests meanwhile.
        inline_forward: likewise for requests that run more (user, item) pairs than this
            through the model's forward (users x catalogue items for a model that does not
            factorise, users x ``num_candidates`` for ANN and two-stage retrieval, the pairs of
            ``POST /score``), a hundred or so times the cost of a pair of a matrix product.
        scoring_threads: the requests scored in worker threads at once, per worker process;
            more wait their turn. Each may hold a large forward's activations and one core:
            this bounds the memory and the CPU that long requests take together.
        max_body_bytes: the largest request body; a larger one is answered 413 unread.
        allowed_hosts: the Host header values answered (``*``: any); others get 400.
    """

    api_key: str | None = None
    max_k: int = 1000
    max_batch: int = 1000
    max_results: int = 100_000
    max_pairs: int = 2_000_000
    inline_scores: int = 100_000
    inline_forward: int = 2_000
    scoring_threads: int = 2
    max_body_bytes: int = 1_048_576
    allowed_hosts: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise InputError(
                f"serve.api_key (or RECSYS_API_KEY) is {self.api_key!r}: an empty key would turn "
                "authentication off; set a key, or null (RECSYS_API_KEY unset) to serve without"
            )
        positive = ("max_k", "max_batch", "max_results", "max_pairs", "scoring_threads")
        for name in (*positive, "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"serve.{name}={value!r} must be a whole number of at least 1")
        for name in ("inline_scores", "inline_forward"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"serve.{name}={value!r} must be a whole number, 0 or more")
        if not self.allowed_hosts or not all(isinstance(h, str) for h in self.allowed_hosts):
            raise InputError(
                f"serve.allowed_hosts={list(self.allowed_hosts)!r} must be a list of host names "
                '(["*"] for any)'
            )

    @classmethod
    def from_config(cls, serve: DictConfig) -> Limits:
        """From ``cfg.serve``; ``allowed_hosts: null`` is `default_hosts` of ``serve.host``."""
        values = {f.name: serve[f.name] for f in fields(cls) if serve.get(f.name) is not None}
        hosts = values.get("allowed_hosts")
        values["allowed_hosts"] = default_hosts(serve.host) if hosts is None else tuple(hosts)
        return cls(**values)


def default_hosts(host: str) -> tuple[str, ...]:
    """The Host headers answered when ``serve.allowed_hosts`` is null: a server on a loopback
    address answers only loopback names, so that a web page whose domain resolves to this
    machine (DNS rebinding) cannot query it; one on other interfaces answers any name."""
    name = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name == "localhost"
    if not loopback:
        return ("*",)
    shown = f"[{name}]" if ":" in name else name
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, shown)))


async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


async def get_limits(request: Request) -> Limits:
    return request.app.state.limits


async def get_scoring(request: Request) -> CapacityLimiter:
    """The worker threads' limiter: ``serve.scoring_threads`` requests scored at once."""
    return request.app.state.scoring


async def check_api_key(request: Request, x_api_key: str | None = Header(None)) -> None:
    """401 unless the ``X-API-Key`` header is the key. The header's bytes (HTTP headers are
    decoded as latin-1) are compared with the key's UTF-8 bytes in constant time: any header,
    ASCII or not, is a wrong key, never a server error."""
    api_key = (await get_limits(request)).api_key
    if api_key is None:
        return
    sent = x_api_key.encode("latin-1") if x_api_key is not None else b""
    if not (sent and secrets.compare_digest(sent, api_key.encode())):
        raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header")
