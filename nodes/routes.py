"""HTTP routes for the live training chart (web/acestep_lora.js): the loss history of each Train node.

The websocket event ``acestep_lora.training`` only carries the points since the previous message, so a browser
page opened or reloaded mid-training asks for the whole curve here:

* ``GET /acestep_lora/training`` -> ``{"runs": {"<node id>": summary}}``; always 200, ``{"runs": {}}`` when idle.
* ``GET /acestep_lora/training/{node_id}[?since=<step>]`` -> ``summary + {"points": [[step, loss, lr], ...],
  "validation": [[step, loss, epoch], ...], "previews": [preview sets]}`` (only those after ``since`` when given;
  a preview set is ProgressEvent.previews' entry plus ``audio``, its clips in ComfyUI's temp folder, see
  nodes/train.py); 404 ``{"error": ..., "node": ...}`` when that node never trained.

summary = the fields of the websocket message (``acestep_lora.metrics.ProgressEvent``: step, total_steps, epoch,
total_epochs, elapsed, eta, loss, lr) but ``points``, plus ``node``, ``output_dir``, ``started``, ``done`` and
``num_points``; ``loss``/``lr`` are the last point's; a value that is not a finite number is ``null`` (JSON has no
NaN, and the browser's JSON.parse rejects it). tests/js/fixtures/training_messages.json holds an example of each
answer and of the websocket message, made from these definitions (tests/test_routes.py keeps it so). ComfyUI
serves each route also under ``/api``, which is what the frontend's ``api.fetchApi`` uses.

Registered at import when ComfyUI's ``server.PromptServer.instance.routes`` exists; otherwise (tests, scripts, the
headless stand-in whose ``routes`` is None) importing this module does nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

from ..acestep_lora.metrics import ProgressEvent
from .train import RUNS

BASE = "/acestep_lora/training"
# The run's last event (loss and lr come from its last point), and when the run started / whether it ended.
SUMMARY_KEYS = tuple(f.name for f in dataclasses.fields(ProgressEvent)
                     if f.name not in ("points", "validation", "previews", "loss", "lr")) + ("started", "done")

log = logging.getLogger(__name__)
_registered = False


def _finite(value):
    """JSON-safe number: NaN and +-inf become None; ints, bools and None pass through."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _point(p) -> list:
    return [_finite(v) for v in p]


def summary(node_id: str, run: dict) -> dict:
    points = run.get("points") or []
    last = points[-1] if points else None
    out = {"node": str(node_id)}
    out.update({k: _finite(run.get(k)) for k in SUMMARY_KEYS})
    out["done"] = bool(run.get("done", False))
    out["loss"] = _finite(last[1]) if last is not None and len(last) > 1 else None
    out["lr"] = _finite(last[2]) if last is not None and len(last) > 2 else None
    out["num_points"] = len(points)
    out["output_dir"] = run.get("output_dir")  # as typed on the node: a chart only shows its own node's run
    return out


def all_runs() -> dict:
    return {"runs": {str(node_id): summary(node_id, run) for node_id, run in list(RUNS.items())}}


def history(node_id: str, since: Optional[float] = None) -> Optional[dict]:
    """Summary plus the points, validation losses and preview sets (after step ``since`` when given); None when
    the node has no run."""
    run = RUNS.get(str(node_id))
    if run is None:
        return None
    # copies: the training thread keeps appending
    points, validation, sets = (list(run.get(k) or []) for k in ("points", "validation", "previews"))
    if since is not None:
        points = [p for p in points if p[0] > since]
        # at the last point's step too: a validation loss or preview set comes just after the epoch's last point
        validation = [v for v in validation if v[0] >= since]
        sets = [s for s in sets if s["step"] >= since]
    return dict(summary(node_id, run), points=[_point(p) for p in points], validation=[_point(v) for v in validation],
                previews=sets, since=since)


def _parse_since(text: Optional[str]) -> Optional[float]:
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def register(routes, web) -> None:
    """Add the two GET routes to an aiohttp ``RouteTableDef``-like ``routes``; ``web`` is ``aiohttp.web``."""

    @routes.get(BASE)
    async def training_runs(request):
        return web.json_response(all_runs())

    @routes.get(BASE + "/{node_id}")
    async def training_history(request):
        node_id = request.match_info["node_id"]
        data = history(node_id, _parse_since(request.query.get("since")))
        if data is None:
            return web.json_response({"error": f"no training run for node {node_id}", "node": node_id},
                                     status=404)
        return web.json_response(data)


def _install() -> bool:
    """Register with ComfyUI's server when it is running; never raises (the pack must import anywhere)."""
    global _registered
    if _registered:
        return True
    try:
        from server import PromptServer  # type: ignore
    except ImportError:
        return False
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if routes is None:
        return False
    try:
        from aiohttp import web
    except ImportError:
        return False
    try:
        register(routes, web)
    except Exception:  # a broken route must not stop the nodes from loading
        log.exception("[ACE-Step LoRA] could not register %s routes; the live chart will not survive a reload", BASE)
        return False
    _registered = True
    return True


_install()
