"""Translations (locales/) and node help pages (web/docs/) stay in step with the nodes' real inputs and outputs.

locales/en/nodeDefs.json is generated from the Python definitions; after changing a node's name, inputs or
tooltips, regenerate it with:   .venv/bin/python tests/test_locales.py
and update locales/zh/nodeDefs.json and web/docs/ by hand (these tests say what is missing or stale).
"""
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # also when run as a script (regenerating locales/en)

from acestep_lora import options  # noqa: E402
LOCALES = os.path.join(ROOT, "locales")
DOCS = os.path.join(ROOT, "web", "docs")
CJK = re.compile(r"[\u4e00-\u9fff]")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?")
OPTION_NODES = {"ACEStepLoRA_PrepareTrainingData": options.PREPARE, "ACEStepLoRA_Train": options.TRAIN}
# How the node docs' input tables write "advanced" and the defaults that are words
DOC_WORDS = {"en": ("(advanced)", {"": "empty", True: "on", False: "off"}),
             "zh": ("（高级）", {"": "空", True: "开", False: "关"})}


def node_inputs(cls) -> dict:
    """Visible inputs (required, then optional) -> their options dict; hidden ones are not shown in the UI."""
    types = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            out[name] = spec[1] if len(spec) > 1 else {}
    return out


def expected_en(pack) -> dict:
    """ComfyUI's nodeDefs i18n schema, filled from the Python definitions."""
    defs = {}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        tooltips = getattr(cls, "OUTPUT_TOOLTIPS", ()) or ()
        defs[node_id] = {
            "display_name": pack.NODE_DISPLAY_NAME_MAPPINGS[node_id],
            "description": cls.DESCRIPTION,
            "inputs": {name: {"name": name, "tooltip": opts.get("tooltip", "")}
                       for name, opts in node_inputs(cls).items()},
            "outputs": {str(i): {"name": name, "tooltip": tooltips[i] if i < len(tooltips) else ""}
                        for i, name in enumerate(cls.RETURN_NAMES)},
        }
    return defs


def load(*parts):
    with open(os.path.join(LOCALES, *parts), encoding="utf-8") as f:
        return json.load(f)


def test_every_node_input_and_output_has_a_tooltip(comfy):
    """The zh files translate tooltips; an input without an English tooltip would have nothing to translate."""
    for node_id, entry in expected_en(comfy.pack).items():
        for kind in ("inputs", "outputs"):
            for item in entry[kind].values():
                assert item["tooltip"].strip(), f"{node_id} {kind[:-1]} {item['name']} has no tooltip"


def test_en_nodedefs_match_the_python_definitions(comfy):
    assert load("en", "nodeDefs.json") == expected_en(comfy.pack), (
        "locales/en/nodeDefs.json is stale: regenerate it with `.venv/bin/python tests/test_locales.py`")


def test_zh_nodedefs_cover_every_input_and_output(comfy):
    en = expected_en(comfy.pack)
    zh = load("zh", "nodeDefs.json")
    assert set(zh) == set(en), f"nodes: missing {set(en) - set(zh)}, extra {set(zh) - set(en)}"
    for node_id, ref in en.items():
        entry = zh[node_id]
        assert set(entry) == {"display_name", "description", "inputs", "outputs"}, node_id
        for field in ("display_name", "description"):
            assert CJK.search(entry[field]), f"{node_id}.{field} is not translated: {entry[field]!r}"
        for kind in ("inputs", "outputs"):
            missing, extra = set(ref[kind]) - set(entry[kind]), set(entry[kind]) - set(ref[kind])
            assert not missing and not extra, f"{node_id} {kind}: missing {sorted(missing)}, extra {sorted(extra)}"
            for key, item in entry[kind].items():
                where = f"{node_id} {kind} {key}"
                assert set(item) == {"name", "tooltip"}, where
                assert item["name"].strip() and CJK.search(item["tooltip"]), f"{where} is not translated: {item}"
                # numbers (defaults, ranges, recommended values) must survive the translation: a changed
                # English tooltip with new numbers flags the Chinese one as stale
                for number in NUMBER.findall(ref[kind][key]["tooltip"]):
                    assert number in item["tooltip"], (
                        f"{where}: the English tooltip says {number!r} but the Chinese one does not:\n"
                        f"  en: {ref[kind][key]['tooltip']}\n  zh: {item['tooltip']}")


def test_every_option_on_a_node_has_its_english_and_chinese_tooltip():
    """The English tooltips are the option table's; a new option without a Chinese one fails here."""
    en, zh = load("en", "nodeDefs.json"), load("zh", "nodeDefs.json")
    for node_id, group in OPTION_NODES.items():
        for o in options.node_order(group):
            assert en[node_id]["inputs"][o.name]["tooltip"] == o.tooltip, (
                f"locales/en/nodeDefs.json {node_id} {o.name} is stale: regenerate it")
            item = zh[node_id]["inputs"].get(o.name)
            assert item and CJK.search(item["tooltip"]), (
                f"locales/zh/nodeDefs.json: {node_id} has no Chinese tooltip for the option {o.name}")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_node_docs_give_every_option_its_default_and_advanced_mark(lang):
    """The input tables of web/docs/ against the option table: a row per widget, "(advanced)" exactly on the
    folded ones, and the default the node shows."""
    mark, words = DOC_WORDS[lang]
    for node_id, group in OPTION_NODES.items():
        path = os.path.join(DOCS, f"{node_id}.md") if lang == "en" else os.path.join(DOCS, node_id, f"{lang}.md")
        with open(path, encoding="utf-8") as f:
            rows = {m.group(1): (m.group(2).strip(), m.group(3).strip()) for m in
                    re.finditer(r"^\|\s*`(\w+)`[^|\n]*\|([^|\n]*)\|([^|\n]*)\|", f.read(), re.M)}
        where = os.path.relpath(path, ROOT)
        for o in options.node_order(group):
            assert o.name in rows, f"{where}: no input table row for `{o.name}`"
            kind, default = rows[o.name]
            assert (mark in kind) == o.advanced, f"{where}: `{o.name}` is {'' if o.advanced else 'not '}advanced"
            if o.name == "checkpoint_dir":  # ComfyUI's models folder, written as <ComfyUI>/models/Ace-Step1.5
                continue
            expected, cell = o.default if o.node_default is None else o.node_default, default.strip("`")
            if isinstance(expected, bool) or expected == "":
                assert cell == words[expected], f"{where}: `{o.name}` default {cell!r}"
            elif isinstance(expected, (int, float)):
                assert float(cell) == expected, f"{where}: `{o.name}` default {cell!r}, the node's is {expected}"
            else:
                assert cell == expected, f"{where}: `{o.name}` default {cell!r}, the node's is {expected!r}"


@pytest.mark.parametrize("parts", [("en", "nodeDefs.json"), ("zh", "nodeDefs.json"), ("zh", "main.json")])
def test_locale_texts_have_no_message_syntax(parts):
    """The frontend compiles locale texts as vue-i18n messages: a '{' or '}' (placeholder), '|' (plural) or '@'
    (linked message) in a tooltip is a compile error, and in Nodes 2.0 the node then shows "Node Slots Error"."""
    def texts(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from texts(item)
        else:
            yield value

    for text in texts(load(*parts)):
        assert not set("{}|@") & set(text), f"locales/{'/'.join(parts)}: {text!r}"


def test_zh_main_json_translates_the_category():
    main = load("zh", "main.json")
    assert CJK.search(main["nodeCategories"]["ACE-Step LoRA"])


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_node_docs_exist_and_name_every_input_and_output(comfy, lang):
    for node_id, cls in comfy.pack.NODE_CLASS_MAPPINGS.items():
        path = os.path.join(DOCS, f"{node_id}.md") if lang == "en" else os.path.join(DOCS, node_id, f"{lang}.md")
        assert os.path.isfile(path), f"missing {os.path.relpath(path, ROOT)}"
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if lang == "zh":
            assert CJK.search(text), path
        for name in [*node_inputs(cls), *cls.RETURN_NAMES]:
            assert f"`{name}`" in text, f"{os.path.relpath(path, ROOT)} does not mention `{name}`"


def test_train_docs_give_the_recommended_settings(comfy):
    """The seed's three presets (quick test / standard / high quality) in both languages."""
    for path in (os.path.join(DOCS, "ACEStepLoRA_Train.md"), os.path.join(DOCS, "ACEStepLoRA_Train", "zh.md")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        # lora_rank | lora_alpha | train_epochs | batch_size | gradient_accumulation | learning_rate
        for row in (["32", "64", "500", "1", "1", "3e-4"], ["64", "128", "1000", "1", "1", "3e-4"],
                    ["128", "256", "2000", "2", "2", "1e-4"]):
            cells = r"\|\s*" + r"\s*\|\s*".join(re.escape(c) for c in row) + r"\s*\|"
            assert re.search(cells, text), f"{path}: no table row with {row}"
        for word in ("resume_from", "latest", "LoraLoaderModelOnly", "adapter_config.json"):
            assert word in text, f"{path} does not mention {word}"


if __name__ == "__main__":  # regenerate locales/en/nodeDefs.json from the Python definitions
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import tempfile

    import headless

    headless.install(tempfile.mkdtemp())
    data = expected_en(headless.load_pack())
    os.makedirs(os.path.join(LOCALES, "en"), exist_ok=True)
    with open(os.path.join(LOCALES, "en", "nodeDefs.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")
    print(f"wrote locales/en/nodeDefs.json ({len(data)} nodes)")


def test_english_doc_copy_for_the_locale_request():
    """The help panel asks for docs/<Node>/en.md first (a 404 is logged otherwise); it must equal docs/<Node>.md."""
    docs = os.path.join(ROOT, "web", "docs")
    for name in sorted(f[:-3] for f in os.listdir(docs) if f.endswith(".md")):
        with open(os.path.join(docs, f"{name}.md"), encoding="utf-8") as a, \
                open(os.path.join(docs, name, "en.md"), encoding="utf-8") as b:
            assert a.read() == b.read(), f"web/docs/{name}/en.md differs from web/docs/{name}.md"
