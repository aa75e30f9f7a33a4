"""Where Prepare and Train take the model from: the official download or the files ComfyUI users already have.

``ModelSource.official(checkpoint_dir, config_path)`` is the ``ACE-Step/Ace-Step1.5`` folder layout (checkpoint.py);
``ModelSource.comfy(...)`` takes ComfyUI-format files (native.py): a diffusion model, VAE and text encoder as split
files, or one all-in-one checkpoint, with parts it lacks filled from an official folder when one is given. Both
answer the same calls (``load_dit``, ``load_vae``, ``load_text_encoder``, ``load_silence_latent``, ``identity``,
``describe``), so the trainer and the preparation code never look at file layouts.

``resolve_choice`` turns what Prepare and Train are given into a source: the nodes' dropdown entries (official DiT
folders, ``diffusion_models/<file>``, ``checkpoints/<file>``, "auto" or ``vae/<file>`` / ``text_encoders/<file>``)
or, on the command line, file paths. ``model_choices`` / ``part_choices`` / ``default_model_choice`` build the
dropdowns from ComfyUI's model folders (``Folders``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional
from collections.abc import Sequence

import torch

from . import native
from .checkpoint import (DEFAULT_CONFIG_PATH, TEXT_ENCODER_DIR, VAE_DIR, dit_dir, dit_identity, file_identity,
                         folder_identity, list_dit_configs, load_config, load_dit, load_silence_latent,
                         read_silence_latent, require_dir)
from .config import VARIANT_FIELDS, AceStepConfig
from .model import COMPONENTS

OFFICIAL, COMFY = "official", "comfy"
# ComfyUI's bundled Qwen tokenizer, under its comfy/ package (what its own ACE-Step 1.5 text encoder uses)
COMFY_TOKENIZER = ("text_encoders", "qwen25_tokenizer")
NO_TOKENIZER = (
    "ComfyUI's text-encoder file has no tokenizer. Give the folder of the tokenizer ComfyUI ships "
    "(ComfyUI/comfy/text_encoders/qwen25_tokenizer) or the official Qwen3-Embedding-0.6B folder.")


@dataclass
class ModelSource:
    """One ACE-Step 1.5 model, wherever its files are. Build it with ``official`` or ``comfy``."""

    kind: str
    name: str  # what manifests record and Train compares (the DiT folder name, or the DiT file's stem)
    checkpoint_dir: Optional[str] = None
    config_path: Optional[str] = None
    dit_file: Optional[str] = None
    vae_file: Optional[str] = None
    text_encoder_file: Optional[str] = None
    official_dir: Optional[str] = None  # comfy: where a missing VAE / text encoder / tokenizer comes from
    tokenizer_dirs: tuple = ()
    silence_latent_file: Optional[str] = None
    given_variant: Optional[str] = None
    variant_given_where: str = "the variant input"  # Train: "Prepare's variant input", when taken from the manifest
    auto_parts: tuple = ()  # "vae", "text_encoder": picked by vae / text_encoder = auto, for describe()
    _config: Optional[AceStepConfig] = field(default=None, repr=False)
    _silence: Optional[torch.Tensor] = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def official(cls, checkpoint_dir: str, config_path: str = DEFAULT_CONFIG_PATH) -> ModelSource:
        """The official folder layout; an unknown folder or config_path fails here, naming what exists."""
        dit_dir(checkpoint_dir, config_path)
        return cls(OFFICIAL, os.path.basename(os.path.normpath(config_path)), checkpoint_dir=checkpoint_dir,
                   config_path=config_path)

    @classmethod
    def comfy(cls, diffusion_model: Optional[str] = None, vae: Optional[str] = None,
              text_encoder: Optional[str] = None, checkpoint: Optional[str] = None, *,
              variant: Optional[str] = None, tokenizer: Optional[Sequence[str] | str] = None,
              silence_latent: Optional[str] = None, official_dir: Optional[str] = None) -> ModelSource:
        """ComfyUI-format files. ``checkpoint`` (all-in-one) supplies whatever the split files do not.

        ``variant`` ("turbo"/"base"/"sft") is needed when the DiT file's name does not say it. ``tokenizer`` is a
        folder (or candidate folders, first usable wins) with a Qwen tokenizer. ``silence_latent`` is an official
        ``silence_latent.pt``; without one it is derived from the VAE. ``official_dir`` (an official checkpoint
        folder) fills a missing VAE, text encoder or tokenizer.
        """
        given = {"diffusion_model": diffusion_model, "vae": vae, "text_encoder": text_encoder,
                 "checkpoint": checkpoint, "silence_latent": silence_latent}
        for what, path in given.items():
            if path and not os.path.isfile(path):
                raise FileNotFoundError(f"{what} file not found: '{path}'.")
        parts = {native.DIT: diffusion_model, native.VAE: vae, native.TEXT_ENCODER: text_encoder}
        for part, path in parts.items():
            if path:
                _expect(path, part, f"{_INPUT[part]} '{path}'")
        if checkpoint:
            found = _expect(checkpoint, None, f"checkpoint '{checkpoint}'")
            if found.kind != native.CHECKPOINT:
                raise ValueError(f"checkpoint '{checkpoint}' is an ACE-Step 1.5 {native.PART_NAMES[found.kind]} file, "
                                 "not an all-in-one checkpoint; choose it in the matching input instead.")
            for part in found.provides:
                parts[part] = parts[part] or checkpoint
        if not parts[native.DIT]:
            raise ValueError("no diffusion model: choose an ACE-Step 1.5 file from models/diffusion_models (e.g. "
                             "acestep_v1.5_turbo.safetensors) or an all-in-one checkpoint from models/checkpoints.")
        if variant is not None and variant not in VARIANT_FIELDS:
            raise ValueError(f"variant '{variant}' is not one of {list(VARIANT_FIELDS)}.")
        if variant is None and native.variant_from_name(parts[native.DIT]) is None:
            raise ValueError(f"'{os.path.basename(parts[native.DIT])}': the file name does not say whether this is "
                             "the turbo, base or sft model (ComfyUI's files carry no config). Choose the variant.")
        if isinstance(tokenizer, str):
            tokenizer = [tokenizer]
        if official_dir and not os.path.isdir(official_dir):
            official_dir = None
        name = os.path.splitext(os.path.basename(parts[native.DIT]))[0]
        return cls(COMFY, name, dit_file=parts[native.DIT], vae_file=parts[native.VAE],
                   text_encoder_file=parts[native.TEXT_ENCODER], official_dir=official_dir,
                   tokenizer_dirs=tuple(t for t in (tokenizer or ()) if t), silence_latent_file=silence_latent,
                   given_variant=variant)

    # ------------------------------------------------------------------------------------------------------------
    # What it is

    @property
    def config(self) -> AceStepConfig:
        if self._config is None:
            if self.kind == OFFICIAL:
                self._config = load_config(self.checkpoint_dir, self.config_path)
            else:
                self._config = native.read_dit_config(self.dit_file, self.given_variant)
        return self._config

    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def variant_origin(self) -> str:
        if self.kind == OFFICIAL:
            return "config.json"
        return self.variant_given_where if self.given_variant else "the file name"

    def _official_part(self, sub: str) -> Optional[str]:
        """The official folder's vae/ or Qwen3-Embedding-0.6B/ (a ComfyUI models/vae folder is none: no config)."""
        root = self.checkpoint_dir if self.kind == OFFICIAL else self.official_dir
        path = os.path.join(root, sub) if root else None
        return path if path and os.path.isfile(os.path.join(path, "config.json")) else None

    def tokenizer_dir(self) -> Optional[str]:
        """The tokenizer folder used with a ComfyUI text-encoder file: the official one first (exact), then the
        given candidates."""
        from .text import has_tokenizer

        official = self._official_part(TEXT_ENCODER_DIR)
        for candidate in ([official] if official else []) + list(self.tokenizer_dirs):
            if has_tokenizer(candidate):
                return candidate
        return None

    def require(self, *parts: str) -> None:
        """Fail before any work when a part is missing: "vae", "text_encoder" (with its tokenizer)."""
        if "vae" in parts and not (self.kind == OFFICIAL or self.vae_file or self._official_part(VAE_DIR)):
            raise ValueError("no VAE: choose ace_1.5_vae.safetensors (models/vae) or an all-in-one checkpoint.")
        if "text_encoder" in parts:
            if not (self.kind == OFFICIAL or self.text_encoder_file or self._official_part(TEXT_ENCODER_DIR)):
                raise ValueError("no text encoder: choose qwen_0.6b_ace15.safetensors (models/text_encoders) or an "
                                 "all-in-one checkpoint.")
            if self.kind == COMFY and self.text_encoder_file and self.tokenizer_dir() is None:
                tried = ", ".join(f"'{t}'" for t in self.tokenizer_dirs) or "none given"
                raise FileNotFoundError(f"{NO_TOKENIZER} Tried: {tried}.")

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    def load_dit(self, components: tuple = COMPONENTS, device="cpu", dtype: torch.dtype = torch.float32):
        if self.kind == OFFICIAL:
            return load_dit(self.checkpoint_dir, self.config_path, device=device, dtype=dtype, components=components)
        return native.load_dit_file(self.dit_file, self.given_variant, device=device, dtype=dtype,
                                    components=components)

    def load_vae(self, device="cpu", dtype: torch.dtype = torch.float32, decoder: bool = True,
                 encoder: bool = True):
        """``decoder=False``: the encoder alone (Prepare only encodes); ``encoder=False``: the decoder alone
        (previews only decode)."""
        from .vae import load_vae

        self.require("vae")
        if self.kind == COMFY and self.vae_file:
            return native.load_vae_file(self.vae_file, device=device, dtype=dtype, decoder=decoder,
                                        encoder=encoder)
        root = self.checkpoint_dir if self.kind == OFFICIAL else self.official_dir
        return load_vae(root, device=device, dtype=dtype, decoder=decoder, encoder=encoder)

    def load_text_encoder(self, device="cpu", dtype: torch.dtype = torch.float32):
        from .text import load_text_encoder, load_tokenizer

        self.require("text_encoder")
        if self.kind == COMFY and self.text_encoder_file:
            tokenizer_dir = self.tokenizer_dir()
            encoder = native.load_text_encoder_file(self.text_encoder_file, load_tokenizer(tokenizer_dir),
                                                    device=device, dtype=dtype)
            rows = encoder.model.get_input_embeddings().num_embeddings
            if len(encoder.tokenizer) > rows:
                raise ValueError(f"the tokenizer in '{tokenizer_dir}' knows {len(encoder.tokenizer)} tokens, the text "
                                 f"encoder '{self.text_encoder_file}' only {rows}: they do not belong together. "
                                 "Use ComfyUI's qwen_0.6b_ace15.safetensors with ComfyUI's qwen25_tokenizer.")
            return encoder
        root = self.checkpoint_dir if self.kind == OFFICIAL else self.official_dir
        return load_text_encoder(root, device=device, dtype=dtype)

    def load_silence_latent(self, device="cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[1, T, 64]: the official file, or (ComfyUI files without one) derived once from the VAE loaded in fp32,
        as the official fp32 file was made (a bf16 VAE's rounding would show in the result)."""
        if self.kind == OFFICIAL:
            return load_silence_latent(self.checkpoint_dir, self.config_path, device=device, dtype=dtype)
        if self.silence_latent_file:
            return read_silence_latent(self.silence_latent_file, device=device, dtype=dtype)
        if self._silence is None:
            self._silence = native.derive_silence_latent(
                self.load_vae(device=device, dtype=torch.float32, decoder=False)).cpu()
        return self._silence.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------------------------
    # Identity and description

    def dit_identity(self) -> str:
        """Fingerprint of the DiT weights alone (what a training run's signature records)."""
        if self.kind == OFFICIAL:
            return dit_identity(self.checkpoint_dir, self.config_path)
        return file_identity(self.dit_file)

    def identity(self) -> dict:
        """What tensors prepared from this source depend on (the preparation cache key). For the official folder
        it equals the fingerprint Prepare computed before sources existed (tests/test_native.py keeps it), so existing
        caches stay valid."""
        cfg = self.config
        out = {"config_path": self.name, "variant": cfg.variant, "is_turbo": cfg.is_turbo,
               "condition_width": cfg.condition_width}
        if self.kind == OFFICIAL:
            out.update(dit=dit_identity(self.checkpoint_dir, self.config_path),
                       vae=folder_identity(require_dir(os.path.join(self.checkpoint_dir, VAE_DIR), "VAE")),
                       text_encoder=folder_identity(require_dir(os.path.join(self.checkpoint_dir, TEXT_ENCODER_DIR),
                                                                "Text encoder")))
            return out
        vae_dir, te_dir = self._official_part(VAE_DIR), self._official_part(TEXT_ENCODER_DIR)
        tokenizer = self.tokenizer_dir() if self.text_encoder_file else None
        out.update(source=COMFY, dit=self.dit_identity(),
                   vae=(file_identity(self.vae_file) if self.vae_file else
                        folder_identity(vae_dir) if vae_dir else None),
                   text_encoder=(file_identity(self.text_encoder_file) if self.text_encoder_file else
                                 folder_identity(te_dir) if te_dir else None),
                   tokenizer=folder_identity(tokenizer) if tokenizer else None,
                   silence_latent=(file_identity(self.silence_latent_file) if self.silence_latent_file
                                   else "derived from the VAE"))
        return out

    def _model_line(self) -> str:
        cfg = self.config
        return f"ACE-Step 1.5 {cfg.family} {cfg.variant} (DiT hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers)"

    def describe_dit(self) -> str:
        """One line: which model, from which folder or file, and where its variant came from."""
        cfg, head = self.config, self._model_line()
        if self.kind == OFFICIAL:
            return f"{head} from the official folder {dit_dir(self.checkpoint_dir, self.config_path)}"
        return f"{head} from the ComfyUI file {self.dit_file} (variant '{cfg.variant}' from {self.variant_origin})"

    def describe(self) -> str:
        """Several lines saying which files are used and what was chosen or derived automatically."""
        if self.kind == OFFICIAL:
            return self.describe_dit()
        cfg, head = self.config, self._model_line()
        lines = [f"{head} from ComfyUI files:",
                 f"  diffusion model: {self.dit_file} (variant '{cfg.variant}' from {self.variant_origin})"]
        for label, part, file, sub in (("VAE", native.VAE, self.vae_file, VAE_DIR),
                                       ("text encoder", native.TEXT_ENCODER, self.text_encoder_file, TEXT_ENCODER_DIR)):
            if file:
                how = (" (in the all-in-one file)" if file == self.dit_file else
                       " (auto)" if part in self.auto_parts else "")
                lines.append(f"  {label}: {file}{how}")
            else:
                official = self._official_part(sub)
                lines.append(f"  {label}: {official} (auto: no {label} file found, the official folder's)"
                             if official else f"  {label}: none")
        if self.text_encoder_file:
            lines.append(f"  tokenizer: {self.tokenizer_dir() or 'none found'}")
        lines.append("  silence latent: " + (self.silence_latent_file or
                                            "derived from the VAE (posterior mean of digital silence; the official "
                                            "folder ships it as silence_latent.pt)"))
        return "\n".join(lines)


_INPUT = {native.DIT: "diffusion_model", native.VAE: "vae", native.TEXT_ENCODER: "text_encoder"}


def _expect(path: str, part: Optional[str], what: str) -> native.NativeFile:
    found = native.classify_file(path)
    if found is None:
        raise ValueError(f"{what} is not an ACE-Step 1.5 file in ComfyUI's format (checked its tensor names and "
                         "shapes). Choose another file.")
    if part is not None and found.kind != part:
        raise ValueError(f"{what} is an ACE-Step 1.5 {native.PART_NAMES[found.kind]} file, not a "
                         f"{native.PART_NAMES[part]}. Choose it in the matching input.")
    return found


# ----------------------------------------------------------------------------------------------------------------
# Dropdown choices (the nodes pass ComfyUI's folder paths)

AUTO = "auto"
DIFFUSION_MODELS, CHECKPOINTS, VAES, TEXT_ENCODERS = "diffusion_models", "checkpoints", "vae", "text_encoders"


@dataclass
class Folders:
    """ComfyUI's model folders (``folder_paths.get_folder_paths(...)`` of each kind) and the official folder."""

    checkpoint_dir: Optional[str] = None  # official layout (default <models>/Ace-Step1.5)
    diffusion_models: Sequence[str] = ()
    checkpoints: Sequence[str] = ()
    vae: Sequence[str] = ()
    text_encoders: Sequence[str] = ()
    tokenizer_dirs: Sequence[str] = ()  # ComfyUI's comfy/text_encoders/qwen25_tokenizer


def model_choices(folders: Folders) -> list[str]:
    """Dropdown entries for the model: official DiT folders by name (``acestep-v15-turbo``, as before), then
    ``diffusion_models/<file>`` and ``checkpoints/<file>`` for ACE-Step 1.5 files ComfyUI's folders hold."""
    out = list(list_dit_configs(folders.checkpoint_dir)) if folders.checkpoint_dir else []
    out += [f"{DIFFUSION_MODELS}/{f.name}" for f in native.list_native_files(folders.diffusion_models, [native.DIT])
            if f.kind == native.DIT]
    out += [f"{CHECKPOINTS}/{f.name}" for f in native.list_native_files(folders.checkpoints, [native.DIT])
            if f.kind == native.CHECKPOINT]
    return out


def part_choices(folders: Folders, part: str) -> list[str]:
    """Dropdown entries for the VAE or text encoder: ``auto`` first, then ``vae/<file>`` / ``text_encoders/<file>``."""
    sub, dirs = (VAES, folders.vae) if part == native.VAE else (TEXT_ENCODERS, folders.text_encoders)
    return [AUTO] + [f"{sub}/{f.name}" for f in native.list_native_files(dirs, [part]) if f.kind == part]


def default_model_choice(choices: Sequence[str]) -> Optional[str]:
    """The 2B turbo when present (official folder first, then its ComfyUI file, then its all-in-one), else any
    turbo, else the first entry; None when there is nothing."""
    ranked = sorted(choices, key=lambda c: (
        c != DEFAULT_CONFIG_PATH,
        not os.path.basename(c).startswith(("acestep_v1.5_turbo.", "ace_step_1.5_turbo_aio.")),
        native.variant_from_name(c) != "turbo",
        "xl" in c.lower()))
    return ranked[0] if ranked else None


COMFY_FILES_HINT = (
    "Or use ComfyUI's ACE-Step 1.5 files (Comfy-Org/ace_step_1.5_ComfyUI_files): "
    "models/diffusion_models/acestep_v1.5_turbo.safetensors, models/vae/ace_1.5_vae.safetensors and "
    "models/text_encoders/qwen_0.6b_ace15.safetensors (or one all-in-one file in models/checkpoints), then "
    "refresh (R) and choose diffusion_models/... in config_path.")
VARIANT_CHOICES = (AUTO, *VARIANT_FIELDS)


def is_file_choice(model: str) -> bool:
    """A ComfyUI file (dropdown entry ``diffusion_models/...`` / ``checkpoints/...``, or a .safetensors path)
    rather than an official DiT folder."""
    return model.startswith((DIFFUSION_MODELS + "/", CHECKPOINTS + "/")) or model.lower().endswith(native.EXTENSIONS)


def _find(value: str, folders: Folders, what: str) -> str:
    """The file a dropdown entry ("vae/ace_1.5_vae.safetensors": in ComfyUI's vae folders) or a typed path
    (absolute, or relative to checkpoint_dir or the current folder) names."""
    value, base = os.path.expanduser(value.strip()), folders.checkpoint_dir
    sub, _, rel = value.partition("/")
    dirs = {DIFFUSION_MODELS: folders.diffusion_models, CHECKPOINTS: folders.checkpoints, VAES: folders.vae,
            TEXT_ENCODERS: folders.text_encoders}.get(sub, ()) if rel else ()
    candidates = [os.path.join(d, *rel.split("/")) for d in dirs]
    if base and not os.path.isabs(value):
        candidates.append(os.path.join(base, value))
    candidates.append(value)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{what} '{value}' was not found (looked in {list(dict.fromkeys(candidates))}); "
                            "refresh the node (R) to list the files that exist now.")


def _auto_part(folders: Folders, part: str, preferred: str) -> Optional[str]:
    dirs = folders.vae if part == native.VAE else folders.text_encoders
    files = [f for f in native.list_native_files(dirs, [part]) if f.kind == part]
    for f in files:
        if os.path.basename(f.path) == preferred:
            return f.path
    return files[0].path if files else None


def comfy_tokenizer_near(path: str, levels: int = 5) -> Optional[str]:
    """ComfyUI's bundled Qwen tokenizer (``comfy/text_encoders/qwen25_tokenizer``) of the ComfyUI install a model
    file sits in (``ComfyUI/models/text_encoders/x`` -> ``ComfyUI/comfy/...``): the command line's way to it."""
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(levels):
        candidate = os.path.join(folder, "comfy", *COMFY_TOKENIZER)
        if os.path.isdir(candidate):
            return candidate
        folder = os.path.dirname(folder)
    return None


def resolve_choice(model: str, folders: Folders, vae: str = AUTO, text_encoder: str = AUTO,
                   variant: Optional[str] = None, prepared: Optional[dict] = None) -> ModelSource:
    """The source Prepare and Train use, from their inputs.

    ``model`` (config_path): an official DiT folder name in ``folders.checkpoint_dir`` (or its absolute path); a
    dropdown entry ``diffusion_models/<file>`` / ``checkpoints/<file>`` found in ComfyUI's folders; or a
    .safetensors path (absolute, or relative to checkpoint_dir or the current folder). ``vae`` / ``text_encoder``:
    ``auto``, ``vae/<file>`` / ``text_encoders/<file>``, or a path. ``auto`` picks, in order: the part inside the
    chosen all-in-one checkpoint, Comfy-Org's file name (ace_1.5_vae / qwen_0.6b_ace15), any other recognised
    file, the official folder's part; what it picked is listed in ``describe()``. ``variant``: None or "auto"
    (config.json, or the file name), else turbo / base / sft. ``prepared``: the identity Prepare recorded
    (manifest "checkpoint"); Train takes the variant chosen there for the same file when its name does not say.
    """
    model = (model or "").strip()
    if not model:
        raise ValueError("config_path is empty: choose the model (an official acestep-v15-* folder or a ComfyUI "
                         "diffusion_models/... file).")
    variant = None if variant in (None, "", AUTO) else variant
    if variant is not None and variant not in VARIANT_FIELDS:
        raise ValueError(f"variant '{variant}' is not one of {list(VARIANT_CHOICES)}.")
    vae, text_encoder = (vae or AUTO).strip(), (text_encoder or AUTO).strip()
    if not is_file_choice(model):
        if vae != AUTO or text_encoder != AUTO:
            raise ValueError(f"config_path '{model}' is an official folder: it brings its own VAE and text encoder; "
                             "set vae and text_encoder to auto, or choose a ComfyUI diffusion_models/... file.")
        if folders.checkpoint_dir is None and not os.path.isabs(model):
            raise ValueError(f"config_path '{model}' is an official DiT folder name but no checkpoint_dir was given.")
        try:
            source = ModelSource.official(folders.checkpoint_dir or "", model)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}\n{COMFY_FILES_HINT}") from None
        if variant is not None and variant != source.variant:
            raise ValueError(f"variant '{variant}' contradicts {model}/config.json ('{source.variant}'); an official "
                             "folder says its variant itself: set variant to auto.")
        return source
    path = _find(model, folders, "config_path")
    found = native.classify_file(path)
    if found is None or found.kind not in (native.DIT, native.CHECKPOINT):
        what = f"an ACE-Step 1.5 {native.PART_NAMES[found.kind]} file" if found else \
            "not an ACE-Step 1.5 file in ComfyUI's format (checked its tensor names and shapes)"
        raise ValueError(f"config_path '{model}' is {what}; choose a diffusion model (models/diffusion_models) "
                         "or an all-in-one checkpoint (models/checkpoints).")
    all_in_one = found.kind == native.CHECKPOINT
    parts = {}
    from_prepare = variant is None and found.variant is None and bool(prepared) \
        and prepared.get("variant") in VARIANT_FIELDS and prepared.get("dit") == file_identity(path)
    if from_prepare:
        variant = prepared["variant"]
    for part, choice, preferred in ((native.VAE, vae, native.COMFY_VAE_NAME),
                                    (native.TEXT_ENCODER, text_encoder, native.COMFY_TEXT_ENCODER_NAME)):
        if choice != AUTO:
            parts[part] = _find(choice, folders, _INPUT[part])
        elif all_in_one and part in found.provides:
            parts[part] = None  # the checkpoint's own
        else:
            parts[part] = _auto_part(folders, part, preferred)  # None: the official folder's, if any
    near = comfy_tokenizer_near(parts[native.TEXT_ENCODER] or path)
    tokenizers = list(dict.fromkeys([*folders.tokenizer_dirs, *([near] if near else [])]))
    source = ModelSource.comfy(
        diffusion_model=None if all_in_one else path, checkpoint=path if all_in_one else None,
        vae=parts[native.VAE], text_encoder=parts[native.TEXT_ENCODER], variant=variant, tokenizer=tokenizers,
        official_dir=folders.checkpoint_dir)
    source.auto_parts = tuple(p for p, c in ((native.VAE, vae), (native.TEXT_ENCODER, text_encoder)) if c == AUTO)
    if from_prepare:
        source.variant_given_where = "Prepare's variant input (the same file)"
    return source


def from_config(cfg, folders: Optional[Folders] = None, prepared: Optional[dict] = None) -> ModelSource:
    """The source a ``PrepareSettings`` or ``TrainConfig`` names (Train has no vae / text_encoder: auto).
    ``folders``: ComfyUI's model folders, for the nodes' dropdown entries. Without them (the command line) the
    checkpoint_dir's diffusion_models/, checkpoints/, vae/ and text_encoders/ are looked in, so ComfyUI's models
    folder works as checkpoint_dir too. ``prepared``: see ``resolve_choice``."""
    base = cfg.checkpoint_dir or None
    if folders is None and base:  # the command line: checkpoint_dir may also be a ComfyUI models folder
        folders = Folders(**{kind: [os.path.join(base, kind)] for kind in (DIFFUSION_MODELS, CHECKPOINTS, VAES,
                                                                            TEXT_ENCODERS)})
    folders = dataclasses.replace(folders or Folders(), checkpoint_dir=base)
    return resolve_choice(cfg.config_path, folders, getattr(cfg, "vae", AUTO), getattr(cfg, "text_encoder", AUTO),
                          getattr(cfg, "variant", AUTO), prepared)
