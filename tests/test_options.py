"""The option table (acestep_lora/options.py) and what is made from it agree: the config dataclasses, the nodes'
INPUT_TYPES and the command line show each option with the same name, default, range, choices and text."""
import argparse
import dataclasses
import importlib
import inspect
import re

import pytest

from acestep_lora import lora, options
from acestep_lora import train as train_mod
from acestep_lora.__main__ import _parser, main
from acestep_lora.options import PREPARE, TRAIN, PrepareSettings, TrainConfig, config_from_inputs

NODES = {"ACEStepLoRA_PrepareTrainingData": PREPARE, "ACEStepLoRA_Train": TRAIN}
# Inputs the nodes declare themselves (audio and metadata lists, Collect's link); everything else is the table's.
NODE_ONLY = {"ACEStepLoRA_PrepareTrainingData": {"audio_files", "captions", "lyrics_list", "bpm_list",
                                                 "keyscale_list", "language_list", "audio_input_1", "audio_input_2",
                                                 "audio_input_3", "audio_input_4", "timesignature_list"},
             "ACEStepLoRA_Train": set()}
# Widget order of the first release, then what later releases appended: saved workflows store widget values by
# position, so these never move (new options are appended after them).
SAVED_ORDER = {
    "ACEStepLoRA_PrepareTrainingData": ["audio_files", "captions", "lyrics_list", "bpm_list", "keyscale_list",
                                        "language_list", "output_dir", "checkpoint_dir", "config_path", "device",
                                        "custom_tag", "tag_position", "max_duration", "long_audio", "detect_bpm",
                                        "vae", "text_encoder", "variant"],  # appended: ComfyUI's model files
    "ACEStepLoRA_Train": ["tensor_dir", "checkpoint_dir", "config_path", "output_dir", "lora_rank", "lora_alpha",
                          "lora_dropout", "learning_rate", "train_epochs", "batch_size", "gradient_accumulation",
                          "save_every_n_epochs", "seed", "resume_from", "target_modules", "timestep_sampling",
                          "cfg_dropout", "gradient_checkpointing", "warmup_steps", "max_grad_norm", "trigger_tag",
                          "device", "variant", "compile",  # appended: variant (ComfyUI's model files), compile
                          # (speed), then previews and the validation loss
                          "preview_every_n_epochs", "preview_count", "preview_seconds", "preview_captions",
                          "preview_lyrics", "preview_seed", "validation_split", "validation_every_n_epochs"],
}
FOLDERS = {"prepare": ["--samples-dir", "s", "--output-dir", "t", "--checkpoint-dir", "c"],
           "train": ["--tensor-dir", "t", "--checkpoint-dir", "c", "--output-dir", "o"]}


def squash(text):
    """Text as argparse may wrap it: at spaces and after hyphens."""
    return re.sub(r"[\s-]", "", text)


def parse(command, *argv):
    return _parser().parse_args([command, *FOLDERS[command], *argv])


@pytest.mark.parametrize("group", [PREPARE, TRAIN], ids=["prepare", "train"])
def test_every_row_is_complete_and_consistent(group):
    assert len({o.name for o in group}) == len(group)
    for o in group:
        assert o.kind in (bool, int, float, str) and o.tooltip.strip().endswith("."), o.name
        assert o.node in ("", options.REQUIRED, options.OPTIONAL), o.name
        if o.required:
            continue
        if o.default is not None:
            assert isinstance(o.default, o.kind), o.name
        if o.choices:
            assert o.default in o.choices, o.name
        if o.min is not None:
            assert o.min <= o.default <= o.max, o.name


def test_the_dataclasses_are_the_table():
    """Every field is a row with the field's name, type and default; the core imports these very classes."""
    from acestep_lora import prepare as prepare_mod

    assert train_mod.TrainConfig is TrainConfig and prepare_mod.PrepareSettings is PrepareSettings
    for cls, rows in ((TrainConfig, TRAIN), (PrepareSettings, PREPARE[len(options.PREPARE_FOLDERS):])):
        assert [f.name for f in dataclasses.fields(cls)] == [o.name for o in rows]
        for f, o in zip(dataclasses.fields(cls), rows):
            assert o.default is f.default and o.kind.__name__ in f.type, f.name
    # the constants the core checks against are the table's choices and defaults
    assert train_mod.TIMESTEP_SAMPLING == options.TIMESTEP_SAMPLING
    assert TrainConfig.target_modules == lora.DEFAULT_TARGETS


def test_a_field_without_option_metadata_is_refused():
    @dataclasses.dataclass
    class Loose:
        knob: int = 3

    with pytest.raises(TypeError, match="Loose.knob has no option"):
        options.table(Loose)


@pytest.mark.parametrize("node_id", NODES)
def test_node_inputs_are_the_table(comfy, node_id):
    group, cls = NODES[node_id], comfy.pack.NODE_CLASS_MAPPINGS[node_id]
    types = cls.INPUT_TYPES()
    widgets = {name: (section, spec) for section in ("required", "optional") for name, spec in types[section].items()}
    rows = {o.name: o for o in group if o.node}
    assert set(widgets) - set(rows) == NODE_ONLY[node_id]
    assert not any(widgets[name][1][1].get("advanced") for name in NODE_ONLY[node_id])
    for name, o in rows.items():
        section, (kind, spec) = widgets[name]
        assert section == o.node, name
        assert spec["tooltip"] == o.tooltip and spec.get("advanced", False) is o.advanced, name
        for key in ("min", "max", "step"):
            assert spec.get(key) == getattr(o, key), (name, key)
        if name == "checkpoint_dir":  # ComfyUI's own models folder
            node_comfy = importlib.import_module(f"{comfy.pack.__name__}.nodes.comfy")
            assert spec["default"] == node_comfy.default_checkpoint_dir()
        elif name == "config_path":  # the models found (none here: the official names), the 2B turbo first
            assert isinstance(kind, list) and spec["default"] == o.default == kind[0]
        else:
            assert spec["default"] == (o.default if o.node_default is None else o.node_default), name
        if name == "config_path":
            pass
        elif name in ("vae", "text_encoder"):  # auto, then the files ComfyUI's folders hold (none here)
            assert kind == ["auto"], name
        elif o.choices:
            assert kind == list(o.choices), name
        else:
            assert kind == (o.widget_type or options.COMFY_TYPES[o.kind]), name
    order = [name for name in widgets if name in SAVED_ORDER[node_id] or name in rows]
    assert order[:len(SAVED_ORDER[node_id])] == SAVED_ORDER[node_id]
    assert types["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_node_values_make_the_config(comfy):
    """What the Train node receives (an INT widget for lora_alpha) builds the same TrainConfig the CLI builds."""
    train_node = comfy.pack.NODE_CLASS_MAPPINGS["ACEStepLoRA_Train"]
    types = train_node.INPUT_TYPES()
    values = {name: spec[1]["default"] for section in ("required", "optional")
              for name, spec in types[section].items()}
    from_node = config_from_inputs(TrainConfig, values, tensor_dir="t", checkpoint_dir="c", output_dir="o")
    assert from_node == config_from_inputs(TrainConfig, vars(parse("train")))
    assert from_node == TrainConfig("t", "c", "o")
    assert isinstance(config_from_inputs(TrainConfig, {**values, "lora_alpha": 16}, tensor_dir="t",
                                         checkpoint_dir="c", output_dir="o").lora_alpha, float)


@pytest.mark.parametrize("command,group", [("prepare", PREPARE), ("train", TRAIN)])
def test_cli_defaults_are_the_table_defaults(command, group):
    args = vars(parse(command))
    assert {o.name: args[o.name] for o in group if not o.required} == {o.name: o.default for o in group
                                                                       if not o.required}
    assert config_from_inputs(TrainConfig, vars(parse("train"))) == TrainConfig("t", "c", "o")
    assert config_from_inputs(PrepareSettings, vars(parse("prepare"))) == PrepareSettings("c")


@pytest.mark.parametrize("command,group", [("prepare", PREPARE), ("train", TRAIN)])
def test_help_shows_every_option_with_its_text_and_default(capsys, command, group):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for o in group:
        text = options.cli_help(o).replace("%%", "%")
        assert squash(text) in squash(out), o.name
        assert all(flag in out for flag in o.cli_flags), o.name
        assert ("(required)" in text) if o.required else ("(default: " in text), o.name
    if command == "prepare":
        assert "<name>_caption.txt" in out  # the sidecar convention stays in the epilog


def test_old_flags_still_work():
    args = parse("train", "--rank", "4", "--alpha", "8", "--dropout", "0", "--lr", "1e-3", "--epochs", "2",
                 "--grad-accum", "2", "--save-every", "1")
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout, args.learning_rate, args.train_epochs,
            args.gradient_accumulation, args.save_every_n_epochs) == (4, 8.0, 0.0, 1e-3, 2, 2, 1)
    args = _parser().parse_args(["prepare", "--samples-dir", "s", "--output", "t", "--checkpoint-dir", "c",
                                 "--long-audio", "crop", "--no-detect-bpm"])
    assert (args.output_dir, args.long_audio, args.detect_bpm) == ("t", "crop", False)
    assert parse("prepare", "--no-detect-bpm", "--detect-bpm").detect_bpm is True


def test_every_option_reaches_the_config_from_the_command_line():
    """Options the CLI used to lack (warmup_steps, weight_decay, max_grad_norm, trigger_tag, log_every,
    comfy_dtype, the VAE windows) are flags now and end up in the config."""
    cfg = config_from_inputs(TrainConfig, vars(parse(
        "train", "--warmup-steps", "7", "--weight-decay", "0.5", "--max-grad-norm", "2", "--trigger-tag", "x",
        "--log-every", "3", "--comfy-dtype", "float16", "--device", "cuda:1", "--loras-dir", "L")))
    assert (cfg.warmup_steps, cfg.weight_decay, cfg.max_grad_norm, cfg.trigger_tag, cfg.log_every,
            cfg.comfy_dtype, cfg.device, cfg.loras_dir) == (7, 0.5, 2.0, "x", 3, "float16", "cuda:1", "L")
    settings = config_from_inputs(PrepareSettings, vars(parse("prepare", "--vae-chunk-seconds", "10",
                                                              "--vae-overlap-seconds", "1")))
    assert (settings.vae_chunk_seconds, settings.vae_overlap_seconds) == (10.0, 1.0)


@pytest.mark.parametrize("argv,message", [
    (["--lora-rank", "300"], "argument --lora-rank/--rank: 300 is outside 4 to 256"),
    (["--lr", "1"], "argument --learning-rate/--lr: 1 is outside 1e-07 to 0.01"),
    (["--epochs", "2.5"], "argument --train-epochs/--epochs: '2.5' is not an integer"),
    (["--timestep-sampling", "uniform"], "argument --timestep-sampling: invalid choice: 'uniform'"),
])
def test_the_cli_checks_the_node_ranges_and_choices(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse("train", *argv)
    assert message in capsys.readouterr().err


def test_a_new_option_is_one_field():
    """The promise to later issues: one field with option metadata is a node widget (appended to its section),
    a command-line flag with help and default, and a config value."""
    @dataclasses.dataclass
    class WithNewKnob(TrainConfig):
        new_knob: bool = dataclasses.field(default=False, metadata=options.option(
            "A new knob.", advanced=True, node=options.OPTIONAL))

    group = options.table(WithNewKnob)
    widgets = options.node_inputs(group, defaults={"checkpoint_dir": "c"})
    assert list(widgets["optional"]) == [o.name for o in options.node_order(TRAIN) if o.node == options.OPTIONAL] + [
        "new_knob"]
    assert widgets["optional"]["new_knob"] == ("BOOLEAN", {"default": False, "advanced": True,
                                                           "tooltip": "A new knob."})
    parser = argparse.ArgumentParser()
    options.add_cli_options(parser, group)
    args = parser.parse_args(["--tensor-dir", "t", "--checkpoint-dir", "c", "--output-dir", "o", "--new-knob"])
    assert config_from_inputs(WithNewKnob, vars(args)).new_knob is True
    assert "A new knob. (default: off)" in " ".join(parser.format_help().split())


def test_node_inputs_want_what_only_the_node_knows():
    with pytest.raises(ValueError, match="checkpoint_dir has no default"):
        options.node_inputs(TRAIN)
    with pytest.raises(KeyError, match="weight_decay"):
        options.node_inputs(TRAIN, defaults={"checkpoint_dir": "c", "weight_decay": 0.1})


def test_advanced_options():
    """The expert knobs, folded on the nodes: the musician sees folders, model, rank/alpha, learning rate,
    epochs, batch, checkpoints, seed and resume (Train), and the folders, model, tag and length (Prepare). The
    official folder's path, the VAE / text-encoder files and the variant are found automatically."""
    assert [o.name for o in options.node_order(TRAIN) if o.advanced] == [
        "checkpoint_dir", "lora_dropout", "target_modules", "timestep_sampling", "cfg_dropout",
        "gradient_checkpointing", "warmup_steps", "max_grad_norm", "trigger_tag", "device", "variant",
        "compile", "preview_count", "preview_seconds", "preview_seed", "validation_every_n_epochs"]
    assert [o.name for o in options.node_order(PREPARE) if o.advanced] == [
        "checkpoint_dir", "device", "long_audio", "detect_bpm", "vae", "text_encoder", "variant"]


def test_the_node_functions_declare_no_option_defaults(comfy):
    """The node functions take the table's widgets as keyword inputs: no second list of defaults to drift."""
    for node_id, group in NODES.items():
        cls = comfy.pack.NODE_CLASS_MAPPINGS[node_id]
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        assert any(p.kind is p.VAR_KEYWORD for p in params.values()), node_id
        assert not {o.name for o in group} & set(params), node_id
