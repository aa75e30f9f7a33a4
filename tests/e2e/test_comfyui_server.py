"""End-to-end test against a real ComfyUI server (headless, CPU): the pack loads, its four nodes run as a queued
workflow, the LoRA it writes loads in ComfyUI's native LoraLoaderModelOnly at the trained strength, and Cancel
leaves a resumable checkpoint.

Skipped unless ``COMFYUI_DIR`` points to a ComfyUI checkout (the folder with ``main.py``). ``COMFYUI_PYTHON`` is
the interpreter that runs the server (default: this one); it needs ComfyUI's requirements plus this pack's. The
server runs in a temporary ``--base-directory`` with this repository symlinked into its ``custom_nodes/``, listens
on 127.0.0.1 only, and is stopped at the end. See tests/e2e/README.md.
"""
from __future__ import annotations

import os
import sys

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
if not COMFYUI_DIR or not os.path.isfile(os.path.join(COMFYUI_DIR, "main.py")):
    pytest.skip("COMFYUI_DIR is not set to a ComfyUI checkout (folder with main.py)", allow_module_level=True)

import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from acestep_lora.checkpoint import TEXT_ENCODER_DIR, VAE_DIR  # noqa: E402
from acestep_lora.testing import tiny_dit_config, write_dit, write_text_encoder, write_vae  # noqa: E402

COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
PACK_DIR_NAME = "acestep-lora"
EXAMPLE_WORKFLOW = os.path.join(ROOT, "example_workflows", "1_load_audio_to_lora.json")
CONFIG = "acestep-v15-turbo"
START_TIMEOUT = 240
RUN_TIMEOUT = 600
N_CLIPS = 3
RANK, ALPHA = 8, 16

NODE_IDS = {
    "ACEStepLoRA_CreateTrainingSample": "ACE-Step Create Training Sample",
    "ACEStepLoRA_CollectTrainingSamples": "ACE-Step Collect Training Samples",
    "ACEStepLoRA_PrepareTrainingData": "ACE-Step LoRA Prepare Training Data",
    "ACEStepLoRA_Train": "ACE-Step LoRA Train",
}
CREATE, COLLECT, PREPARE, TRAIN = NODE_IDS
COLLECT_OUTPUTS = ["audio_files", "captions", "lyrics_list", "bpm_list", "keyscale_list", "language_list",
                   "timesignature_list"]
TRAIN_SETTINGS = dict(lora_rank=RANK, lora_alpha=ALPHA, lora_dropout=0.0, learning_rate=1e-3, train_epochs=3,
                      batch_size=1, gradient_accumulation=1, save_every_n_epochs=2, seed=1, resume_from="",
                      target_modules="q_proj,k_proj,v_proj,o_proj", warmup_steps=0, device="cpu",
                      preview_seconds=2.0)  # previews with each checkpoint (epoch 2), at the end and LoRA off


# ---------------------------------------------------------------------------------------------- tiny checkpoint
def comfy_compatible_config():
    """A tiny DiT that ComfyUI 0.20's ACE-Step 1.5 detection builds with exactly the checkpoint's shapes.

    ComfyUI (comfy/model_detection.py, ``encoder.lyric_encoder.layers.0.input_layernorm.weight`` branch) derives
    hidden_size, intermediate_size, num_heads (= q_proj rows // 128) and the encoder sizes from the weights and
    hard-codes the rest (comfy/ldm/ace/ace_step15.py): head_dim 128, 8 key/value heads, text_hidden_dim 1024,
    timbre_hidden_dim 64, 8 lyric / 4 timbre / 2 tokenizer / 2 detokenizer layers, fsq_dim 2048, and for the
    attention pooler and detokenizer 16 heads with an MLP of 3 x hidden. A mismatch there is a load error, so
    this config keeps all of those and is small only in hidden_size and the number of DiT layers.
    """
    return tiny_dit_config(CONFIG.rsplit("-", 1)[-1], hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, text_hidden_dim=1024,
                           timbre_hidden_dim=64, num_lyric_encoder_hidden_layers=8,
                           num_timbre_encoder_hidden_layers=4, num_attention_pooler_hidden_layers=2, fsq_dim=2048)


def write_checkpoint(path):
    cfg = comfy_compatible_config()
    write_dit(os.path.join(path, CONFIG), cfg, seed=0)
    write_vae(os.path.join(path, VAE_DIR), seed=2)
    write_text_encoder(os.path.join(path, TEXT_ENCODER_DIR), seed=3, hidden=cfg.text_hidden_dim)
    return path


def write_clips(input_dir, count=N_CLIPS, seconds=4.0, rate=44100):
    try:
        from synthetic_music import make_clip
    except ImportError:
        make_clip = None
    names = []
    for i in range(count):
        if make_clip is not None:
            wave = make_clip(100 + 15 * i, seconds, rate, seed=i, style=("rock", "house", "waltz", "sparse")[i % 4])
        else:
            t = torch.arange(int(seconds * rate)) / rate
            mono = sum(0.2 * torch.sin(2 * math.pi * f * (i + 1) * t) for f in (110.0, 220.0, 330.0))
            wave = torch.stack([mono, mono])
        name = f"e2e_clip_{i}.wav"
        sf.write(os.path.join(input_dir, name), wave.T.numpy(), rate, subtype="PCM_16")
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------------- the server
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base, port, proc, log_path):
        self.base, self.port, self.proc, self.log_path = base, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.output = os.path.join(base, "output")
        self.input = os.path.join(base, "input")
        self.models = os.path.join(base, "models")

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, chars=12000):
        return self.log()[-chars:]

    def request(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path):
        status, data = self.request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {data}"
        return data

    def submit(self, prompt):
        status, data = self.request("POST", "/prompt", {"prompt": prompt, "client_id": "acestep-lora-e2e"})
        # ComfyUI still queues a prompt when only some outputs fail validation (HTTP 200 + node_errors).
        assert status == 200 and not data.get("node_errors"), (
            f"POST /prompt -> {status}:\n{json.dumps(data, indent=1)[:6000]}\n--- server log ---\n"
            f"{self.log_tail(4000)}")
        return data["prompt_id"]

    def wait(self, prompt_id, timeout=RUN_TIMEOUT, expect="success"):
        """Poll /history/<id> until the prompt finished; returns its history entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"ComfyUI exited ({self.proc.returncode}):\n{self.log_tail()}"
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                got = entry["status"].get("status_str")
                assert got == expect, (f"prompt {prompt_id} ended with status {got!r}, expected {expect!r}:\n"
                                       f"{json.dumps(entry['status'].get('messages'), indent=1)[:8000]}\n"
                                       f"--- server log ---\n{self.log_tail()}")
                return entry
            time.sleep(1.0)
        pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s; queue: {self.get('/queue')}\n"
                    f"--- server log ---\n{self.log_tail()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


def launch_server(tmp_path_factory, request, name, populate):
    """A ComfyUI server on a fresh --base-directory with this pack in custom_nodes; ``populate(base)`` writes its
    models first. Stopped (its log printed on a failure) when the module's tests end."""
    base = str(tmp_path_factory.mktemp(name))
    for sub in ("custom_nodes", "input", "output", "models/loras", "models/diffusion_models", "user", "temp"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    os.symlink(ROOT, os.path.join(base, "custom_nodes", PACK_DIR_NAME))
    populate(base)
    log_path = os.path.join(base, "comfyui.log")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
           base, "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    log_file = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    srv = Server(base, port, proc, log_path)
    failed_before = request.session.testsfailed

    def finish():
        srv.stop()
        log_file.close()
        if request.session.testsfailed > failed_before:
            print(f"\n===== ComfyUI server log ({log_path}) =====\n{srv.log_tail(30000)}\n===== end of server log")

    request.addfinalizer(finish)
    deadline = time.time() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {proc.returncode} during start-up:\n{srv.log_tail()}")
        try:
            status, _ = srv.request("GET", "/system_stats", timeout=5)
            if status == 200:
                break
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.time() > deadline:
            pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{srv.log_tail()}")
        time.sleep(0.5)
    version = srv.get("/system_stats").get("system", {}).get("comfyui_version")
    print(f"\nComfyUI {version} on port {port}, base {base}")
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    # The checkpoint sits where the nodes' default checkpoint_dir points, so config_path's dropdown lists it;
    # the workflow still passes it as an absolute path.
    return launch_server(tmp_path_factory, request, "comfyui_base",
                         lambda base: write_checkpoint(os.path.join(base, "models", "Ace-Step1.5")))


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def load_pack():
    """This repository imported as a package, as ComfyUI imports it from custom_nodes/ (no ComfyUI needed)."""
    name = "acestep_lora_e2e_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# ------------------------------------------------------------------------------------- UI workflow -> API prompt
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SKIPPED_UI_NODES = {"Note", "MarkdownNote"}


def is_widget(spec):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def has_control_widget(name, spec):
    """The frontend adds a 'control after generate' widget (its value follows in widgets_values) when the option
    is set, and by default to INT inputs named seed / noise_seed."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    control = opts.get("control_after_generate")
    if control is None and spec[0] == "INT":
        return name in ("seed", "noise_seed")
    return bool(control)


def ui_to_api(workflow, object_info):
    """Convert a UI-format workflow (what the editor saves) to an API-format prompt.

    widgets_values are matched to the widget inputs in /object_info's input_order (required, then optional),
    skipping the frontend's control_after_generate values and any extra frontend-only widgets at the end
    (LoadAudio's player and upload button); links become [source id, output slot].
    """
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:  # [id, origin_id, origin_slot, target_id, target_slot, type]
            links[link[0]] = (link[1], link[2])

    def source(link_id):
        node_id, slot = links[link_id]
        node = nodes[node_id]
        while node["type"] == "Reroute":
            node_id, slot = links[node["inputs"][0]["link"]]
            node = nodes[node_id]
        return node, slot

    prompt = {}
    for node in sorted(nodes.values(), key=lambda n: n["id"]):
        kind = node["type"]
        if kind in SKIPPED_UI_NODES or kind in ("Reroute", "PrimitiveNode") or node.get("mode", 0) in (2, 4):
            continue  # notes, helpers, muted (2) and bypassed (4) nodes
        assert kind in object_info, f"workflow node {node['id']} has type {kind!r}, which the server does not know"
        info = object_info[kind]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        inputs = {}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in spec})
        else:
            i = 0
            for name in order:
                if not is_widget(spec[name]) or i >= len(values):
                    continue
                inputs[name] = values[i]
                i += 1
                if i < len(values) and values[i] in CONTROL_VALUES and has_control_widget(name, spec[name]):
                    i += 1
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            name = (slot.get("widget") or {}).get("name") or slot["name"]
            src, out_slot = source(slot["link"])
            if src["type"] == "PrimitiveNode":
                inputs[name] = src["widgets_values"][0]
            else:
                inputs[name] = [str(src["id"]), out_slot]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def build_training_prompt(clip_names):
    """Example workflow (1) built directly: LoadAudio x N -> Create (chained) -> Collect -> Prepare -> Train."""
    prompt, previous, nid = {}, None, 0
    for i, name in enumerate(clip_names):
        load, create = str(nid + 1), str(nid + 2)
        nid += 2
        prompt[load] = {"class_type": "LoadAudio", "inputs": {"audio": name}}
        prompt[create] = {"class_type": CREATE, "inputs": {
            "audio": [load, 0], "caption": f"synthetic groove number {i}, drums, bass, pads",
            "output_dir": "acestep_lora/samples", "lyrics": "[Instrumental]", "bpm": 100 + 15 * i,
            "keyscale": "C major", "language": "instrumental", "timesignature": "4/4"}}
        if previous:
            prompt[create]["inputs"]["previous"] = [previous, 0]
        previous = create
    collect, prepare, train = "50", "51", "52"
    prompt[collect] = {"class_type": COLLECT, "inputs": {"samples_dir": "acestep_lora/samples",
                                                         "sample_info": [previous, 0]}}
    prompt[prepare] = {"class_type": PREPARE, "inputs": {
        **{name: [collect, i] for i, name in enumerate(COLLECT_OUTPUTS)},
        "output_dir": "acestep_lora/tensors", "checkpoint_dir": "", "config_path": CONFIG, "device": "cpu",
        "custom_tag": "", "tag_position": "append", "max_duration": 240.0}}
    prompt[train] = {"class_type": TRAIN, "inputs": {
        "tensor_dir": [prepare, 0], "checkpoint_dir": "", "config_path": CONFIG,
        "output_dir": "acestep_lora/runs/my_lora", "timestep_sampling": "auto", "cfg_dropout": 0.15,
        "gradient_checkpointing": "auto", "max_grad_norm": 1.0, "trigger_tag": "", **TRAIN_SETTINGS}}
    return prompt


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def nodes_of(prompt, kind):
    return sorted((k for k, v in prompt.items() if v["class_type"] == kind), key=int)


def training_prompt(server, object_info, ckpt, clip_names=None):
    """Workflow (1) as an API prompt with this test's settings; from the example file when it exists.

    Returns (prompt, source description, ids of the Train and Prepare nodes)."""
    if os.path.isfile(EXAMPLE_WORKFLOW):
        with open(EXAMPLE_WORKFLOW, encoding="utf-8") as f:
            workflow = json.load(f)
        keep = {"LoadAudio", *NODE_IDS}
        off = [f"{n['id']} ({n['type']})" for n in workflow["nodes"] if n["type"] in keep and n.get("mode", 0)]
        assert not off, f"example workflow: nodes muted or bypassed: {off}"
        prompt = ui_to_api(workflow, object_info)
        prompt = {k: v for k, v in prompt.items() if v["class_type"] in keep}
        for node in prompt.values():  # drop links to nodes this test does not run (e.g. generation nodes)
            node["inputs"] = {k: v for k, v in node["inputs"].items()
                              if not (isinstance(v, list) and len(v) == 2 and str(v[0]) not in prompt)}
        loads = nodes_of(prompt, "LoadAudio")
        assert 1 <= len(loads) <= 4, f"example workflow has {len(loads)} LoadAudio nodes"
        clip_names = write_clips(server.input, len(loads))
        for node_id, name in zip(loads, clip_names):
            prompt[node_id]["inputs"]["audio"] = name
        where = f"example workflow {os.path.relpath(EXAMPLE_WORKFLOW, ROOT)} ({len(prompt)} nodes)"
    else:
        clip_names = clip_names or write_clips(server.input)
        prompt = build_training_prompt(clip_names)
        where = "graph built in the test (no example_workflows/1_load_audio_to_lora.json)"
    [prepare], [train] = nodes_of(prompt, PREPARE), nodes_of(prompt, TRAIN)
    prompt[prepare]["inputs"].update(checkpoint_dir=ckpt, config_path=CONFIG, device="cpu")
    prompt[train]["inputs"].update(checkpoint_dir=ckpt, config_path=CONFIG, output_dir="acestep_lora/runs/e2e_lora",
                                   **TRAIN_SETTINGS)
    # Core PreviewAny shows Train's outputs in /history (lora_info itself is not JSON-serialisable there).
    if "PreviewAny" in object_info:
        prompt["900"] = {"class_type": "PreviewAny", "inputs": {"source": [train, 0]}}
        prompt["901"] = {"class_type": "PreviewAny", "inputs": {"source": [train, 1]}}
    if "SaveAudio" in object_info:  # Train's AUDIO output (the last epoch's previews) into ComfyUI's own audio node
        prompt["902"] = {"class_type": "SaveAudio", "inputs": {"audio": [train, 2], "filename_prefix": "e2e/previews"}}
    return prompt, where, train, prepare


def check_wiring(prompt):
    """The graph of example workflow (1): chained Creates -> Collect(sample_info) -> Prepare(lists) -> Train."""
    loads, creates = nodes_of(prompt, "LoadAudio"), nodes_of(prompt, CREATE)
    [collect], [prepare], [train] = nodes_of(prompt, COLLECT), nodes_of(prompt, PREPARE), nodes_of(prompt, TRAIN)
    assert 2 <= len(loads) <= 4 and len(creates) == len(loads)
    assert sorted(prompt[c]["inputs"]["audio"][0] for c in creates) == sorted(loads)
    chained = [c for c in creates if isinstance(prompt[c]["inputs"].get("previous"), list)]
    assert len(chained) == len(creates) - 1, "Create nodes must be chained through 'previous'"
    referenced = {prompt[c]["inputs"]["previous"][0] for c in chained}
    [last] = [c for c in creates if c not in referenced]
    assert prompt[collect]["inputs"]["sample_info"] == [last, 0]
    for i, name in enumerate(COLLECT_OUTPUTS):
        assert prompt[prepare]["inputs"][name] == [collect, i], f"Prepare.{name} is not linked to Collect"
    assert prompt[train]["inputs"]["tensor_dir"] == [prepare, 0]


# ------------------------------------------------------------------------------------------------------- tests
def test_pack_loads_and_object_info_lists_the_nodes(server, object_info):
    log = server.log()
    lines = [ln for ln in log.splitlines() if ln.rstrip().endswith(os.path.join("custom_nodes", PACK_DIR_NAME))]
    assert lines, f"no import-time line for the pack in the server log:\n{log[-6000:]}"
    assert not any("IMPORT FAILED" in ln for ln in lines), "\n".join(lines) + "\n" + log[-8000:]
    assert "Cannot import" not in log, log[-8000:]
    print(f"pack load line: {lines[-1].strip()}")

    pack = load_pack()
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == NODE_IDS
    for node_id, display in NODE_IDS.items():
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info, cls = object_info[node_id], pack.NODE_CLASS_MAPPINGS[node_id]
        assert info["display_name"] == display and info["name"] == node_id
        assert info["python_module"] == f"custom_nodes.{PACK_DIR_NAME}"
        assert info["category"] == cls.CATEGORY and info["description"] == cls.DESCRIPTION
        assert info["output"] == list(cls.RETURN_TYPES) and info["output_name"] == list(cls.RETURN_NAMES)
        assert info["output_node"] == bool(getattr(cls, "OUTPUT_NODE", False))
        assert info["output_tooltips"] == list(cls.OUTPUT_TOOLTIPS)
        expected = cls.INPUT_TYPES()
        for section in ("required", "optional", "hidden"):
            names = list(expected.get(section, {}))
            assert info["input_order"].get(section, []) == names, (node_id, section)
            assert list(info["input"].get(section, {})) == names, (node_id, section)
            for name, spec in expected.get(section, {}).items():
                got = info["input"][section][name]
                if section == "hidden":
                    assert got == spec, (node_id, name, got)
                    continue
                if isinstance(spec[0], list):  # dropdown: contents depend on disk
                    assert isinstance(got[0], list) and got[0], (node_id, name, got)
                else:
                    assert got[0] == spec[0], (node_id, name, got)
                if len(spec) > 1:
                    opts = {k: v for k, v in spec[1].items()
                            if k != "default" or name not in ("checkpoint_dir", "config_path")}
                    assert {k: got[1].get(k) for k in opts} == opts, (node_id, name)
    # The checkpoint under models/Ace-Step1.5 is found: its DiT folder is listed first in the dropdown.
    assert object_info[PREPARE]["input"]["required"]["config_path"][0][0] == CONFIG
    assert object_info[TRAIN]["input"]["required"]["checkpoint_dir"][1]["default"] == \
        os.path.join(server.models, "Ace-Step1.5")
    assert object_info[PREPARE]["input"]["optional"]["timesignature_list"][1].get("forceInput") is True
    assert object_info[CREATE]["input"]["optional"]["previous"][1].get("forceInput") is True
    # the option table's expert knobs reach the frontend as "advanced": true (folded in Nodes 2.0)
    from acestep_lora import options

    for node_id, group in ((PREPARE, options.PREPARE), (TRAIN, options.TRAIN)):
        inputs = {**object_info[node_id]["input"]["required"], **object_info[node_id]["input"].get("optional", {})}
        advanced = [name for name, spec in inputs.items() if len(spec) > 1 and spec[1].get("advanced") is True]
        assert advanced == [o.name for o in options.node_order(group) if o.advanced], (node_id, advanced)
        print(f"{node_id} advanced: {', '.join(advanced)}")


@pytest.fixture(scope="module")
def trained(server, object_info):
    """Queue example workflow (1) once; returns what the tests below need."""
    ckpt = os.path.join(server.models, "Ace-Step1.5")
    prompt, where, train, prepare = training_prompt(server, object_info, ckpt)
    print(f"\ntraining workflow: {where}")
    check_wiring(prompt)
    started = time.time()
    prompt_id = server.submit(prompt)
    entry = server.wait(prompt_id)
    print(f"training workflow finished in {time.time() - started:.1f} s")
    outputs = entry["outputs"]
    result = dict(prompt=prompt, entry=entry, train=train, prepare=prepare, ckpt=ckpt,
                  run_dir=os.path.join(server.output, "acestep_lora", "runs", "e2e_lora"))
    if "900" in outputs:  # PreviewAny shows lora_info as JSON and the training log as text
        result.update(info=json.loads(outputs["900"]["text"][0]), log=outputs["901"]["text"][0])
        result.update(comfy_path=result["info"]["comfy_lora_path"], comfy_name=result["info"]["comfy_lora_name"])
    else:  # where the Train node writes them: models/loras/<output_dir name>.safetensors
        result.update(comfy_name="e2e_lora.safetensors",
                      comfy_path=os.path.join(server.models, "loras", "e2e_lora.safetensors"))
    return result


def test_training_workflow_writes_peft_adapter_and_comfy_lora(server, trained):
    prompt, outputs = trained["prompt"], trained["entry"]["outputs"]
    train, prepare, run_dir = trained["train"], trained["prepare"], trained["run_dir"]
    n = len(nodes_of(prompt, "LoadAudio"))
    status = outputs[prepare]["text"][0]
    assert f"{n} encoded" in status, status
    assert outputs[train]["text"][0].startswith("done: 3 epochs"), outputs[train]
    samples = os.path.join(server.output, prompt[nodes_of(prompt, COLLECT)[0]]["inputs"]["samples_dir"])
    assert len([f for f in os.listdir(samples) if f.endswith(".flac")]) == n, os.listdir(samples)
    assert len([f for f in os.listdir(samples) if f.endswith(".json")]) == n, os.listdir(samples)

    adapter = os.path.join(run_dir, "final", "adapter")
    if "info" in trained:
        info = trained["info"]
        assert info["path"] == adapter and info["output_dir"] == run_dir
        assert info["rank"] == RANK and info["alpha"] == ALPHA and info["epochs"] == 3 and info["steps"] == 3 * n
        assert math.isfinite(info["final_loss"])
        assert f"ComfyUI LoRA: {trained['comfy_path']}" in trained["log"] and "epoch 3/3" in trained["log"]
    assert os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        peft_config = json.load(f)
    assert peft_config["r"] == RANK and peft_config["lora_alpha"] == ALPHA
    assert os.path.dirname(trained["comfy_path"]) == os.path.join(server.models, "loras")
    assert os.path.isfile(trained["comfy_path"])
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "epoch_2"))  # save_every_n_epochs = 2
    print(f"PEFT adapter: {adapter}\nComfyUI LoRA: {trained['comfy_path']}")


def test_train_node_ui_holds_playable_previews(server, trained):
    """The node's result lists its preview clips as ComfyUI's audio previews (ui.audio in /history, files served
    by /view from the temp folder): the last epoch's clips first, then the LoRA-off reference; its AUDIO output
    goes into ComfyUI's SaveAudio."""
    outputs, train, run_dir = trained["entry"]["outputs"], trained["train"], trained["run_dir"]
    audio = outputs[train]["audio"]
    assert [a["filename"] for a in audio] == ["epoch_3_1.flac", "epoch_3_2.flac", "base_1.flac", "base_2.flac"]
    played = []
    for ref in audio:
        assert ref["type"] == "temp" and ref["subfolder"] == f"acestep_lora/{train}", ref
        query = urllib.parse.urlencode({k: ref[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"] in ("audio/flac", "audio/x-flac"), r.headers
            data, rate = sf.read(io.BytesIO(r.read()), dtype="float32")
        assert rate == 48000 and data.shape == (2 * 48000, 2) and 0 < abs(data).max() <= 1
        played.append(data)
    # the same clips as in the run folder
    disk, _ = sf.read(os.path.join(run_dir, "previews", "epoch_3", "preview_1.flac"), dtype="float32")
    assert (played[0] == disk).all() and not (played[0] == played[2]).all()  # LoRA on vs off differ
    sets = outputs[train]["acestep_lora_previews"]
    assert [(s["epoch"], s["base"]) for s in sets] == [(0, True), (2, False), (3, False)]
    log = [json.loads(line) for line in read_text(os.path.join(run_dir, "train_log.jsonl")).splitlines()]
    assert [e["epoch"] for e in log if "previews" in e] == [0, 2, 3]
    if "902" in outputs:  # SaveAudio wrote the AUDIO output: one file per clip, the clips' length
        saved = outputs["902"]["audio"]
        assert len(saved) == 2, saved
        data, rate = sf.read(os.path.join(server.output, saved[0]["subfolder"], saved[0]["filename"]))
        assert rate == 48000 and data.shape[0] == 2 * 48000
    print(f"ui.audio: {len(audio)} clips served by /view (type temp), 48 kHz stereo, 2.0 s; SaveAudio wrote "
          f"{len(outputs.get('902', {}).get('audio', []))} files from the AUDIO output")


def test_native_lora_loader_applies_trained_strength(server, trained):
    assert os.path.isfile(trained["comfy_path"]), "the training workflow wrote no ComfyUI LoRA"
    # The tiny DiT as ComfyUI's diffusion model: the official single-file layout (decoder.*, encoder.*, ...).
    base_file = os.path.join(trained["ckpt"], CONFIG, "model.safetensors")
    unet_name = "acestep_tiny_e2e.safetensors"
    shutil.copyfile(base_file, os.path.join(server.models, "diffusion_models", unet_name))
    print(check_lora_applied(server, unet_name, base_file, trained["comfy_name"], trained["comfy_path"],
                             comfy_compatible_config(), "e2e/patched"))


def check_lora_applied(server, unet_name, base_file, lora_name, lora_path, cfg, prefix):
    """UNETLoader(unet_name) -> LoraLoaderModelOnly(lora_name, 1.0) -> ModelSave on the server: no "lora key not
    loaded", every targeted weight = base + (alpha/rank)·B·A, every other weight unchanged; returns a summary."""
    from safetensors.torch import load_file

    info = server.get("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]
    assert lora_name in info["input"]["required"]["lora_name"][0], "LoRA not in LoraLoader's list"
    log_start = len(server.log())
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                              "strength_model": 1.0}},
        "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": prefix}},
    }
    server.wait(server.submit(prompt))
    run_log = server.log()[log_start:]
    assert "lora key not loaded" not in run_log, run_log
    assert not re.search(r"ERROR.*lora|unet missing|unet unexpected", run_log, re.I), run_log

    saved_dir = os.path.join(server.output, os.path.dirname(prefix))
    [saved_name] = [f for f in os.listdir(saved_dir) if f.startswith(os.path.basename(prefix))
                    and f.endswith(".safetensors")]
    patched = load_file(os.path.join(saved_dir, saved_name))
    base = load_file(base_file)
    lora = load_file(lora_path)

    def saved_key(key):  # ModelSave prefixes the diffusion model's keys (model.diffusion_model.<key>)
        found = [k for k in patched if k == key or k.endswith("." + key)]
        assert len(found) == 1, (key, found[:3])
        return found[0]

    modules = sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight"))
    assert len(modules) == cfg.num_hidden_layers * 2 * 4  # self + cross attention x q, k, v, o per DiT layer
    worst, worst_scale1 = 0.0, math.inf
    for module in modules:
        a = lora[f"base_model.model.{module}.lora_A.weight"].double()
        b = lora[f"base_model.model.{module}.lora_B.weight"].double()
        alpha = float(lora[f"base_model.model.{module}.alpha"])
        assert alpha == ALPHA and a.shape[0] == RANK and alpha / a.shape[0] == 2.0
        key = f"decoder.{module}.weight"
        w0, w1 = base[key].double(), patched[saved_key(key)].double()
        delta = (alpha / a.shape[0]) * (b @ a)
        assert delta.abs().max() > 1e-4, f"{module}: LoRA too small to tell the scale apart"
        tol = 1e-3 if patched[saved_key(key)].dtype == torch.float32 else 5e-2
        err = ((w1 - w0) - delta).norm() / delta.norm()
        err1 = ((w1 - w0) - delta / 2).norm() / delta.norm()  # what ComfyUI would do without the alpha key
        assert (w1 - w0).abs().max() > 0, f"{module} was not patched"
        assert err < tol, f"{module}: patched - base differs from (alpha/rank)·B·A by {err:.2e} (relative)"
        worst, worst_scale1 = max(worst, float(err)), min(worst_scale1, float(err1))
    assert worst_scale1 > 0.4  # the check can tell strength 2.0 from 1.0
    untouched = [k for k in base if not any(k == f"decoder.{m}.weight" for m in modules)]
    changed = [k for k in untouched if not torch.equal(base[k].to(patched[saved_key(k)].dtype),
                                                       patched[saved_key(k)])]
    assert not changed, f"weights without a LoRA changed: {changed[:5]}"
    return (f"native LoraLoaderModelOnly on {unet_name}: {len(modules)}/{len(modules)} targeted weights patched, "
            f"saved dtype {patched[saved_key('decoder.layers.0.self_attn.q_proj.weight')].dtype}, worst relative "
            f"error vs base + (alpha/rank)·B·A = {worst:.2e} (alpha/rank = {ALPHA / RANK:g}; scale 1.0 would be off "
            f"by {worst_scale1:.2f}); {len(untouched)} other weights unchanged; no 'lora key not loaded'")


def test_interrupt_saves_resumable_checkpoint(server, trained):
    tensor_dir = os.path.join(server.output, "acestep_lora", "tensors")
    if trained["prompt"][trained["prepare"]]["inputs"].get("output_dir"):
        tensor_dir = os.path.join(server.output, trained["prompt"][trained["prepare"]]["inputs"]["output_dir"])
    assert os.path.isfile(os.path.join(tensor_dir, "manifest.json"))
    run_dir = os.path.join(server.output, "acestep_lora", "runs", "e2e_cancel")
    train_inputs = dict(tensor_dir=tensor_dir, checkpoint_dir=trained["ckpt"], config_path=CONFIG,
                        output_dir="acestep_lora/runs/e2e_cancel", **dict(TRAIN_SETTINGS, train_epochs=1000,
                                                                          save_every_n_epochs=0))
    prompt_id = server.submit({"1": {"class_type": TRAIN, "inputs": train_inputs}})
    log_file = os.path.join(run_dir, "train_log.jsonl")
    deadline = time.time() + RUN_TIMEOUT
    while '"loss"' not in read_text(log_file):  # a line per finished epoch (previews and notes have their own)
        assert time.time() < deadline, f"training never reported an epoch:\n{server.log_tail()}"
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        assert not entry, f"the long training run ended before it was interrupted: {entry and entry['status']}"
        time.sleep(0.2)
    status, _ = server.request("POST", "/interrupt", {"prompt_id": prompt_id})
    assert status == 200
    entry = server.wait(prompt_id, expect="error")
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, entry["status"]
    cancelled = [d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.startswith("cancelled_")]
    assert len(cancelled) == 1, cancelled
    folder = os.path.join(run_dir, "checkpoints", cancelled[0])
    info = json.loads(read_text(os.path.join(folder, "checkpoint.json")))
    assert os.path.isfile(os.path.join(folder, "training_state.pt"))
    assert os.path.isfile(os.path.join(folder, "adapter", "adapter_model.safetensors"))
    assert [f for f in os.listdir(folder) if f.endswith(".safetensors")], os.listdir(folder)
    assert 0 < info["epoch"] < 1000 and info["complete_epoch"] is False
    print(f"interrupted: {cancelled[0]} (epoch {info['epoch']}, step {info['global_step']})")

    # Resumable: the same Train with resume_from = latest continues it and finishes one epoch later.
    resume = dict(train_inputs, resume_from="latest", train_epochs=info["epoch"] + 1)
    entry = server.wait(server.submit({"1": {"class_type": TRAIN, "inputs": resume},
                                       "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}))
    log = entry["outputs"]["2"]["text"][0]
    assert f"resumed from {folder} at step {info['global_step']}" in log, log
    assert f"done: {info['epoch'] + 1} epochs" in log, log
