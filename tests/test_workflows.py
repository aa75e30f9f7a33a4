"""example_workflows/*.json: UI-format ComfyUI workflows that load in the frontend and fit the nodes' real inputs.

Checked here: the JSON parses; links are consistent in both directions (links table <-> node input/output slots)
and typed; the graph has no cycle; our nodes exist and their widgets_values match their widget inputs (count,
combo choices, number ranges, and the Python function accepts them); other packs' nodes have the widget counts
of their sources (ComfyUI 0.20 nodes.py / comfy_extras, kaola's nodes.py); and each example wires what it is
named for. What only a browser can confirm (the frontend's own loading) is left to a real ComfyUI session.
"""
import glob
import inspect
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
OURS = "ACEStepLoRA_"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}

# Widget counts of the other nodes used, from their sources (control_after_generate counts as a widget value):
EXTERNAL_WIDGETS = {
    "LoadAudio": 3,                     # audio, audioUI, upload (comfy_extras/nodes_audio.py + frontend)
    "PreviewAudio": 0,
    "UNETLoader": 2,                    # unet_name, weight_dtype (nodes.py)
    "DualCLIPLoader": 4,                # clip_name1, clip_name2, type, device
    "VAELoader": 1,                     # vae_name
    "LoraLoaderModelOnly": 2,           # lora_name, strength_model
    "ModelSamplingAuraFlow": 1,         # shift (comfy_extras/nodes_model_advanced.py)
    "KSampler": 7,                      # seed, control, steps, cfg, sampler_name, scheduler, denoise
    "TextEncodeAceStepAudio1.5": 15,    # tags, lyrics, seed, control, bpm, duration, timesignature, language,
                                        # keyscale, generate_audio_codes, cfg_scale, temperature, top_p, top_k, min_p
    "EmptyAceStep1.5LatentAudio": 2,    # seconds, batch_size (comfy_extras/nodes_ace.py)
    "ConditioningZeroOut": 0,
    "VAEDecodeAudio": 0,
    "SaveAudioMP3": 2,                  # filename_prefix, quality
    "ACE_STEP_TextToMusic": 23,         # kaola nodes.py: 9 required + control after seed + 13 optional widgets
    "MarkdownNote": 1,
}


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def widget_inputs(cls) -> list:
    """(name, spec) of the inputs the frontend shows as widgets, in widgets_values order; "control_after_generate"
    is the extra value the frontend stores after an INT that has it (or, by legacy convention, after one named
    seed/noise_seed that does not say)."""
    out = []
    types = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            opts = spec[1] if len(spec) > 1 else {}
            is_combo = isinstance(spec[0], (list, tuple))
            if not is_combo and (spec[0] not in WIDGET_TYPES or opts.get("forceInput")):
                continue
            out.append((name, spec))
            control = opts.get("control_after_generate", name in ("seed", "noise_seed"))
            if spec[0] == "INT" and control:
                out.append(("control_after_generate", (["fixed", "increment", "decrement", "randomize"], {})))
    return out


def socket_inputs(cls) -> dict:
    types = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            opts = spec[1] if len(spec) > 1 else {}
            if not isinstance(spec[0], (list, tuple)) and (spec[0] not in WIDGET_TYPES or opts.get("forceInput")):
                out[name] = spec[0]
    return out


@pytest.fixture(scope="module")
def workflows():
    return {os.path.basename(p): load(p) for p in FILES}


def test_the_four_examples_exist():
    names = [os.path.basename(p) for p in FILES]
    assert names == ["1_load_audio_to_lora.json", "2_file_paths_to_lora.json",
                     "3_train_then_kaola_text_to_music.json", "4_native_loraloader.json"]


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_links_are_consistent(path):
    wf = load(path)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in wf, key
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    link_ids = [link[0] for link in wf["links"]]
    assert len(set(link_ids)) == len(link_ids), "duplicate link ids"
    assert not link_ids or wf["last_link_id"] >= max(link_ids)
    for link in wf["links"]:
        lid, src, src_slot, dst, dst_slot, typ = link
        assert src in nodes and dst in nodes, f"link {lid}: missing node"
        output = nodes[src]["outputs"][src_slot]
        target = nodes[dst]["inputs"][dst_slot]
        assert lid in (output.get("links") or []), f"link {lid} not listed on node {src} output {src_slot}"
        assert target.get("link") == lid, f"link {lid} not set on node {dst} input {dst_slot}"
        assert output["type"] == typ and target["type"] in (typ, "*"), f"link {lid}: {output['type']}->{target}"
    by_id = {link[0]: link for link in wf["links"]}
    for n in wf["nodes"]:
        assert isinstance(n.get("widgets_values", []), list)
        for slot, i in enumerate(n.get("inputs", [])):
            if i.get("link") is not None:
                link = by_id.get(i["link"])
                assert link and link[3] == n["id"] and link[4] == slot, f"node {n['id']} input {i['name']}"
        names = [i["name"] for i in n.get("inputs", [])]
        assert len(set(names)) == len(names), f"node {n['id']} has duplicate inputs"
        for slot, o in enumerate(n.get("outputs", [])):
            for lid in o.get("links") or []:
                link = by_id.get(lid)
                assert link and link[1] == n["id"] and link[2] == slot, f"node {n['id']} output {o['name']}"
    # no cycles: the graph can be executed
    deps = {nid: {link[1] for link in wf["links"] if link[3] == nid} for nid in nodes}
    done = set()
    while len(done) < len(nodes):
        ready = {nid for nid in nodes if nid not in done and deps[nid] <= done}
        assert ready, "the link graph has a cycle"
        done |= ready


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_our_nodes_fit_their_definitions(comfy, path):
    mappings = comfy.pack.NODE_CLASS_MAPPINGS
    wf = load(path)
    if not os.path.basename(path).startswith("4_"):  # 4 is ComfyUI's native graph using the trained file
        assert any(n["type"].startswith(OURS) for n in wf["nodes"]), "the example uses this pack's nodes"
    for n in (n for n in wf["nodes"] if n["type"].startswith(OURS)):
        where = f"node {n['id']} ({n['type']})"
        assert n["type"] in mappings, f"{where}: not in NODE_CLASS_MAPPINGS"
        cls = mappings[n["type"]]
        widgets = widget_inputs(cls)
        values = n["widgets_values"]
        assert len(values) == len(widgets), (
            f"{where}: {len(values)} widgets_values, the node has {len(widgets)} widgets: {[w[0] for w in widgets]}")
        for (name, spec), value in zip(widgets, values):
            opts = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], (list, tuple)):
                assert value in spec[0], f"{where}: {name}={value!r} not one of {spec[0]}"
            elif spec[0] == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {name}={value!r}"
            elif spec[0] == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {name}={value!r}"
            elif spec[0] == "STRING":
                assert isinstance(value, str), f"{where}: {name}={value!r}"
            if spec[0] in ("INT", "FLOAT"):
                lo, hi = opts.get("min", value), opts.get("max", value)
                assert lo <= value <= hi, f"{where}: {name}={value} out of range"
        # inputs: sockets of the right type, or widgets converted to inputs (with "widget": {"name"})
        sockets = socket_inputs(cls)
        widget_names = {w[0] for w in widgets}
        for i in n["inputs"]:
            if "widget" in i:
                assert i["widget"]["name"] == i["name"] and i["name"] in widget_names, f"{where}: {i['name']}"
            else:
                assert sockets.get(i["name"]) == i["type"], f"{where}: input {i['name']} ({i['type']})"
        assert [i["name"] for i in n["inputs"] if "widget" not in i] == [s for s in sockets if s in
                                                                          {i["name"] for i in n["inputs"]}], where
        assert [(o["name"], o["type"]) for o in n["outputs"]] == list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES)), where
        # what the frontend would send (widgets by name, links as values) is accepted by the node's function
        kwargs = {name: value for (name, _), value in zip(widgets, values) if name != "control_after_generate"}
        kwargs.update({i["name"]: object() for i in n["inputs"] if i.get("link") is not None})
        inspect.signature(getattr(cls(), cls.FUNCTION)).bind(**kwargs)


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_other_nodes_have_their_widget_counts(path):
    for n in load(path)["nodes"]:
        if n["type"].startswith(OURS):
            continue
        assert n["type"] in EXTERNAL_WIDGETS, f"{n['type']}: add its widget count (from its source) to this test"
        assert len(n["widgets_values"]) == EXTERNAL_WIDGETS[n["type"]], f"node {n['id']} ({n['type']})"


def _by_type(wf, type_):
    return [n for n in wf["nodes"] if n["type"] == type_]


def _source(wf, node, input_name):
    """(source node, output name) feeding node's input, or None."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    inp = next(i for i in node["inputs"] if i["name"] == input_name)
    if inp.get("link") is None:
        return None
    link = next(link for link in wf["links"] if link[0] == inp["link"])
    src = nodes[link[1]]
    return src, src["outputs"][link[2]]["name"]


def test_1_load_audio_chain(workflows):
    wf = workflows["1_load_audio_to_lora.json"]
    creates = _by_type(wf, "ACEStepLoRA_CreateTrainingSample")
    assert len(_by_type(wf, "LoadAudio")) == 4 and len(creates) == 4
    for c in creates:
        assert _source(wf, c, "audio")[0]["type"] == "LoadAudio"
    # chained: exactly one Create starts the chain, and the chain's end feeds Collect
    firsts = [c for c in creates if _source(wf, c, "previous") is None]
    assert len(firsts) == 1
    ends = [c for c in creates if not any(_source(wf, o, "previous") and _source(wf, o, "previous")[0] is c
                                          for o in creates)]
    assert len(ends) == 1
    collect = _by_type(wf, "ACEStepLoRA_CollectTrainingSamples")[0]
    assert _source(wf, collect, "sample_info") == (ends[0], "sample_info")
    assert collect["widgets_values"][0] == creates[0]["widgets_values"][1], "Collect reads the folder Create writes"
    prepare = _by_type(wf, "ACEStepLoRA_PrepareTrainingData")[0]
    for name in ("audio_files", "captions", "lyrics_list", "bpm_list", "keyscale_list", "language_list",
                 "timesignature_list"):
        assert _source(wf, prepare, name) == (collect, name), name
    train = _by_type(wf, "ACEStepLoRA_Train")[0]
    assert _source(wf, train, "tensor_dir") == (prepare, "tensor_dir")


def test_2_typed_file_paths(workflows):
    wf = workflows["2_file_paths_to_lora.json"]
    prepare = _by_type(wf, "ACEStepLoRA_PrepareTrainingData")[0]
    values = dict(zip(["audio_files", "captions", "lyrics_list", "bpm_list", "keyscale_list"],
                      prepare["widgets_values"]))
    assert values == {"audio_files": "path/to/song1.wav,path/to/song2.wav,path/to/song3.wav",
                      "captions": "Electronic pop with synth,Upbeat dance track,Chill lo-fi beat",
                      "lyrics_list": "[Instrumental],[Instrumental],[Instrumental]",
                      "bpm_list": "120,128,90", "keyscale_list": "C Major,D Minor,F Major"}
    assert all(i.get("link") is None for i in prepare["inputs"]), "everything is typed in"
    train = _by_type(wf, "ACEStepLoRA_Train")[0]
    assert _source(wf, train, "tensor_dir") == (prepare, "tensor_dir")


def test_2_typed_lists_parse_to_three_samples(comfy, workflows):
    """The typed values go through Prepare's own list rules: one entry per file, the seed's comma form split
    (and said so) because it is unambiguous there."""
    from acestep_lora.lists import metadata_lists, parse_list

    prepare = _by_type(workflows["2_file_paths_to_lora.json"], "ACEStepLoRA_PrepareTrainingData")[0]
    names = ["audio_files", "captions", "lyrics_list", "bpm_list", "keyscale_list", "language_list"]
    values = dict(zip(names, prepare["widgets_values"]))
    assert len(parse_list(values["audio_files"], "audio_files")) == 3
    per_file, notes = metadata_lists(values, 3)
    assert per_file["captions"] == ["Electronic pop with synth", "Upbeat dance track", "Chill lo-fi beat"]
    assert per_file["lyrics_list"] == ["[Instrumental]"] * 3
    assert per_file["bpm_list"] == ["120", "128", "90"]
    assert per_file["keyscale_list"] == ["C Major", "D Minor", "F Major"]
    assert per_file["language_list"] == ["instrumental"] * 3
    assert any("captions: split at commas into 3" in n for n in notes)


def test_3_lora_info_reaches_kaola_text_to_music(workflows):
    wf = workflows["3_train_then_kaola_text_to_music.json"]
    t2m = _by_type(wf, "ACE_STEP_TextToMusic")[0]
    train = _by_type(wf, "ACEStepLoRA_Train")[0]
    assert _source(wf, t2m, "lora_info") == (train, "lora_info")
    inp = next(i for i in t2m["inputs"] if i["name"] == "lora_info")
    assert inp["type"] == "ACE_STEP_LORA_INFO"
    values = t2m["widgets_values"]
    # kaola's order: caption, checkpoint_dir, config_path, lm_model_path, duration, batch_size, seed, control, ...
    assert values[2] == train["widgets_values"][2] == "acestep-v15-turbo", "generate with the DiT that was trained"
    assert values[7] in ("fixed", "increment", "decrement", "randomize")
    assert values[20] == "None" and values[21] is False, "quantization and compile are incompatible with LoRA"


def test_4_native_graph(workflows):
    wf = workflows["4_native_loraloader.json"]
    one = lambda t: _by_type(wf, t)[0]  # noqa: E731
    lora, sampler = one("LoraLoaderModelOnly"), one("KSampler")
    assert _source(wf, lora, "model")[0]["type"] == "ModelSamplingAuraFlow"
    assert _source(wf, _source(wf, lora, "model")[0], "model")[0]["type"] == "UNETLoader"
    assert _source(wf, sampler, "model")[0] is lora
    assert lora["widgets_values"] == ["my_lora.safetensors", 1.0], "the file Train writes, at strength 1.0"
    assert one("ModelSamplingAuraFlow")["widgets_values"] == [3]
    assert sampler["widgets_values"][2:6] == [8, 1.0, "euler", "simple"]
    assert one("DualCLIPLoader")["widgets_values"][2] == "ace"
    assert _source(wf, sampler, "positive")[0]["type"] == "TextEncodeAceStepAudio1.5"
    assert _source(wf, sampler, "latent_image")[0]["type"] == "EmptyAceStep1.5LatentAudio"
    decode = one("VAEDecodeAudio")
    assert _source(wf, decode, "samples")[0] is sampler and _source(wf, decode, "vae")[0]["type"] == "VAELoader"
    assert _source(wf, one("SaveAudioMP3"), "audio")[0] is decode
    encode, latent = one("TextEncodeAceStepAudio1.5"), one("EmptyAceStep1.5LatentAudio")
    assert encode["widgets_values"][5] == latent["widgets_values"][0], "song duration = latent length"


def test_every_workflow_has_a_thumbnail():
    """The template browser requests <name>.jpg next to each workflow."""
    folder = os.path.join(ROOT, "example_workflows")
    for name in sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json")):
        path = os.path.join(folder, name + ".jpg")
        assert os.path.isfile(path), f"{name}.jpg missing"
        with open(path, "rb") as f:
            assert f.read(3) == b"\xff\xd8\xff"  # a JPEG
