"""Real-time serving of a checkpoint over HTTP (FastAPI + uvicorn).

    python -m recsys.serve run_dir=<training run folder>|latest [serve.port=8000]
    python -m recsys.serve ckpt_path=<run>/checkpoints/<name>.ckpt

Routes (raw dataset ids in and out; every answer is JSON):

- ``GET /health`` (and ``HEAD``): ``{"status": "ok", "workers": N, "ready": N}``, or 503
  while a worker is down or starting; never needs the API key.
- ``GET /metrics``: Prometheus metrics of every worker (`recsys.serve.ops`); behind the API
  key unless ``serve.metrics_public=true``.
- ``GET /metadata``: the model (``calibrated``: whether its scores have probabilities), its
  data (sizes, item fields), the checkpoint's file and run folder names (no paths) and its
  test metrics (``null``, with ``metrics_note`` saying why, for a checkpoint its run did not
  test, such as a ``last.ckpt`` written after the best epoch).
- ``GET /recommend?user_id=..&k=10[&exclude_seen=true][&fallback=popular]``: the user's top-k
  items with their display fields and logits, never an item the user has an interaction with
  unless ``exclude_seen=false``.
- ``POST /recommend`` ``{"user_ids": [..], "k": 10, "exclude_seen": true, "fallback": null}``.
- ``GET /similar?item_id=..&k=10``: nearest items by cosine of the model's item vectors.
- ``POST /score`` ``{"pairs": [{"user_id": .., "item_id": ..}, ..]}``: logits, and
  probabilities for calibrated models: binary cross-entropy on explicit feedback. Every
  other model gets ``null``: under implicit feedback sigmoid(logit) is the chance that a pair
  is the positive in a 1 : ``num_negatives`` sampled mix, and BPR logits only order items.

An unknown id answers 404 naming it (the first five of several; or, with
``fallback=popular``, the most popular items, marked ``"source": "popular"``); bad input
(`recsys.errors.InputError`, a strict type or an unknown field, too much work: users x k over
``serve.max_results``, users x items over ``serve.max_pairs`` for a model that does not
factorise) 422; a body over ``serve.max_body_bytes`` 413, unparsed; a Host header that
``serve.allowed_hosts`` does not list 400; any other failure 500, with its traceback in the log.
Long scoring runs in a worker thread (``serve.inline_scores``, ``serve.inline_forward``).
When ``serve.api_key`` (or ``RECSYS_API_KEY``; empty is refused) is set, every route but
``/health`` needs it in the ``X-API-Key`` header, ``/openapi.json`` too, and ``/docs`` and
``/redoc`` are off.

Once every worker has loaded its model and accepts connections, the log says
``ready: serving <model> on http://<host>:<port>``; before, connections wait in the port's
queue. SIGHUP reloads the checkpoint that the config names, worker by worker
(`recsys.serve.workers`).

Layout: `recsys.serve.app` builds the app (`create_app`) from the routers of
`recsys.serve.routes`, which are handed the `Recommender` by ``Depends(get_recommender)``
(`recsys.serve.dependencies`: ``app.dependency_overrides[get_recommender]`` swaps it);
`recsys.serve.workers` runs the server processes (`run`): the port, restarts, reloads;
`recsys.serve.ops` holds readiness and metrics.
"""

from recsys.errors import require_extra

require_extra("serve", "fastapi", "uvicorn", "prometheus_client")  # before the first import of any

from recsys.serve.app import app_from_config, create_app  # noqa: E402
from recsys.serve.dependencies import get_recommender  # noqa: E402
from recsys.serve.workers import ReadyServer, listening_socket, run  # noqa: E402

__all__ = [
    "ReadyServer",
    "app_from_config",
    "create_app",
    "get_recommender",
    "listening_socket",
    "run",
]
