"""The one table of preparation and training options, and the three things made from it.

Each option is declared once, as a field of the config dataclass it belongs to (``PrepareSettings``,
``TrainConfig``): name, type and default are the field's own; ``field(metadata=option(...))`` adds the rest
(tooltip, range, dropdown choices, whether it is an expert knob, where it sits on the node, its command-line
flags). ``table(cls)`` reads a dataclass back as ``Option`` rows, and from those rows come:

- the nodes' inputs, ``node_inputs(group)``: ComfyUI V1 ``INPUT_TYPES`` widgets with default, range, tooltip and
  ``"advanced": True`` for expert knobs (the frontend's Nodes 2.0 folds those behind "Show advanced inputs");
- the command line, ``add_cli_options(parser, group)``: one flag per option (old short spellings kept as aliases),
  its help text, its default and range in ``--help``, the same choices and ranges checked;
- a config from either, ``config_from_inputs(cls, values)``.

Adding an option is one field here. A node widget joins the end of its node section (saved workflows store widget
values by position, so existing widgets never move); ``node_after`` keeps the one older order that differs from the
field order. The two groups are ``PREPARE`` (Prepare's settings plus the folders it reads and writes) and ``TRAIN``.

References: ComfyUI 0.20's V1 input options (``comfy_api/latest/_io.py``: ``advanced``, ``control_after_generate``,
``round``); frontend 1.42 folds ``advanced`` widgets in Nodes 2.0 only (tests/e2e/README.md). tests/test_options.py
shows that the three agree.
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import Any, Optional, TypeVar
from collections.abc import Mapping, Sequence

from .audio import LONG_AUDIO_CHOICES
from .checkpoint import DEFAULT_CONFIG_PATH
from .compile import COMPILE_MODES
from .device import DEVICE_CHOICES
from .lora import DEFAULT_TARGETS
from .objective import TIMESTEP_SAMPLING
from .source import AUTO, VARIANT_CHOICES as VARIANTS

GRADIENT_CHECKPOINTING = ("auto", "on", "off")
TAG_POSITIONS = ("append", "prepend", "replace")
COMFY_DTYPES = ("bfloat16", "float16", "float32")
# The model input (config_path) of Prepare and Train; the nodes list what they find (acestep_lora.source).
MODEL_TOOLTIP = ("The model: an official DiT folder (acestep-v15-*, XL included, in checkpoint_dir) or a ComfyUI "
                 "file (diffusion_models/..., or an all-in-one checkpoints/...).")
MODEL_CLI_HELP = ("The model: a DiT folder inside --checkpoint-dir (any acestep-v15-*, XL included), or a ComfyUI "
                  "diffusion-model or all-in-one .safetensors file (absolute, or relative to --checkpoint-dir).")
VARIANT_TOOLTIP = ("turbo, base or sft. auto: an official folder's config.json says it, a ComfyUI file's name does "
                   "(acestep_v1.5_turbo); choose it for a file whose name says neither.")

REQUIRED, OPTIONAL = "required", "optional"  # the node sections an option's widget can sit in
NO_DEFAULT: Any = MISSING  # an option that must be given (a required flag on the command line)
COMFY_TYPES = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class Option:
    """One row of the table."""

    name: str
    kind: type  # bool, int, float or str (the config field's type)
    default: Any  # NO_DEFAULT: must be given
    tooltip: str  # the node's tooltip; the command line's help too, unless cli_help
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    choices: tuple = ()  # the allowed values: a dropdown on the node, checked on the command line
    open_choices: bool = False  # the command line accepts other values too (device cuda:1); the core checks them
    advanced: bool = False  # an expert knob: folded on the node, listed apart in --help
    node: str = ""  # REQUIRED / OPTIONAL: a widget in that section of the node; "": not on the node
    node_default: Any = None  # the widget's default where it differs (a path inside ComfyUI's output folder)
    node_after: str = ""  # put the widget right after this one (where saved workflows fixed another order)
    widget_type: str = ""  # ComfyUI type when not the field's (lora_alpha: an INT widget for a float field)
    widget: Mapping[str, Any] = field(default_factory=dict)  # more ComfyUI widget options ({"round": False})
    flags: tuple = ()  # command-line flags, canonical first, then old spellings; () = --name-with-dashes
    cli_help: str = ""  # the command line's help where the tooltip speaks of the node
    default_text: str = ""  # how --help shows a default that is no value to print (loras_dir's None)

    @property
    def required(self) -> bool:
        return self.default is NO_DEFAULT

    @property
    def cli_flags(self) -> tuple:
        return self.flags or ("--" + self.name.replace("_", "-"),)


def option(tooltip: str, **facts) -> dict:
    """A dataclass field's metadata that makes it a row of the table: ``field(default=..., metadata=option(...))``
    with ``facts`` any of ``Option``'s attributes after ``tooltip``."""
    return {"option": {"tooltip": tooltip, **facts}}


def model_option(note: str):
    """The model input (config_path) of Prepare and Train: the same row but for what the node says of it."""
    return field(default=DEFAULT_CONFIG_PATH, metadata=option(MODEL_TOOLTIP + note, node=REQUIRED,
                                                              cli_help=MODEL_CLI_HELP + note))


def device_option(section: str):
    """The device input of Prepare and Train (a required widget on Prepare, an optional one on Train)."""
    return field(default="auto", metadata=option(
        "auto = CUDA, else Apple MPS, else CPU.", choices=DEVICE_CHOICES, open_choices=True, advanced=True,
        node=section, cli_help="auto, cuda, mps or cpu (or cuda:N): auto = CUDA, else Apple MPS, else CPU."))


# ------------------------------------------------------------------------------------------------- the table
@dataclass
class PrepareSettings:
    """How Prepare encodes (``prepare.prepare_dataset``); the audio and the output folder are its arguments."""

    checkpoint_dir: str = field(metadata=option(
        "The official ACE-Step 1.5 download (folders acestep-v15-*, vae, Qwen3-Embedding-0.6B); its DiT folders "
        "are listed in config_path. Not needed with ComfyUI's own model files.", node=REQUIRED, advanced=True,
        cli_help="The official ACE-Step 1.5 download (folders acestep-v15-*, vae, Qwen3-Embedding-0.6B), or the "
                 "folder a relative .safetensors --config-path, --vae or --text-encoder is in."))
    config_path: str = model_option(" Train with the same one.")
    # The parts a ComfyUI diffusion-model file lacks (an official folder and an all-in-one file bring their own),
    # and the variant a file name may not say. Node widgets at the end (saved workflows keep their positions).
    vae: str = field(default=AUTO, metadata=option(
        "VAE for a ComfyUI model file. auto: an all-in-one file's own, else ace_1.5_vae.safetensors from "
        "models/vae, else the official folder's. An official DiT folder always uses its own.", advanced=True,
        node=OPTIONAL, node_after="detect_bpm",
        cli_help="VAE file for a .safetensors --config-path (ComfyUI's ace_1.5_vae.safetensors). auto: an "
                 "all-in-one file's own, else the --checkpoint-dir folder's."))
    text_encoder: str = field(default=AUTO, metadata=option(
        "Text encoder for a ComfyUI model file. auto: an all-in-one file's own, else qwen_0.6b_ace15.safetensors "
        "from models/text_encoders, else the official folder's. Its tokenizer is ComfyUI's own. An official DiT "
        "folder always uses its own.", advanced=True, node=OPTIONAL, node_after="vae",
        cli_help="Text encoder file for a .safetensors --config-path (ComfyUI's qwen_0.6b_ace15.safetensors). "
                 "auto: an all-in-one file's own, else the --checkpoint-dir folder's. Tokenizer: the "
                 "--checkpoint-dir folder's Qwen3-Embedding-0.6B, else the ComfyUI install's own "
                 "(comfy/text_encoders/qwen25_tokenizer above the file)."))
    variant: str = field(default=AUTO, metadata=option(
        VARIANT_TOOLTIP, choices=VARIANTS, advanced=True, node=OPTIONAL, node_after="text_encoder"))
    device: str = device_option(REQUIRED)
    custom_tag: str = field(default="", metadata=option(
        "A trigger word added to every caption (e.g. 'mystyle').", node=OPTIONAL))
    tag_position: str = field(default="append", metadata=option(
        "append: 'caption, tag'; prepend: 'tag, caption'; replace: the tag alone.", choices=TAG_POSITIONS,
        node=OPTIONAL))
    max_duration: float = field(default=240.0, metadata=option(
        "Longest training sample in seconds (240 s as the official trainer). Longer audio is split or cropped, "
        "see long_audio.", min=1.0, max=600.0, step=1.0, node=OPTIONAL,
        cli_help="Longest training sample in seconds (240 s as the official trainer). Longer audio is split or "
                 "cropped, see --long-audio."))
    long_audio: str = field(default="segments", metadata=option(
        "Audio longer than max_duration. segments: split into equal pieces of at most max_duration, each a "
        "training sample with the same metadata (all of the song is used). crop: keep the first max_duration "
        "seconds (the official trainer's way; the rest is lost). Only the part used is decoded.",
        choices=LONG_AUDIO_CHOICES, advanced=True, node=OPTIONAL,
        cli_help="Audio longer than --max-duration. segments: split into equal pieces of at most --max-duration, "
                 "each a training sample with the same metadata (all of the song is used). crop: keep the first "
                 "--max-duration seconds (the official trainer's way; the rest is lost)."))
    detect_bpm: bool = field(default=True, metadata=option(
        "Measure the tempo of samples whose bpm is unknown and train with it (the table says 'detected'); off: "
        "unknown stays unknown (N/A in the prompt).", advanced=True, node=OPTIONAL,
        cli_help="Measure the tempo of samples whose bpm is unknown and train with it (the table says "
                 "'detected'); --no-detect-bpm: unknown stays unknown (N/A in the prompt)."))
    vae_chunk_seconds: float = field(default=30.0, metadata=option(
        "The VAE encodes long audio in windows of this many seconds: shorter windows use less memory.",
        min=1.0, max=600.0, advanced=True))
    vae_overlap_seconds: float = field(default=2.0, metadata=option(
        "Context on each side of a VAE window, encoded and discarded so the windows join seamlessly.",
        min=0.0, max=30.0, advanced=True))


@dataclass
class TrainConfig:
    """Everything a training run is given (``train.train_lora``)."""

    tensor_dir: str = field(metadata=option(
        "Output of Prepare Training Data (relative paths are inside ComfyUI's output folder).", node=REQUIRED,
        node_default="acestep_lora/tensors",
        cli_help="The folder prepare wrote (manifest.json and one .pt per sample)."))
    checkpoint_dir: str = field(metadata=option(
        "The official ACE-Step 1.5 download (same as in Prepare); not needed with ComfyUI's own model files.",
        node=REQUIRED, advanced=True,
        cli_help="The official ACE-Step 1.5 download (same as for prepare), or the folder a relative .safetensors "
                 "--config-path is in."))
    output_dir: str = field(metadata=option(
        "Folder for checkpoints and the final adapter; its name is the LoRA's name. A new run needs an empty "
        "folder (or resume_from = latest).", node=REQUIRED, node_default="acestep_lora/runs/my_lora",
        node_after="config_path",
        cli_help="Folder for checkpoints and the final adapter; its name is the LoRA's name. A new run needs an "
                 "empty folder (or --resume-from latest)."))
    config_path: str = model_option(" Train the one the tensors were prepared with.")
    variant: str = field(default=AUTO, metadata=option(
        VARIANT_TOOLTIP + " It decides the training timesteps.", choices=VARIANTS, advanced=True, node=OPTIONAL,
        node_after="device"))
    lora_rank: int = field(default=64, metadata=option(
        "LoRA rank: capacity. 32 quick test, 64 standard, 128 large datasets.", min=4, max=256, step=4,
        node=REQUIRED, flags=("--lora-rank", "--rank")))
    lora_alpha: float = field(default=128.0, metadata=option(
        "Scaling: the LoRA acts with alpha/rank. Usually 2 x rank.", min=1, max=512, widget_type="INT",
        node=REQUIRED, flags=("--lora-alpha", "--alpha")))
    lora_dropout: float = field(default=0.1, metadata=option(
        "Dropout on the LoRA input; guards small datasets against overfitting.", min=0.0, max=0.5, step=0.01,
        advanced=True, node=REQUIRED, flags=("--lora-dropout", "--dropout")))
    learning_rate: float = field(default=3e-4, metadata=option(
        "Peak learning rate (warm-up, then cosine to 1%). 3e-4 standard, 1e-4 for large datasets.", min=1e-7,
        max=1e-2, step=1e-5, widget={"round": False}, node=REQUIRED, flags=("--learning-rate", "--lr")))
    train_epochs: int = field(default=1000, metadata=option(
        "Passes over the dataset. 500 quick, 1000 standard, 2000 for 200+ samples.", min=1, max=10000,
        node=REQUIRED, flags=("--train-epochs", "--epochs")))
    batch_size: int = field(default=1, metadata=option(
        "Samples per step (grouped by length). More uses more memory.", min=1, max=8, node=REQUIRED))
    gradient_accumulation: int = field(default=1, metadata=option(
        "Batches averaged per optimizer step (a larger effective batch at no extra memory).", min=1, max=64,
        node=REQUIRED, flags=("--gradient-accumulation", "--grad-accum")))
    save_every_n_epochs: int = field(default=200, metadata=option(
        "Checkpoint (adapter + resumable state + ComfyUI file) every N epochs; 0 = only at the end. Each "
        "checkpoint's LoRA is also listed in LoraLoaderModelOnly as <output_dir name>/epoch_N.", min=0, max=10000,
        node=REQUIRED, flags=("--save-every-n-epochs", "--save-every"),
        cli_help="Checkpoint (adapter + resumable state + ComfyUI file) every N epochs; 0 = only at the end. With "
                 "--loras-dir, each checkpoint's LoRA is also published there as <lora name>/epoch_N.safetensors."))
    seed: int = field(default=42, metadata=option(
        "Same seed and data give the same LoRA.", min=0, max=2 ** 31 - 1, widget={"control_after_generate": False},
        node=REQUIRED))
    resume_from: str = field(default="", metadata=option(
        "Empty: new run. 'latest': continue the newest checkpoint in output_dir (also after Cancel). Or a "
        "checkpoint folder path.", node=REQUIRED,
        cli_help="Empty: new run. 'latest': continue the newest checkpoint in --output-dir (also after Ctrl-C). "
                 "Or a checkpoint folder path."))
    target_modules: str = field(default=DEFAULT_TARGETS, metadata=option(
        "Decoder layers that get a LoRA (comma-separated): q_proj,k_proj,v_proj,o_proj (official), add "
        "gate_proj,up_proj,down_proj for more capacity.", advanced=True, node=REQUIRED))
    timestep_sampling: str = field(default="auto", metadata=option(
        "auto: turbo models use the 8 official shift-3 timesteps; base/sft use logit-normal timesteps with "
        "condition dropout, as they were trained.", choices=TIMESTEP_SAMPLING, advanced=True, node=OPTIONAL))
    cfg_dropout: float = field(default=0.15, metadata=option(
        "With logit-normal sampling: share of steps trained without the caption (keeps CFG working). Turbo "
        "ignores it.", min=0.0, max=0.5, step=0.01, advanced=True, node=OPTIONAL))
    gradient_checkpointing: str = field(default="auto", metadata=option(
        "Recompute activations to save memory (~30% slower). auto: on when the step would not fit in the GPU's "
        "free memory (estimated at the start, the reason is logged) and on Apple GPUs.",
        choices=GRADIENT_CHECKPOINTING, advanced=True, node=OPTIONAL))
    warmup_steps: int = field(default=100, metadata=option(
        "Linear warm-up (capped at 10% of all steps).", min=0, max=10000, advanced=True, node=OPTIONAL))
    weight_decay: float = field(default=0.01, metadata=option(
        "AdamW weight decay of the LoRA weights.", min=0.0, max=1.0, advanced=True))
    max_grad_norm: float = field(default=1.0, metadata=option(
        "Gradient clipping.", min=0.01, max=100.0, step=0.1, advanced=True, node=OPTIONAL,
        cli_help="Gradient clipping: the largest norm of the LoRA's whole gradient."))
    trigger_tag: str = field(default="", metadata=option(
        "Recorded in the LoRA's metadata; empty = Prepare's custom_tag.", advanced=True, node=OPTIONAL,
        cli_help="Recorded in the LoRA's metadata; empty = the custom tag prepare used."))
    lora_name: str = field(default="", metadata=option(
        "Name of the LoRA files (<name>.safetensors); empty = the name of the output folder."))
    loras_dir: Optional[str] = field(default=None, metadata=option(
        "Where the ComfyUI LoRA file goes, e.g. ComfyUI/models/loras; the periodic checkpoints' LoRAs are then "
        "also published there as <name>/epoch_<N>.safetensors.", default_text="the --output-dir folder"))
    device: str = device_option(OPTIONAL)
    log_every: int = field(default=10, metadata=option(
        "Read the loss back from the GPU every N optimizer steps (each read-back makes the host wait for the "
        "GPU; on CPU every step).", min=1, max=10000, advanced=True))
    comfy_dtype: str = field(default="bfloat16", metadata=option(
        "Weight dtype of the ComfyUI LoRA file.", choices=COMFY_DTYPES, advanced=True))
    dist_timeout: int = field(default=1800, metadata=option(
        "Several processes (torchrun): seconds a process waits for the others at a step (process 0's checkpoints "
        "and epoch hooks included) before the run stops as hung.", min=60, max=86400, advanced=True))
    # speed: the compiled step (acestep_lora/compile.py)
    compile: str = field(default="auto", metadata=option(
        "Compile the training step with torch.compile: fewer, fused GPU kernels, so faster steps; the first step of "
        "each length bucket takes longer (it compiles). auto: on for CUDA GPUs with Triton, off on CPU and Apple "
        "GPUs.", choices=COMPILE_MODES, advanced=True, node=OPTIONAL))
    cuda_graphs: bool = field(default=False, metadata=option(
        "Replay the compiled step as CUDA graphs (a few launches per step instead of hundreds). Experimental: not "
        "yet validated on a GPU; needs the compiled step on CUDA.", advanced=True))
    # Hear it while it trains (previews.py, validation.py)
    preview_every_n_epochs: int = field(default=-1, metadata=option(
        "Render short preview clips with the LoRA every N epochs and after the last one, and once with the LoRA "
        "off before training, to compare. -1 = with each checkpoint (save_every_n_epochs), 0 = no previews.",
        min=-1, max=10000, node=OPTIONAL))
    preview_count: int = field(default=2, metadata=option(
        "Preview clips per epoch (clip i at preview_seed + i).", min=1, max=8, advanced=True, node=OPTIONAL))
    preview_seconds: float = field(default=20.0, metadata=option(
        "Length of each preview clip in seconds.", min=1.0, max=120.0, step=1.0, advanced=True, node=OPTIONAL))
    preview_captions: str = field(default="", metadata=option(
        "Captions of the preview clips, one per line (or a JSON array); the trigger tag is added as in training. "
        "Empty = the captions of held-out samples, then of training samples.", widget={"multiline": True},
        node=OPTIONAL))
    preview_lyrics: str = field(default="", metadata=option(
        "Lyrics of the preview clips: one text, or blocks separated by a line holding only --- (or a JSON array). "
        "Empty = the samples' lyrics (instrumental with your own captions).", widget={"multiline": True},
        node=OPTIONAL))
    preview_seed: int = field(default=0, metadata=option(
        "Noise seed of the preview clips: the same seed at every epoch, so only the LoRA changes.", min=0,
        max=2 ** 31 - 1, widget={"control_after_generate": False}, advanced=True, node=OPTIONAL))
    validation_split: float = field(default=0.1, metadata=option(
        "Share of the samples held out of training to measure an honest validation loss (at least 1 when there "
        "are 5 or more, at most 20; 0 = off). The epoch with the lowest one is kept in best/.", min=0.0, max=0.5,
        step=0.01, node=OPTIONAL))
    validation_every_n_epochs: int = field(default=10, metadata=option(
        "Compute the validation loss every N epochs (and after the last one). Each costs about as much as "
        "training on 3 samples per held-out sample.", min=1, max=10000, advanced=True, node=OPTIONAL))


# The Trainer checks every config with this before anything is loaded, also one built in code (the ranges above
# are enforced by the node's widgets and the command line). Moved here from train.py, which re-exports it.
def check_config(c: TrainConfig) -> None:
    """Refuse values training cannot use, naming the value: a choice the table does not offer, or a number no run
    can use. The numbers' bounds are the core's, wider than the node's widget ranges (a test trains rank 1)."""
    for o in table(TrainConfig):
        value = getattr(c, o.name)
        if o.choices and not o.open_choices and value not in o.choices:
            raise ValueError(f"{o.name} must be one of {', '.join(map(str, o.choices))} (got {value!r})")
    rules = {"lora_rank": (c.lora_rank >= 1, ">= 1"), "lora_alpha": (c.lora_alpha > 0, "> 0"),
             "lora_dropout": (0 <= c.lora_dropout < 1, "in [0, 1)"), "learning_rate": (c.learning_rate > 0, "> 0"),
             "train_epochs": (c.train_epochs >= 1, ">= 1"), "batch_size": (c.batch_size >= 1, ">= 1"),
             "gradient_accumulation": (c.gradient_accumulation >= 1, ">= 1"),
             "save_every_n_epochs": (c.save_every_n_epochs >= 0, ">= 0"),
             "cfg_dropout": (0 <= c.cfg_dropout < 1, "in [0, 1)"),
             "preview_every_n_epochs": (c.preview_every_n_epochs >= -1, "-1 (with each checkpoint), 0 (off) or N >= 1"),
             "preview_count": (c.preview_count >= 1, ">= 1"),
             "preview_seconds": (0 < c.preview_seconds <= 600, "in (0, 600]"),
             "validation_split": (0 <= c.validation_split <= 0.5, "in [0, 0.5] (0.1 holds out 10 %, 0 turns it off)"),
             "validation_every_n_epochs": (c.validation_every_n_epochs >= 1, ">= 1")}
    for name, (ok, rule) in rules.items():
        if not ok:
            raise ValueError(f"{name} must be {rule} (got {getattr(c, name)})")


@cache
def table(cls: type) -> tuple[Option, ...]:
    """The rows a config dataclass declares, in field order. Every field is one (a field without ``option``
    metadata is an error: it would be a setting that neither the node nor the command line can give)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in fields(cls):
        facts = f.metadata.get("option")
        if facts is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no option(...) metadata; every field is an option.")
        kind = hints[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[str] -> str
        rows.append(Option(f.name, kind, f.default, **facts))
    return tuple(rows)


# What the Prepare command and node are given besides the settings: the folders. (The node takes the audio and
# metadata as lists, declared in nodes/prepare.py.)
PREPARE_FOLDERS = (
    Option("samples_dir", str, NO_DEFAULT, "Audio files with .json/.txt sidecars (or Create Training Sample's "
           "output folder)."),
    Option("output_dir", str, NO_DEFAULT, "Where the tensors go. Relative paths are inside ComfyUI's output "
           "folder.", node=REQUIRED, node_default="acestep_lora/tensors", flags=("--output-dir", "--output"),
           cli_help="The tensor folder to write (one .pt per sample and manifest.json)."),
)
PREPARE = (*PREPARE_FOLDERS, *table(PrepareSettings))
TRAIN = table(TrainConfig)


def by_name(group: Sequence[Option]) -> dict[str, Option]:
    return {o.name: o for o in group}


# ----------------------------------------------------------------------------------------- config from values
def config_from_inputs(cls: type[T], values: Mapping[str, Any], **overrides) -> T:
    """A ``cls`` from node inputs or parsed arguments (``vars(args)``): each field from ``overrides``, else
    ``values`` (None = not given), else its default. An INT widget's value for a float field becomes a float. Keys
    that are no field (the node's audio inputs, the command's folders) are left to the caller."""
    rows = by_name(table(cls))
    unknown = set(overrides) - set(rows)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    given = {}
    for name, row in rows.items():
        value = overrides[name] if name in overrides else values.get(name)
        if value is None:
            if row.required:
                raise ValueError(f"{cls.__name__}: {name} is required (it has no default).")
            continue
        if row.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif row.kind is bool:
            value = bool(value)
        given[name] = value
    return cls(**given)


# ---------------------------------------------------------------------------------------------- node widgets
def node_order(group: Sequence[Option]) -> list[Option]:
    """The options that are node widgets, in widget order: table order, then ``node_after`` moves."""
    ordered = [o for o in group if o.node]
    for o in [o for o in ordered if o.node_after]:
        ordered.remove(o)
        ordered.insert(next(i for i, p in enumerate(ordered) if p.name == o.node_after) + 1, o)
    return ordered


def node_inputs(group: Sequence[Option], defaults: Optional[Mapping[str, Any]] = None,
                choices: Optional[Mapping[str, Sequence]] = None) -> dict[str, dict[str, tuple]]:
    """ComfyUI ``INPUT_TYPES`` sections ``{"required": {...}, "optional": {...}}`` of the group's node widgets.

    ``defaults`` and ``choices`` are what only the node knows, at the time ComfyUI asks: a default inside
    ComfyUI's models folder, or the DiT folders found there (which makes that widget a dropdown)."""
    defaults, choices = dict(defaults or {}), dict(choices or {})
    widgets = by_name(node_order(group))
    unknown = (set(defaults) | set(choices)) - set(widgets)
    if unknown:
        raise KeyError(f"not a node widget of this group: {', '.join(sorted(unknown))}")
    sections: dict[str, dict[str, tuple]] = {REQUIRED: {}, OPTIONAL: {}}
    for name, o in widgets.items():
        default = defaults.get(name, o.default if o.node_default is None else o.node_default)
        if default is NO_DEFAULT:
            raise ValueError(f"node widget {name} has no default: give it a node_default or pass it in defaults")
        kind = o.widget_type or COMFY_TYPES[o.kind]
        spec: dict[str, Any] = {"default": int(default) if kind == "INT" else default}
        for key in ("min", "max", "step"):
            if getattr(o, key) is not None:
                spec[key] = getattr(o, key)
        spec.update(o.widget)
        if o.advanced:
            spec["advanced"] = True
        spec["tooltip"] = o.tooltip
        values = choices.get(name) or o.choices
        sections[o.node][name] = (list(values) if values else kind, spec)
    return sections


# ---------------------------------------------------------------------------------------------- command line
def shown_default(o: Option) -> str:
    """The default as ``--help`` shows it."""
    if o.default_text:
        return o.default_text
    if o.kind is bool:
        return "on" if o.default else "off"
    if o.default == "":
        return "empty"
    return _num(o.default) if isinstance(o.default, float) else str(o.default)


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def cli_help(o: Option) -> str:
    text = o.cli_help or o.tooltip
    facts = ["required"] if o.required else [f"default: {shown_default(o)}"]
    if o.min is not None and o.max is not None:
        facts.append(f"{_num(o.min)} to {_num(o.max)}")
    return f"{text} ({'; '.join(facts)})".replace("%", "%%")  # argparse %-formats help texts


def _number(o: Option):
    """argparse ``type`` that also checks the option's range (the range ComfyUI enforces on the node)."""
    def convert(text: str):
        try:
            value = o.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not {'an integer' if o.kind is int else 'a number'}") from None
        if (o.min is not None and value < o.min) or (o.max is not None and value > o.max):
            raise argparse.ArgumentTypeError(f"{text} is outside {_num(o.min)} to {_num(o.max)}")
        return value

    convert.__name__ = o.kind.__name__  # argparse names the type in its messages
    return convert


class _Switch(argparse.Action):
    """``--x`` / ``--no-x`` for an on/off option."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))


def add_cli_options(parser: argparse.ArgumentParser, group: Sequence[Option]) -> None:
    """One argument per option: ``dest`` is the option's name, expert knobs listed under "advanced options"."""
    advanced = parser.add_argument_group("advanced options")
    for o in group:
        target = advanced if o.advanced else parser
        kwargs: dict[str, Any] = {"dest": o.name, "help": cli_help(o)}
        if o.kind is bool:
            flags = [f for name in o.cli_flags for f in (name, "--no-" + name[2:])]
            target.add_argument(*flags, action=_Switch, nargs=0, default=o.default, **kwargs)
            continue
        if o.kind in (int, float):
            kwargs["type"] = _number(o)
        if o.choices and not o.open_choices:
            kwargs["choices"] = o.choices
        if o.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = o.default
        target.add_argument(*o.cli_flags, **kwargs)
