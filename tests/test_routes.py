"""nodes/routes.py: the HTTP side of the live training chart (GET /acestep_lora/training[/<node id>])."""
import asyncio
import json
import os
import sys
import types

import pytest

from acestep_lora.metrics import ProgressEvent

from test_nodes_pipeline import call_prepare, node_module, train_args, write_wav

# What the JS tests (tests/js/*.test.mjs) feed the chart: made by the code below from ProgressEvent, never by hand.
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js", "fixtures", "training_messages.json")


class FakeRoutes:
    """Records what ``@routes.get(path)`` registers, like aiohttp's RouteTableDef."""

    def __init__(self):
        self.handlers = {}

    def get(self, path):
        def decorator(fn):
            assert path not in self.handlers, f"{path} registered twice"
            self.handlers[path] = fn
            return fn
        return decorator


class FakeWeb:
    """aiohttp.web.json_response, but strict: JSON with NaN (which the browser's JSON.parse rejects) fails."""

    @staticmethod
    def json_response(data, status=200):
        return types.SimpleNamespace(status=status, data=json.loads(json.dumps(data, allow_nan=False)))


def call(handler, node_id=None, **query):
    request = types.SimpleNamespace(match_info={"node_id": node_id} if node_id is not None else {}, query=query)
    return asyncio.run(handler(request))


@pytest.fixture()
def routes(comfy):
    module = node_module(comfy, "routes")
    table = FakeRoutes()
    module.register(table, FakeWeb)
    module.RUNS.clear()
    yield module, table
    module.RUNS.clear()


def test_headless_import_registers_nothing(comfy):
    """scripts/headless.py's PromptServer has routes = None: importing the pack must work and do nothing."""
    module = node_module(comfy, "routes")
    assert comfy.server.routes is None
    assert module._registered is False
    assert module._install() is False


def test_install_registers_on_comfyui_server(comfy, monkeypatch):
    module = node_module(comfy, "routes")
    table = FakeRoutes()
    monkeypatch.setattr(comfy.server, "routes", table)
    monkeypatch.setitem(sys.modules, "aiohttp", types.SimpleNamespace(web=FakeWeb))
    monkeypatch.setattr(module, "_registered", False)
    assert module._install() is True
    assert set(table.handlers) == {"/acestep_lora/training", "/acestep_lora/training/{node_id}"}
    assert module._install() is True and len(table.handlers) == 2  # idempotent


def test_install_without_aiohttp_or_server_is_quiet(comfy, monkeypatch):
    module = node_module(comfy, "routes")
    monkeypatch.setattr(module, "_registered", False)
    monkeypatch.setattr(comfy.server, "routes", FakeRoutes())
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import fails
    assert module._install() is False
    monkeypatch.delitem(sys.modules, "server")
    monkeypatch.setitem(sys.modules, "server", None)
    assert module._install() is False


def test_summary_and_history(routes):
    module, table = routes
    runs, one = table.handlers["/acestep_lora/training"], table.handlers["/acestep_lora/training/{node_id}"]
    assert call(runs).data == {"runs": {}}
    missing = call(one, "12")
    assert missing.status == 404 and missing.data["node"] == "12" and "error" in missing.data

    module.RUNS["12"] = {"points": [[1, 0.5, 1e-4], [2, 0.4, 2e-4], [3, float("nan"), 3e-4]], "step": 3,
                         "total_steps": 10, "epoch": 1, "total_epochs": 5, "eta": float("nan"), "elapsed": 2.5,
                         "started": 1700000000.5, "done": False, "output_dir": "acestep_lora/runs/a"}
    summary = call(runs).data["runs"]["12"]
    assert summary == {"node": "12", "step": 3, "total_steps": 10, "epoch": 1, "total_epochs": 5, "elapsed": 2.5,
                       "eta": None, "started": 1700000000.5, "done": False, "loss": None, "lr": 3e-4,
                       "num_points": 3, "output_dir": "acestep_lora/runs/a"}
    full = call(one, "12")
    assert full.status == 200
    assert full.data["points"] == [[1, 0.5, 1e-4], [2, 0.4, 2e-4], [3, None, 3e-4]]
    assert full.data["since"] is None and full.data["step"] == 3
    assert call(one, "12", since="1").data["points"] == [[2, 0.4, 2e-4], [3, None, 3e-4]]
    assert call(one, "12", since="3").data["points"] == []
    assert call(one, "12", since="junk").data["since"] is None  # ignored, full history
    # a run that was just created has no points yet
    module.RUNS["13"] = {"points": [], "started": 1.0, "done": False}
    assert call(runs).data["runs"]["13"]["num_points"] == 0 and call(one, "13").data["points"] == []


def test_history_matches_what_the_websocket_sent(comfy, tiny_ckpt, tmp_path, routes):
    """A real (tiny) training run through the Train node: the route returns exactly the websocket points."""
    module, table = routes
    files = [write_wav(str(tmp_path / f"{i}.wav"), seconds=1.0) for i in range(2)]
    tensors = call_prepare(comfy, tiny_ckpt, audio_files=",".join(files), captions="a,b")["result"][0]
    node_module(comfy, "train").TrainLoRA().train(**train_args(tensors, tiny_ckpt, train_epochs=2, unique_id="21"))
    sent = [m[1] for m in comfy.server.messages if m[0] == "acestep_lora.training" and m[1]["node"] == "21"]
    points = [p for m in sent for p in m["points"]]
    history = call(table.handlers["/acestep_lora/training/{node_id}"], "21").data
    assert history["points"] == [list(p) for p in points] and len(points) == 4
    assert history["done"] is True and history["step"] == history["total_steps"] == 4
    assert history["started"] is not None and history["total_epochs"] == 2
    summary = call(table.handlers["/acestep_lora/training"]).data["runs"]["21"]
    assert summary["num_points"] == 4 and summary["loss"] == points[-1][1]
    # every websocket message carries the keys the chart reads
    for m in sent:
        assert {"node", "points", "step", "total_steps", "epoch", "total_epochs", "loss", "lr", "elapsed",
                "eta"} <= set(m)



def test_the_js_fixture_is_made_from_the_event_definition(comfy, routes, monkeypatch):
    """The websocket message and both route answers for ProgressEvent.example(), produced by the node's
    LiveProgress and nodes/routes.py, are what tests/js/fixtures/training_messages.json holds; the JS tests feed
    that file to the chart, so a renamed or dropped event field fails there too."""
    module, table = routes
    event = ProgressEvent.example()
    run_dir = os.path.join(comfy.output, "acestep_lora", "runs", "my_lora")
    for entry in event.previews:  # the clips the event names (contents do not matter here)
        for file in entry["files"]:
            os.makedirs(os.path.dirname(os.path.join(run_dir, file)), exist_ok=True)
            open(os.path.join(run_dir, file), "wb").write(b"fLaC")
    train = node_module(comfy, "train")
    monkeypatch.setattr(train.time, "time", lambda: 1700000000.25)  # the run's start, fixed: the file is stable
    live = train.LiveProgress("7", "acestep_lora/runs/my_lora", run_dir)
    live.update(event)
    live.close()
    module.RUNS["7"].update(done=False)
    sent = [m[1] for m in comfy.server.messages if m[0] == "acestep_lora.training"][-1]
    made = {"comment": "Written by tests/test_routes.py from acestep_lora.metrics.ProgressEvent.example(); "
                       "ACESTEP_WRITE_FIXTURES=1 python -m pytest tests/test_routes.py -k js_fixture rewrites it.",
            "event": sent, "runs": call(table.handlers["/acestep_lora/training"]).data,
            "history": call(table.handlers["/acestep_lora/training/{node_id}"], "7").data}
    made = json.loads(json.dumps(made, allow_nan=False))
    assert set(made["event"]) == {f for f in vars(ProgressEvent.example())} | {"node", "output_dir", "started"}
    # the clips the event names are playable from ComfyUI's temp folder (/view?type=temp)
    audio = made["event"]["previews"][1]["audio"]
    assert audio == [{"filename": f"epoch_2_{i}.flac", "subfolder": "acestep_lora/7", "type": "temp"} for i in (1, 2)]
    assert all(os.path.isfile(os.path.join(comfy.base, "temp", "acestep_lora", "7", a["filename"])) for a in audio)
    assert made["history"]["previews"] == made["event"]["previews"] and made["history"]["validation"]
    if os.environ.get("ACESTEP_WRITE_FIXTURES") == "1":
        os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
        with open(FIXTURE, "w", encoding="utf-8") as f:
            json.dump(made, f, indent=2)
            f.write("\n")
    with open(FIXTURE, encoding="utf-8") as f:
        assert json.load(f) == made, f"{FIXTURE} is out of date: {made['comment']}"
