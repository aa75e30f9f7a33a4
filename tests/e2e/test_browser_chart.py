"""The live loss chart (web/acestep_lora.js) in the real ComfyUI page, driven in headless Chromium.

Starts the same headless ComfyUI server as test_comfyui_server.py (its ``server`` fixture), then runs
``tests/e2e/browser/drive.mjs`` with Node.js: it opens the page, loads example workflow (1) into the editor, sets the
test's widget values (tiny checkpoint, rank 8, enough epochs to watch), queues it with ``app.queuePrompt`` and, while
the Train node trains, reads the chart's state and pixels, screenshots the node, reloads the page mid-run, opens the
node's help panel, waits (still mid-run) for preview clips of an epoch and a few validation losses and screenshots
the node with its preview player and validation series, and waits for the end. The driver only records; the checks
are here. Three more samples than the workflow's four LoadAudio clips are put into the samples folder first, so
Collect gathers seven and one is held out for the validation loss.

At the end it loads the workflow again in Nodes 2.0 (the frontend's "Modern Node Design") and reads which inputs the
Prepare and Train nodes show before and after "Show advanced inputs".

Skipped unless ``COMFYUI_DIR`` is a ComfyUI checkout, ``PLAYWRIGHT_CORE_DIR`` is a node_modules folder that holds
playwright-core, and Chromium (``CHROMIUM``, default /usr/bin/chromium) and ``node`` exist. Set
``ACESTEP_SCREENSHOT_DIR`` (e.g. ``docs``) to copy the mid-run screenshot there as ``live_chart.png``, the node with
its preview player and validation series as ``previews_player.png`` and the folded Prepare and Train nodes as
``advanced_inputs.png``:

    apt-get install -y chromium && (mkdir -p /work/browser && cd /work/browser && npm install playwright-core)
    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy-venv/bin/python \
    PLAYWRIGHT_CORE_DIR=/work/browser/node_modules ACESTEP_SCREENSHOT_DIR=docs \
        .venv/bin/python -m pytest tests/e2e/test_browser_chart.py -q -s

Screenshots (mid-run, after the reload, at the end, help panel, templates dialog, advanced inputs folded and open)
and the driver's JSON report are left in pytest's temporary folder (printed).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
PLAYWRIGHT_CORE_DIR = os.environ.get("PLAYWRIGHT_CORE_DIR", "")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")

if not COMFYUI_DIR or not os.path.isfile(os.path.join(COMFYUI_DIR, "main.py")):
    pytest.skip("COMFYUI_DIR is not set to a ComfyUI checkout (folder with main.py)", allow_module_level=True)
if not PLAYWRIGHT_CORE_DIR or not os.path.isfile(os.path.join(PLAYWRIGHT_CORE_DIR, "playwright-core", "package.json")):
    pytest.skip("PLAYWRIGHT_CORE_DIR is not a node_modules folder with playwright-core", allow_module_level=True)
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (set CHROMIUM)", allow_module_level=True)
if NODE is None:
    pytest.skip("node (Node.js) is not installed", allow_module_level=True)

sys.path.insert(0, HERE)
import test_comfyui_server as e2e  # noqa: E402

server = e2e.server  # the module-scoped fixture: a fresh server for this module
object_info = e2e.object_info

DRIVER = os.path.join(HERE, "browser", "drive.mjs")
TRAIN, PREPARE = e2e.TRAIN, e2e.PREPARE
EPOCHS = 200  # x 6 trained samples = 1200 steps: over a minute on 2 CPU cores, to screenshot and reload mid-run
EXTRA_SAMPLES = 3  # + the workflow's 4 clips = 7 samples: validation holds 1 out
PREVIEW_EVERY = 50  # previews at epochs 50, 100, 150 (and the LoRA-off reference before the first step)
VALIDATION_EVERY = 10
MIN_POINTS_SHOT = 60
OUR_FILES = ("/extensions/acestep-lora/", "acestep_lora.js", "chart_core.js")
DRIVER_TIMEOUT = 1800
# The help panel asks for docs/<node>/<locale>.md before docs/<node>.md, and the templates dialog for a
# <workflow>.jpg thumbnail next to each example workflow: the pack ships both (web/docs/<node>/en.md,
# example_workflows/*.jpg), so no request for a pack file may fail.
KNOWN_PACK_404 = re.compile(r"(?!)")  # matches nothing


def ours(text):
    """Does a console message, stack or URL come from this pack (its JS files, routes or served files)?"""
    text = text or ""
    return (any(f in text for f in OUR_FILES) or "ace-step lora" in text.lower() or "acestep_lora" in text
            or e2e.PACK_DIR_NAME in text)


def known_404(text):
    return bool(KNOWN_PACK_404.search(text or ""))


@pytest.fixture(scope="module")
def drive(server, object_info, tmp_path_factory):
    """Runs the browser driver once; returns (report, config)."""
    out = str(tmp_path_factory.mktemp("browser"))
    with open(e2e.EXAMPLE_WORKFLOW, encoding="utf-8") as f:
        workflow = json.load(f)
    n_clips = sum(1 for n in workflow["nodes"] if n["type"] == "LoadAudio")
    clips = e2e.write_clips(server.input, n_clips)
    write_extra_samples(os.path.join(server.output, "acestep_lora", "samples"))
    ckpt = os.path.join(server.models, "Ace-Step1.5")
    train = dict(e2e.TRAIN_SETTINGS, checkpoint_dir=ckpt, config_path=e2e.CONFIG,
                 output_dir="acestep_lora/runs/browser_lora", train_epochs=EPOCHS, save_every_n_epochs=0,
                 preview_every_n_epochs=PREVIEW_EVERY, validation_every_n_epochs=VALIDATION_EVERY)
    cfg = {
        "url": server.url + "/",
        "pack_dir_name": e2e.PACK_DIR_NAME,
        "workflow": e2e.EXAMPLE_WORKFLOW,
        "widgets": {PREPARE: {"checkpoint_dir": ckpt, "config_path": e2e.CONFIG, "device": "cpu"}, TRAIN: train},
        "load_audio": clips,
        "min_points_shot": MIN_POINTS_SHOT,
        "help_doc": os.path.join(e2e.ROOT, "web", "docs", f"{TRAIN}.md"),
        "report": os.path.join(out, "report.json"),
        "screenshot": os.path.join(out, "live_chart.png"),
        "screenshot_reload": os.path.join(out, "after_reload.png"),
        "screenshot_end": os.path.join(out, "end.png"),
        "screenshot_error": os.path.join(out, "error.png"),
        "help_screenshot": os.path.join(out, "help_panel.png"),
        "templates_screenshot": os.path.join(out, "templates.png"),
        "advanced_screenshot": os.path.join(out, "advanced_inputs.png"),
        "advanced_open_screenshot": os.path.join(out, "advanced_inputs_open.png"),
        "previews_screenshot": os.path.join(out, "previews_player.png"),
        "min_validation": 3,
        "timeouts": {"ready": 180, "points": 900, "shot_points": 300, "reload": 90, "previews": 600, "finish": 900},
    }
    config_path = os.path.join(out, "config.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    env = dict(os.environ, PLAYWRIGHT_CORE_DIR=PLAYWRIGHT_CORE_DIR, CHROMIUM=CHROMIUM)
    started = time.time()
    proc = subprocess.run([NODE, DRIVER, config_path], cwd=e2e.ROOT, env=env, capture_output=True, text=True,
                          timeout=DRIVER_TIMEOUT)
    print(f"\nbrowser driver: {time.time() - started:.1f} s, exit {proc.returncode}; files in {out}")
    assert os.path.isfile(cfg["report"]), f"the driver wrote no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    with open(cfg["report"], encoding="utf-8") as f:
        report = json.load(f)
    assert proc.returncode == 0 and not report.get("error"), (
        f"driver failed: {report.get('error')}\n{proc.stderr[-6000:]}\nnotes: {report.get('notes')}\n"
        f"at error: {json.dumps(report['checks'].get('at_error'))[:3000]}\n--- server log ---\n{server.log_tail(6000)}")
    shot_dir = os.environ.get("ACESTEP_SCREENSHOT_DIR")
    if shot_dir:
        shot_dir = shot_dir if os.path.isabs(shot_dir) else os.path.join(e2e.ROOT, shot_dir)
        os.makedirs(shot_dir, exist_ok=True)
        shots = {"live_chart.png": cfg["screenshot"], "advanced_inputs.png": cfg["advanced_screenshot"],
                 "previews_player.png": cfg["previews_screenshot"]}
        for name, source in shots.items():
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(shot_dir, name))
                print(f"screenshot copied to {os.path.join(shot_dir, name)}")
    return report, cfg


def write_extra_samples(folder, count=EXTRA_SAMPLES):
    """Samples as Create Training Sample leaves them (audio + JSON sidecar), for Collect to gather too."""
    import soundfile as sf
    from synthetic_music import make_clip

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        name = f"extra_groove_{i}"
        sf.write(os.path.join(folder, f"{name}.flac"), make_clip(90 + 20 * i, 4.0, 44100, seed=10 + i,
                                                                 style="house").T.numpy(), 44100)
        with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump({"caption": f"warm house groove {i}, pads, four on the floor", "lyrics": "[Instrumental]",
                       "bpm": 90 + 20 * i, "keyscale": "A minor", "language": "instrumental",
                       "timesignature": "4"}, f)


def phase_of(report, name):
    return [r for r in report["requests"] if r["phase"] == name]


def test_page_loads_clean_without_runs(drive):
    report, _ = drive
    checks = report["checks"]
    assert checks["extension_registered"], "acestep_lora.TrainingChart is not registered"
    assert checks["route_idle"] == {"status": 200, "body": {"runs": {}}}
    # the workflow with a Train node is loaded while the server has no run: one summary request, no per-node 404
    ours_http = [r for r in report["http_errors"] if r["phase"] in ("load", "workflow") and ours(r["url"])]
    assert not ours_http, ours_http
    asked = [r["url"] for r in phase_of(report, "workflow") if "/acestep_lora/training" in r["url"]]
    assert asked and all(u.endswith("/acestep_lora/training") for u in asked), asked
    others = sorted({f"{r['status']} {r['url'].split('?')[0]}" for r in report["http_errors"]
                     if r["phase"] in ("load", "workflow")})
    print(f"frontend {report.get('frontend_version')}, Chromium {report.get('browser_version')}; "
          f"HTTP errors on load, none from the pack: {others}")


def test_workflow_templates_list_under_the_pack_folder(drive, server):
    report, _ = drive
    api = report["checks"]["workflow_templates_api"]
    expected = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(e2e.ROOT, "example_workflows"))
                      if f.endswith(".json"))
    assert sorted(api.get(e2e.PACK_DIR_NAME, [])) == expected, api
    text = report["checks"].get("templates_dialog_text", "")
    assert e2e.PACK_DIR_NAME in text and all(name in text for name in expected), (text[:2000], report["notes"])
    assert f"Showing {len(expected)} of {len(expected)} templates" in text, text[-500:]
    print(f"templates dialog, EXTENSIONS > {e2e.PACK_DIR_NAME}: {', '.join(expected)}")


def test_chart_widget_is_not_serialised(drive, object_info):
    report, _ = drive
    loaded, before = report["checks"]["loaded"], report["checks"]["before_run"]
    assert not loaded["missing"], loaded["missing"]
    assert before["widget"] and before["has_chart"] and before["widget_type"] == "acestep_lora_chart"
    assert before["widget_serialize"] is False and before["widget_option_serialize"] is False
    assert before["element"]["connected"] and before["element"]["visible"]
    assert before["computed_height"] >= 220 and before["element"]["graph_height"] >= 200, before
    assert before["points"] == 0 and before["status"].startswith("The loss curve appears here"), before
    assert before["pixels"]["orange"] == 0 and before["pixels"]["blue"] == 0, before["pixels"]

    info = object_info[TRAIN]
    spec = {**info["input"]["required"], **info["input"].get("optional", {})}
    widget_inputs = [n for n in info["input_order"]["required"] + info["input_order"].get("optional", [])
                     if e2e.is_widget(spec[n])]
    assert "loss_chart" not in loaded["api_train_inputs"]
    assert loaded["api_train_inputs"] == widget_inputs, loaded["api_train_inputs"]
    assert len(loaded["ui_train_widgets_values"]) == len(widget_inputs), loaded["ui_train_widgets_values"]
    # what the Queue button really sent
    body = report["prompt_body"]
    train_id = loaded["train_id"]
    sent = body["prompt"][train_id]
    assert sent["class_type"] == TRAIN and "loss_chart" not in sent["inputs"], sent
    assert sent["inputs"]["lora_rank"] == e2e.RANK and sent["inputs"]["train_epochs"] == EPOCHS, sent["inputs"]
    [saved] = [n for n in body["extra_data"]["extra_pnginfo"]["workflow"]["nodes"] if str(n["id"]) == train_id]
    assert len(saved["widgets_values"]) == len(widget_inputs), saved["widgets_values"]
    assert None not in saved["widgets_values"], saved["widgets_values"]
    print(f"chart widget: {before['computed_height']:.0f} px layout height ({before['element']['graph_height']:.0f} "
          f"px element), serialize false, not in the prompt; Train widgets_values = {len(widget_inputs)} values")


def test_chart_draws_points_while_training(drive):
    report, cfg = drive
    checks, samples = report["checks"], report["samples"]
    mid = checks["mid"]
    assert checks["first_points_at"] is not None
    assert mid["points"] >= MIN_POINTS_SHOT and not mid["info"]["done"], mid
    assert mid["first_step"] == 1 and mid["last_step"] == mid["points"], mid  # steps 1..n, no gap, no duplicate
    assert mid["pixels"]["orange"] > 100 and mid["pixels"]["blue"] > 100, mid["pixels"]  # EMA + raw curves drawn
    assert mid["element"]["visible"] and mid["computed_height"] >= 220, mid
    # status line: epoch, step, loss, lr, elapsed, ETA, and it changes as training goes on
    statuses = [s["status"] for s in samples if s["status"]]
    assert all(s.startswith("epoch ") and " · step " in s and " · loss " in s and " · ETA " in s
               for s in statuses[:3]), statuses[:3]
    assert len(set(statuses)) >= 3, statuses
    steps = [s["last_step"] for s in samples if s["last_step"] is not None]
    assert steps == sorted(steps) and steps[-1] > steps[0], steps
    # the PIL loss image (progress preview) is still shown next to the chart
    assert mid["preview_images"] >= 1 and mid["node_imgs"] >= 1, mid
    assert "$$canvas-image-preview" in mid["widget_names"], mid["widget_names"]
    route = checks["mid_route"]["body"]["runs"][mid["node"]]
    assert route["num_points"] >= mid["points"] and route["done"] is False, route
    assert os.path.getsize(cfg["screenshot"]) > 10_000
    print(f"mid-run: {mid['points']} points, {mid['pixels']['orange']} EMA px / {mid['pixels']['blue']} raw px, "
          f"status {mid['status']!r}; preview image shown (chart {mid['computed_height']:.0f} px + image "
          f"{(mid['preview_widget'] or {}).get('computed_height')} px, node {mid['size']}); screenshot "
          f"{cfg['screenshot']}")


def test_reload_mid_run_redraws_history_from_route(drive):
    report, _ = drive
    before, reload = report["checks"]["before_reload"], report["checks"]["reload"]
    summary = before["summary"]["runs"]
    [run] = summary.values()
    assert run["done"] is False and run["step"] < run["total_steps"], "the page was reloaded after the run ended"
    assert reload["seconds_to_points"] is not None, reload
    after = reload["after"]
    assert after["has_chart"] and after["points"] >= before["points"] and after["first_step"] == 1, after
    assert after["started"] == run["started"], (after["started"], run["started"])  # state from the route
    # the history came from GET /acestep_lora/training/<node id> after the reload
    fetched = [r for r in phase_of(report, "reload") if r["url"].split("?")[0].endswith(f"/acestep_lora/training/"
                                                                                      f"{after['node']}")]
    assert fetched and all(r["status"] == 200 for r in fetched), phase_of(report, "reload")
    framed = reload["framed"]
    assert framed["pixels"]["orange"] > 100 and framed["pixels"]["blue"] > 100, framed
    later = reload["later"]
    assert later["last_step"] > after["last_step"] and later["points"] == later["last_step"], later  # ws continues
    print(f"reload at step {before['last_step']}/{run['total_steps']}: {after['points']} points back "
          f"{reload['seconds_to_points']:.1f} s after reload (GET {fetched[0]['url'].split('/api')[-1]}), "
          f"{later['points']} three seconds later")


def test_preview_player_and_validation_series_mid_run(drive):
    """While it trains, the node plays its preview clips (the newest epoch's, or the LoRA-off reference) from
    ComfyUI's /view and the chart draws the held-out validation loss and marks the epochs with previews."""
    report, cfg = drive
    p = report["checks"].get("previews")
    assert p, report["notes"]
    assert not p["info"]["done"] and p["route"]["done"] is False, "the run had ended"
    epochs = [s["epoch"] for s in p["preview_sets"] if not s["base"]]
    assert epochs and all(e % PREVIEW_EVERY == 0 for e in epochs) and any(s["base"] for s in p["preview_sets"])
    assert all(s["clips"] == 2 for s in p["preview_sets"]), p["preview_sets"]
    player = p["player"]
    assert player["display"] == "flex" and player["height"] >= 60, player
    assert player["choices"][0] == [f"epoch_{max(epochs)}", f"epoch {max(epochs)}"], player["choices"]
    assert player["choices"][-1] == ["base", "base (LoRA off)"] and player["chosen"] == f"epoch_{max(epochs)}"
    assert len(player["audio"]) == 2 and all("/view?" in a and "type=temp" in a for a in player["audio"])
    clip = p["clip"]  # Chromium's <audio> loaded it: a 2 s clip, served as FLAC
    assert clip.get("duration") == pytest.approx(e2e.TRAIN_SETTINGS["preview_seconds"], abs=0.05), clip
    assert clip["status"] == 200 and "flac" in clip["type"] and clip["bytes"] > 10_000, clip
    # the validation series: step 0 (LoRA off) and every VALIDATION_EVERY epochs, drawn in green
    assert p["validation"] >= 3 and p["route"]["validation"] >= p["validation"] - 1, p
    assert p["pixels"]["green"] > 20 and p["pixels"]["orange"] > 100, p["pixels"]
    assert " · val " in p["status"] and "(best " in p["status"], p["status"]
    assert os.path.getsize(cfg["previews_screenshot"]) > 10_000
    print(f"mid-run at step {p['last_step']}: preview sets {[s['epoch'] for s in p['preview_sets']]} (0 = LoRA off), "
          f"player {player['choices']}, clip {clip['duration']:.2f} s {clip['type']} {clip['bytes']} bytes; "
          f"{p['validation']} validation losses ({p['pixels']['green']} green px); status {p['status']!r}; "
          f"screenshot {cfg['previews_screenshot']}")


def test_help_panel_renders_node_doc(drive, server):
    report, cfg = drive
    with urllib.request.urlopen(f"{server.url}/extensions/{e2e.PACK_DIR_NAME}/docs/{TRAIN}.md", timeout=30) as r:
        assert r.status == 200 and r.read().decode().startswith("# ")
    help_ = report["checks"].get("help")
    assert help_, report["notes"]
    assert help_["doc_title"] in help_["panel_text"] and help_["doc_sentence"] in help_["panel_text"], help_
    doc_requests = [r for r in report["requests"] if "/docs/" in r["url"]]
    assert any(r["status"] == 200 and r["url"].endswith((f"/docs/{TRAIN}.md", f"/docs/{TRAIN}/en.md"))
               for r in doc_requests), doc_requests
    assert all(r["status"] == 200 for r in doc_requests), doc_requests
    print(f"help panel (Node Info): {help_['doc_title']!r}; doc requests: "
          f"{[(r['status'], r['url'].split(str(server.port))[-1]) for r in doc_requests]}")


def test_run_finishes_and_extension_logs_no_errors(drive):
    report, _ = drive
    checks = report["checks"]
    assert checks["finished_route"], report["notes"]
    end = checks["end"]
    assert end["info"]["done"] and end["points"] == end["last_step"] == end["info"]["total_steps"], end
    assert end["status"].endswith(" · done"), end["status"]
    known = sorted({urllib.parse.urlsplit(r["url"]).path for r in report["http_errors"]
                    if ours(r["url"]) and known_404(r["url"])})
    bad_http = [r for r in report["http_errors"] if ours(r["url"]) and not known_404(r["url"])]
    # Chromium logs each failed request as a console error ("Failed to load resource ... 404"), with its URL
    bad_console = [c for c in report["console"] if c["type"] in ("error", "warning")
                   and (ours(c["text"]) or ours(c["url"])) and not (known_404(c["url"]) or known_404(c["text"]))]
    bad_stacks = [c for c in report.get("console_stacks", []) if (ours(c["stack"]) or ours(c["text"]))
                  and not known_404(c["text"])]
    bad_page = [e for e in report["page_errors"] if ours(e["stack"]) or ours(e["message"])]
    assert not (bad_console or bad_stacks or bad_page or bad_http), (bad_console, bad_stacks, bad_page, bad_http)
    other = sorted({c["text"][:100] for c in report["console"] if c["type"] == "error"})
    print(f"end: {end['status']!r}; no console error, page error or HTTP error from the pack's JS or routes; "
          f"known 404s for pack files (frontend fallbacks): {known}; {len(other)} other console errors from the core "
          f"frontend: {other}")


def test_advanced_inputs_are_folded_in_nodes_2(drive, object_info):
    """Expert knobs ("advanced": True, from the option table) are hidden behind "Show advanced inputs" on the Prepare
    and Train nodes in Nodes 2.0; the classic canvas of frontend 1.42 draws every widget (it reads only the widget's
    own ``advanced`` property, which the frontend sets for none), as for ComfyUI's core nodes."""
    report, cfg = drive
    adv = report["checks"].get("advanced")
    assert adv and adv.get("unfolded"), report["notes"]
    for kind in (PREPARE, TRAIN):
        inputs = {**object_info[kind]["input"]["required"], **object_info[kind]["input"].get("optional", {})}
        widgets = [n for n in inputs if e2e.is_widget(inputs[n])]
        advanced = [n for n in widgets if inputs[n][1].get("advanced")]
        assert advanced, kind
        classic = {w["name"]: w for w in adv["classic"][kind]}
        assert [n for n in widgets if classic[n]["advanced"]] == advanced, (kind, adv["classic"][kind])
        folded, unfolded = adv["folded"][kind], adv["unfolded"][kind]
        assert "Node Slots Error" not in folded, folded  # a tooltip the frontend's i18n cannot compile breaks slots
        assert "Show advanced inputs" in folded and not set(advanced) & set(folded), (kind, folded)
        assert set(widgets) - set(advanced) <= set(folded), (kind, set(widgets) - set(advanced) - set(folded))
        assert set(widgets) <= set(unfolded), (kind, set(widgets) - set(unfolded))
        shown_classic = [n for n in advanced if classic[n]["visible"]]
        print(f"{kind}: {len(advanced)} advanced inputs folded in Nodes 2.0 ({', '.join(advanced)}); "
              f"the classic canvas draws {len(shown_classic)} of them")
    assert adv["folded_after_shot"] == adv["folded"]
    assert adv.get("shot") and os.path.getsize(cfg["advanced_screenshot"]) > 10_000, adv.get("shot")
    print(f"screenshot {cfg['advanced_screenshot']}")
