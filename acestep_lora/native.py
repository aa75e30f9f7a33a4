"""ComfyUI's repackaged ACE-Step 1.5 files as a model source: one exact key map per component (DiT, VAE, text
encoder), the DiT and VAE configs derived from tensor shapes, lazy loading, recognising files from their headers,
and a converter that writes these formats from an official-layout folder.

The formats, as ComfyUI 0.20.1's own loaders read them (``comfy/model_detection.py`` ACE-Step 1.5 branch,
``comfy/sd.py`` VAE and text-encoder detection and ``load_diffusion_model_state_dict``,
``comfy/supported_models.py`` ``ACEStep15``, ``comfy/supported_models_base.py`` prefixes,
``comfy/text_encoders/ace15.py`` and ``llama.py``, ``comfy/ldm/audio/autoencoder.py``,
``comfy/ldm/ace/ace_step15.py``)::

  diffusion model  models/diffusion_models/acestep_v1.5_turbo.safetensors (also _base, _sft, _xl_turbo_bf16, ...):
                   the official DiT keys unchanged (decoder.*, encoder.*, tokenizer.*, detokenizer.*,
                   null_condition_emb); a file ComfyUI saved itself carries them under "model.diffusion_model.".
  VAE              models/vae/ace_1.5_vae.safetensors: the stable-audio-tools Oobleck layout of ComfyUI's
                   AudioOobleckVAE (encoder.layers.N..., decoder.layers.N..., Snake alpha/beta as [C]); weight norm
                   stored as weight_g/weight_v or as parametrizations.weight.original0/original1 (both load in ComfyUI).
  text encoder     models/text_encoders/qwen_0.6b_ace15.safetensors: Qwen3-Embedding-0.6B under "model."
                   (model.embed_tokens.weight, model.layers.N..., model.norm.weight). No tokenizer: ComfyUI ships
                   that itself (comfy/text_encoders/qwen25_tokenizer), see text.load_tokenizer.
  all-in-one       models/checkpoints/ace_step_1.5_turbo_aio.safetensors: the three above under
                   "model.diffusion_model.", "vae." and "text_encoders.qwen3_06b.transformer.", plus ComfyUI's
                   "text_encoders.qwen3_06b.logit_scale" and usually a 5 Hz LM under "text_encoders.qwen3_2b." or
                   "text_encoders.qwen3_4b." (not used for training; skipped).

Variant: turbo, base and sft files have identical keys and shapes and ComfyUI's files carry no config, so the
variant (which decides the training timestep schedule) is read from the file name ("turbo"/"base"/"sft" as a
word, as the official UI's own fallback does, ``generation_handlers.py`` ``get_model_type_ui_settings``) or given
by the user; a name that says neither or several is an error asking for it.

Silence latent: the official folder ships ``silence_latent.pt``; here it is derived from the VAE as the posterior
mean of digital silence (``derive_silence_latent``). ComfyUI's built-in silence latent
(``comfy/ldm/ace/ace_step15.py`` ``get_silence_latent``) has exactly that structure: a few edge frames, then one
constant frame repeated.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional
from collections.abc import Iterable

import torch

from .checkpoint import (DIT_PREFIX, TEXT_ENCODER_DIR, VAE_DIR, _weight_files, check_state_keys, component_prefixes,
                         dit_dir, load_config, read_header, read_safetensors, read_tensors, require_file)
from .config import VARIANT_FIELDS, AceStepConfig
from .model import COMPONENTS, AceStepModel

EXTENSIONS = (".safetensors", ".sft")
DIT, VAE, TEXT_ENCODER = "dit", "vae", "text_encoder"
CHECKPOINT = "checkpoint"  # an all-in-one file
PART_NAMES = {DIT: "diffusion model", VAE: "VAE", TEXT_ENCODER: "text encoder", CHECKPOINT: "all-in-one checkpoint"}
# Where each component sits inside an all-in-one checkpoint.
CHECKPOINT_PREFIXES = {DIT: "model.diffusion_model.", VAE: "vae.", TEXT_ENCODER: "text_encoders.qwen3_06b.transformer."}
# Keys an all-in-one file holds that training does not use: ComfyUI's CLIP-wrapper scalar, the 5 Hz LM.
CHECKPOINT_IGNORED = ("text_encoders.qwen3_06b.logit_scale", "text_encoders.qwen3_2b.", "text_encoders.qwen3_4b.")
TEXT_MODEL_PREFIX = "model."
SILENCE_FRAMES = 15000  # the official silence_latent.pt: [1, 64, 15000] (600 s at 25 frames/s)
# Qwen3-Embedding's token table; language-model files carry a padded (151,936) or audio-code (217,204) one.
EMBEDDING_VOCAB = 151669
SAMPLE_RATE = 48000

# ----------------------------------------------------------------------------------------------------------------
# Reading a file's header and the keys of one component


def _load_header(path: str) -> dict[str, tuple[str, tuple]]:
    require_file(path, "Model")
    return read_header(path)[0]


def is_checkpoint(tensors: dict) -> bool:
    """An all-in-one file: it holds a VAE or a text encoder next to the diffusion model."""
    return any(k.startswith(("vae.", "text_encoders.")) for k in tensors) and \
        any(k.startswith(CHECKPOINT_PREFIXES[DIT]) for k in tensors)


def component_view(path: str, tensors: dict, component: str) -> tuple[str, dict[str, tuple[str, tuple]]]:
    """``(prefix, {key without prefix: (dtype, shape)})`` of ``component`` in a ComfyUI-format file.

    Keys that belong to no known part of the file are an error here, so nothing in a file is silently skipped
    except what ``CHECKPOINT_IGNORED`` names.
    """
    if is_checkpoint(tensors):
        known = tuple(CHECKPOINT_PREFIXES.values())
        stray = sorted(k for k in tensors if not k.startswith(known) and not k.startswith(CHECKPOINT_IGNORED))
        if stray:
            raise ValueError(f"{path}: {len(stray)} unexpected keys for an ACE-Step 1.5 all-in-one checkpoint "
                             f"(e.g. {stray[:3]}). Is it an ACE-Step 1.5 checkpoint?")
        prefix = CHECKPOINT_PREFIXES[component]
    elif component == DIT and any(k.startswith(CHECKPOINT_PREFIXES[DIT]) for k in tensors):
        prefix = CHECKPOINT_PREFIXES[DIT]  # a diffusion model ComfyUI saved itself
        stray = sorted(k for k in tensors if not k.startswith(prefix))
        if stray:
            raise ValueError(f"{path}: {len(stray)} unexpected keys outside '{prefix}' (e.g. {stray[:3]}).")
    else:
        prefix = ""
    view = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not view:
        raise ValueError(f"{path} holds no ACE-Step 1.5 {PART_NAMES[component]} (no key starts with '{prefix}').")
    _reject_quantized(path, view)
    return prefix, view


def _reject_quantized(path: str, view: dict) -> None:
    fp8 = [k for k, (dtype, _) in view.items() if dtype.startswith("F8")]
    scales = [k for k in view if k.endswith((".scale_weight", ".weight_scale", ".input_scale", ".comfy_quant"))]
    if fp8 or scales:
        raise ValueError(f"{path} is a quantized (fp8) file (e.g. '{(fp8 or scales)[0]}'); training needs the "
                         "bf16/fp16/fp32 weights. Choose the unquantized file.")


# ----------------------------------------------------------------------------------------------------------------
# DiT: the key map is the identity (ComfyUI's AceStepConditionGenerationModel uses the official module names)


def dit_key_map(keys: Iterable[str], prefix: str = "") -> dict[str, str]:
    """Our key -> key in the file. ComfyUI keeps the official names; only the all-in-one prefix is added."""
    return {k: prefix + k for k in keys}


def variant_from_name(path: str) -> Optional[str]:
    """"turbo", "base" or "sft" when the file name says exactly one of them as a word, else None."""
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    found = {m for m in re.findall(r"[a-z]+", stem) if m in VARIANT_FIELDS}
    return found.pop() if len(found) == 1 else None


def _count(view: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in view for m in [pattern.match(k)] if m})


# Config fields tensor shapes cannot show. ComfyUI runs every ACE-Step 1.5 file (XL included) with the official
# values (comfy/ldm/ace/ace_step15.py: sliding_window 128, RoPE base 1e6, eps 1e-6, alternating layer types,
# FSQ levels [8,8,8,5,5,5] with one quantizer), so a ComfyUI-format file implies them.
UNSHAPED_FIELDS = ("use_sliding_window", "sliding_window", "layer_types", "rope_theta", "rope_scaling",
                   "rms_norm_eps", "fsq_input_levels", "fsq_input_num_quantizers", "timbre_fix_frame",
                   "timestep_mu", "timestep_sigma", "data_proportion")


def unrepresentable_fields(cfg: AceStepConfig) -> dict:
    """Fields of ``cfg`` a ComfyUI-format file cannot carry because they differ from the official values."""
    default = AceStepConfig(num_hidden_layers=cfg.num_hidden_layers,
                            num_lyric_encoder_hidden_layers=cfg.num_lyric_encoder_hidden_layers,
                            num_timbre_encoder_hidden_layers=cfg.num_timbre_encoder_hidden_layers,
                            num_attention_pooler_hidden_layers=cfg.num_attention_pooler_hidden_layers)
    return {f: getattr(cfg, f) for f in UNSHAPED_FIELDS if getattr(cfg, f) != getattr(default, f)}


def dit_config_from_shapes(view: dict[str, tuple[str, tuple]], variant: str, where: str) -> AceStepConfig:
    """The DiT config ComfyUI would detect, from tensor shapes (``comfy/model_detection.py``), plus the fields
    shapes cannot show at the official values shared by every ACE-Step 1.5 model (sliding window 128, RoPE theta
    1e6, RMS eps 1e-6, FSQ levels [8,8,8,5,5,5]; ``AceStepConfig`` defaults). ComfyUI hard-codes head_dim 128 and
    8 KV heads; here they are read from the q_norm and k_proj shapes too, so the small test models load the same
    way."""
    def shape(key: str) -> tuple:
        if key not in view:
            raise ValueError(f"{where}: key '{key}' is missing; this is not a complete ACE-Step 1.5 diffusion model.")
        return view[key][1]

    if variant not in VARIANT_FIELDS:
        raise ValueError(f"variant '{variant}' is not one of {list(VARIANT_FIELDS)}.")
    head_dim = shape("decoder.layers.0.self_attn.q_norm.weight")[0]
    hidden = shape("decoder.layers.0.self_attn_norm.weight")[0]
    width = shape("decoder.condition_embedder.weight")[1]
    proj_in = shape("decoder.proj_in.1.weight")
    fields = dict(
        hidden_size=hidden, head_dim=head_dim,
        intermediate_size=shape("decoder.layers.0.mlp.gate_proj.weight")[0],
        num_hidden_layers=_count(view, "decoder.layers."),
        num_attention_heads=shape("decoder.layers.0.self_attn.q_proj.weight")[0] // head_dim,
        num_key_value_heads=shape("decoder.layers.0.self_attn.k_proj.weight")[0] // head_dim,
        in_channels=proj_in[1], patch_size=proj_in[2],
        audio_acoustic_hidden_dim=shape("decoder.proj_out.1.weight")[1],
        text_hidden_dim=shape("encoder.text_projector.weight")[1],
        timbre_hidden_dim=shape("encoder.timbre_encoder.embed_tokens.weight")[1],
        num_lyric_encoder_hidden_layers=_count(view, "encoder.lyric_encoder.layers."),
        num_timbre_encoder_hidden_layers=_count(view, "encoder.timbre_encoder.layers."),
        num_attention_pooler_hidden_layers=_count(view, "tokenizer.attention_pooler.layers."),
        pool_window_size=shape("detokenizer.special_tokens")[1],
        fsq_dim=shape("tokenizer.quantizer.project_in.weight")[1],
        **VARIANT_FIELDS[variant],
    )
    enc_head_dim = shape("encoder.lyric_encoder.layers.0.self_attn.q_norm.weight")[0]
    enc_hidden = shape("encoder.lyric_encoder.layers.0.input_layernorm.weight")[0]  # ComfyUI's detection key
    lyric = "encoder.lyric_encoder.layers.0."
    enc = dict(encoder_hidden_size=enc_hidden,
               encoder_intermediate_size=shape(lyric + "mlp.gate_proj.weight")[0],
               encoder_num_attention_heads=shape(lyric + "self_attn.q_proj.weight")[0] // head_dim,
               encoder_num_key_value_heads=shape(lyric + "self_attn.k_proj.weight")[0] // head_dim)
    if enc_head_dim != head_dim or enc_hidden != width:
        raise ValueError(f"{where}: the condition encoder (width {enc_hidden}, head_dim {enc_head_dim}) does not fit "
                         f"the DiT (condition input {width}, head_dim {head_dim}); not an ACE-Step 1.5 layout.")
    if enc_hidden != hidden:
        fields.update(enc)  # XL: the encoder, tokenizer, detokenizer and null condition run at their own width
    elif any(enc[f"encoder_{k}"] != fields[k] for k in ("intermediate_size", "num_attention_heads",
                                                        "num_key_value_heads")):
        raise ValueError(f"{where}: the condition encoder has the DiT's width but other head/MLP sizes; this "
                         "layout is not an ACE-Step 1.5 model.")
    levels = shape("tokenizer.quantizer.project_in.weight")[0]
    if levels != len(AceStepConfig().fsq_input_levels):
        raise ValueError(f"{where}: the audio tokenizer quantises to {levels} dimensions, ACE-Step 1.5 uses "
                         f"{len(AceStepConfig().fsq_input_levels)}.")
    return AceStepConfig(**fields)


def read_dit_config(path: str, variant: Optional[str] = None) -> AceStepConfig:
    """The config of a ComfyUI-format DiT (or all-in-one) file; ``variant`` None reads it from the file name."""
    variant = variant or variant_from_name(path)
    if variant is None:
        raise ValueError(f"'{os.path.basename(path)}': the file name does not say whether this is the turbo, base or "
                         "sft model (ComfyUI's files carry no config). Choose the variant explicitly.")
    _, view = component_view(path, _load_header(path), DIT)
    return dit_config_from_shapes(view, variant, path)


def load_dit_file(path: str, variant: Optional[str] = None, device="cpu", dtype: torch.dtype = torch.float32,
                  components: tuple = COMPONENTS) -> AceStepModel:
    """Load a ComfyUI-format DiT (split file or all-in-one checkpoint) strictly, reading only ``components``.

    Every key of the file's DiT part is checked against the full model (a misnamed encoder key fails even when
    only the decoder is read); then only the requested tensors are read from disk.
    """
    prefix, view = component_view(path, _load_header(path), DIT)
    cfg = read_dit_config(path, variant)
    with torch.device("meta"):
        full = AceStepModel(cfg)
        model = AceStepModel(cfg, components=tuple(components))
    key_map = dit_key_map(full.state_dict().keys(), prefix)
    check_state_keys(path, {key_map[k]: tuple(v.shape) for k, v in full.state_dict().items()},
                     {prefix + k: shape for k, (_, shape) in view.items()},
                     "Is this an ACE-Step 1.5 diffusion model file?")
    wanted = component_prefixes(model.components)
    state = read_tensors(path, {k: key_map[k] for k in model.state_dict() if k.startswith(wanted)}, device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# VAE: diffusers AutoencoderOobleck names (the official vae/ folder, vae.Oobleck) <-> stable-audio-tools names


WEIGHT_NORM_SPELLINGS = {
    "weight_g": ("weight_g", "weight_v"),  # torch.nn.utils.weight_norm (stable-audio-tools checkpoints)
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),  # ComfyUI saves
}
_RES_UNIT = {"snake1": 0, "conv1": 1, "snake2": 2, "conv2": 3}


def _vae_native_module(module: str, blocks: int) -> str:
    """Module path in diffusers' AutoencoderOobleck -> ComfyUI's (an nn.Sequential at every level)."""
    parts = module.split(".")
    side = parts[0]  # "encoder" or "decoder"
    if parts[1] == "block":
        b, rest = int(parts[2]), parts[3:]
        out = [side, "layers", str(b + 1), "layers"]
        if rest[0].startswith("res_unit"):
            r = int(rest[0][len("res_unit"):]) - 1
            out += [str(r if side == "encoder" else r + 2), "layers", str(_RES_UNIT[rest[1]])]
        elif side == "encoder":
            out += [{"snake1": "3", "conv1": "4"}[rest[0]]]
        else:
            out += [{"snake1": "0", "conv_t1": "1"}[rest[0]]]
        return ".".join(out)
    index = {"conv1": 0, "snake1": blocks + 1, "conv2": blocks + 2}[parts[1]]
    return f"{side}.layers.{index}"


def vae_key_map(cfg: dict, spelling: str = "weight_g") -> dict[str, tuple[str, tuple]]:
    """Official (diffusers) key -> ``(ComfyUI key, its shape in the ComfyUI file)`` for a VAE config.

    Weight-normed convolutions: ``weight_g``/``weight_v`` map to the same pair under ``spelling``; Snake
    ``alpha``/``beta`` are [1, C, 1] in diffusers and [C] in ComfyUI.
    """
    from .vae import Oobleck

    g_name, v_name = WEIGHT_NORM_SPELLINGS[spelling]
    blocks = len(cfg["downsampling_ratios"])
    with torch.device("meta"):
        model = Oobleck(cfg)
    out = {}
    for key, value in model.state_dict().items():
        module, param = key.rsplit(".", 1)
        native = _vae_native_module(module, blocks)
        if param == "weight":  # a weight-normed convolution; norm over every dim but 0
            out[f"{module}.weight_g"] = (f"{native}.{g_name}", (value.shape[0],) + (1,) * (value.dim() - 1))
            out[f"{module}.weight_v"] = (f"{native}.{v_name}", tuple(value.shape))
        elif param in ("alpha", "beta"):
            out[key] = (f"{native}.{param}", (value.shape[1],))
        else:
            out[key] = (f"{native}.{param}", tuple(value.shape))
    return out


def _weight_norm_spelling(path: str, view: dict) -> str:
    found = {name for name, (g, _) in WEIGHT_NORM_SPELLINGS.items() if any(k.endswith("." + g) for k in view)}
    if len(found) != 1:
        raise ValueError(f"{path}: expected weight-normed convolutions stored as either weight_g/weight_v or "
                         f"parametrizations.weight.original0/original1; found {sorted(found) or 'neither'}.")
    return found.pop()


def vae_config_from_shapes(view: dict[str, tuple[str, tuple]], where: str) -> dict:
    """The diffusers config of a ComfyUI-format Oobleck VAE, from its shapes (ComfyUI reads only the strides).

    The sample rate is not in the weights; ACE-Step 1.5's VAE is 48 kHz (``comfy/sd.py`` sets 48 kHz when the
    strides give the 1920x hop)."""
    spelling = _weight_norm_spelling(where, view)
    v = WEIGHT_NORM_SPELLINGS[spelling][1]

    def shape(key):
        if key not in view:
            raise ValueError(f"{where}: key '{key}' is missing; this is not a complete Oobleck VAE.")
        return view[key][1]

    blocks = _count(view, "encoder.layers.") - 3  # conv, N blocks, snake, conv
    if blocks < 1:
        raise ValueError(f"{where}: no encoder blocks found; this is not an Oobleck VAE.")
    first = shape(f"encoder.layers.0.{v}")
    base = first[0]
    strides, multiples = [], []
    for b in range(blocks):
        conv = shape(f"encoder.layers.{b + 1}.layers.4.{v}")  # [c_out, c_in, 2 * stride]
        strides.append(conv[2] // 2)
        multiples.append(conv[0] // base)
    hidden = shape(f"encoder.layers.{blocks + 2}.{v}")[0]
    cfg = {"encoder_hidden_size": hidden, "downsampling_ratios": strides, "channel_multiples": multiples,
           "decoder_channels": shape(f"decoder.layers.{blocks + 2}.{v}")[1],
           "decoder_input_channels": shape(f"decoder.layers.0.{v}")[1], "audio_channels": first[1],
           "sampling_rate": SAMPLE_RATE}
    if base != hidden:
        cfg["encoder_channels"] = base  # only the small generated test VAEs; see vae.py
    return cfg


def load_vae_file(path: str, device="cpu", dtype: torch.dtype = torch.float32, decoder: bool = True,
                  encoder: bool = True):
    """Load a ComfyUI-format VAE (split file or all-in-one checkpoint) strictly into an ``AudioVAE``; every key is
    checked, and ``decoder=False`` / ``encoder=False`` reads and builds the other half alone."""
    from .vae import build_vae, wanted

    prefix, view = component_view(path, _load_header(path), VAE)
    cfg = vae_config_from_shapes(view, path)
    key_map = vae_key_map(cfg, _weight_norm_spelling(path, view))
    check_state_keys(path, {prefix + native: shape for native, shape in key_map.values()},
                     {prefix + k: shape for k, (_, shape) in view.items()}, "Is this the ACE-Step 1.5 VAE?")
    state = read_tensors(path, {k: prefix + native for k, (native, _) in key_map.items()
                                if wanted(k, decoder, encoder)})
    for k, t in state.items():
        if k.endswith((".alpha", ".beta")):
            state[k] = t.view(1, -1, 1)
    return build_vae(cfg, state, path, "Is this the ACE-Step 1.5 VAE?", device, dtype, decoder=decoder,
                     encoder=encoder)


# ----------------------------------------------------------------------------------------------------------------
# Text encoder: Hugging Face Qwen3Model names <-> ComfyUI's Llama2_ under "model."


def text_encoder_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Hugging Face ``Qwen3Model`` key -> key in ComfyUI's file (``model.`` + the same name)."""
    return {k: TEXT_MODEL_PREFIX + k for k in keys}


def qwen3_config_from_shapes(view: dict[str, tuple[str, tuple]], where: str):
    """A ``Qwen3Config`` from shapes, with Qwen3-Embedding-0.6B's other values (RoPE theta 1e6, RMS eps 1e-6,
    32768 positions, tied embeddings; the same numbers as ComfyUI's ``Qwen3_06B_ACE15_Config``)."""
    from transformers import Qwen3Config

    def shape(key):
        if TEXT_MODEL_PREFIX + key not in view:
            raise ValueError(f"{where}: key '{TEXT_MODEL_PREFIX + key}' is missing; this is not a Qwen3 text encoder.")
        return view[TEXT_MODEL_PREFIX + key][1]

    vocab, hidden = shape("embed_tokens.weight")
    head_dim = shape("layers.0.self_attn.q_norm.weight")[0]
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
                       intermediate_size=shape("layers.0.mlp.gate_proj.weight")[0],
                       num_hidden_layers=_count(view, TEXT_MODEL_PREFIX + "layers."),
                       num_attention_heads=shape("layers.0.self_attn.q_proj.weight")[0] // head_dim,
                       num_key_value_heads=shape("layers.0.self_attn.k_proj.weight")[0] // head_dim,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                       tie_word_embeddings=True, attention_bias=False)


def load_text_encoder_file(path: str, tokenizer, device="cpu", dtype: torch.dtype = torch.float32):
    """Load a ComfyUI-format Qwen3 text encoder strictly; ``tokenizer`` from ``text.load_tokenizer``."""
    from transformers import Qwen3Model

    from .text import TextEncoder, _dtype_kwarg

    prefix, view = component_view(path, _load_header(path), TEXT_ENCODER)
    config = qwen3_config_from_shapes(view, path)
    with torch.device("meta"):
        expected = Qwen3Model(config).state_dict()
    key_map = text_encoder_key_map(expected.keys())
    check_state_keys(path, {prefix + key_map[k]: tuple(v.shape) for k, v in expected.items()},
                     {prefix + k: shape for k, (_, shape) in view.items()}, "Is this qwen_0.6b_ace15.safetensors?")
    state = read_tensors(path, {k: prefix + key_map[k] for k in expected}, dtype=dtype)
    # from_pretrained with a state dict: no random initialisation, and RoPE buffers built by transformers itself.
    model = Qwen3Model.from_pretrained(None, config=config, state_dict=state, **_dtype_kwarg(dtype))
    return TextEncoder(tokenizer, model.to(device))


# ----------------------------------------------------------------------------------------------------------------
# Silence latent


@torch.no_grad()
def derive_silence_latent(vae, frames: int = SILENCE_FRAMES, probe_frames: int = 250) -> torch.Tensor:
    """[1, frames, 64] (the layout ``checkpoint.load_silence_latent`` returns): the VAE posterior mean of
    ``frames * hop`` samples of digital silence, computed in fp32.

    A convolutional encoder maps constant input to a constant output away from the clip edges, so only
    ``probe_frames`` are encoded: their first and last halves are the edge frames, the middle frame fills the rest.
    That equals encoding the whole silent clip at once, which is checked (the probe's middle must be constant).
    """
    model_dtype = vae.dtype
    vae.to(dtype=torch.float32)
    try:
        n = min(frames, probe_frames)
        mean = vae.encode(torch.zeros(1, vae.audio_channels, n * vae.hop, device=vae.device)).mean  # [1, 64, n]
    finally:
        vae.to(dtype=model_dtype)
    if frames > n:
        middle = mean[..., n // 4: n - n // 4]
        steady = middle[..., n // 4: n // 4 + 1]
        if (middle - steady).abs().max() > 1e-5 * (1 + steady.abs().max()):
            raise ValueError(f"the VAE's encoding of silence does not settle within {probe_frames // 4} frames of "
                             "the clip edges; cannot derive the silence latent this way.")
        mean = torch.cat([mean[..., : n // 2], steady.expand(-1, -1, frames - n), mean[..., n // 2:]], dim=-1)
    return mean.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Recognising files (header only) and listing ComfyUI's model folders


@dataclass(frozen=True)
class NativeFile:
    """A ComfyUI-format ACE-Step 1.5 file: ``kind`` is "dit", "vae", "text_encoder" or "checkpoint"."""

    path: str
    name: str  # relative to the folder it was listed from, "/"-separated, as ComfyUI's dropdowns show it
    kind: str
    provides: tuple  # components inside: subset of ("dit", "vae", "text_encoder")
    family: Optional[str] = None  # "2B" / "XL" when it holds a DiT
    variant: Optional[str] = None  # from the file name; None when the name does not say


def _provides(tensors: dict) -> tuple:
    """Which components a header holds, by the keys ComfyUI itself detects them with (plus ACE-Step specifics)."""
    found = []
    if is_checkpoint(tensors):
        views = {c: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
                 for c, p in CHECKPOINT_PREFIXES.items()}
    else:
        dit_prefix = CHECKPOINT_PREFIXES[DIT] if any(k.startswith(CHECKPOINT_PREFIXES[DIT]) for k in tensors) else ""
        views = {DIT: {k[len(dit_prefix):]: v for k, v in tensors.items()}, VAE: tensors, TEXT_ENCODER: tensors}
    if "encoder.lyric_encoder.layers.0.input_layernorm.weight" in views[DIT] and \
            "decoder.layers.0.self_attn_norm.weight" in views[DIT]:
        found.append(DIT)
    vae = views[VAE]
    if "decoder.layers.1.layers.0.beta" in vae and "encoder.layers.0.bias" in vae:
        try:
            cfg = vae_config_from_shapes(vae, "")
            if cfg["decoder_input_channels"] == 64 and _prod(cfg["downsampling_ratios"]) == 1920:
                found.append(VAE)  # Stable Audio's Oobleck has the same keys but a 2048x hop
        except ValueError:
            pass
    text = views[TEXT_ENCODER]
    embed = text.get(TEXT_MODEL_PREFIX + "embed_tokens.weight")
    if TEXT_MODEL_PREFIX + "layers.0.self_attn.q_norm.weight" in text and embed and embed[1][0] <= EMBEDDING_VOCAB \
            and "lm_head.weight" not in text:
        found.append(TEXT_ENCODER)
    return tuple(found)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def classify_file(path: str, name: Optional[str] = None) -> Optional[NativeFile]:
    """What ACE-Step 1.5 part a safetensors file is, from its header alone; None when it is none of them."""
    try:
        tensors = read_header(path)[0]
    except ValueError:
        return None
    provides = _provides(tensors)
    if not provides:
        return None
    if is_checkpoint(tensors):
        kind = CHECKPOINT
    elif len(provides) == 1:
        kind = provides[0]
    else:
        return None
    family = None
    if DIT in provides:
        try:
            _, view = component_view(path, tensors, DIT)
            family = dit_config_from_shapes(view, "turbo", path).family
        except ValueError:
            return None
    return NativeFile(path=path, name=name or os.path.basename(path), kind=kind, provides=provides, family=family,
                      variant=variant_from_name(path) if DIT in provides else None)


_CLASSIFIED: dict[tuple, Optional[NativeFile]] = {}


def list_native_files(folders: Iterable[str], kinds: Optional[Iterable[str]] = None) -> list[NativeFile]:
    """ACE-Step 1.5 files under ``folders`` (searched recursively, as ComfyUI lists model folders), sorted by name.

    ``kinds`` filters by what a file provides (e.g. ``["vae"]`` also lists all-in-one checkpoints holding a VAE).
    Only headers are read, and each file's answer is cached until its size or mtime changes.
    """
    kinds = set(kinds) if kinds is not None else None
    out = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for root, _, files in os.walk(folder, followlinks=True):
            for fname in files:
                if not fname.lower().endswith(EXTENSIONS):
                    continue
                path = os.path.join(root, fname)
                rel = os.path.relpath(path, folder).replace(os.sep, "/")
                stat = os.stat(path)
                key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
                if key not in _CLASSIFIED:
                    _CLASSIFIED[key] = classify_file(path)
                found = _CLASSIFIED[key]
                if found and (kinds is None or kinds & set(found.provides)):
                    out.append(NativeFile(found.path, rel, found.kind, found.provides, found.family, found.variant))
    return sorted(out, key=lambda f: f.name.lower())


# ----------------------------------------------------------------------------------------------------------------
# Converter: official layout -> ComfyUI formats (from the key maps above)

COMFY_VAE_NAME = "ace_1.5_vae.safetensors"
COMFY_TEXT_ENCODER_NAME = "qwen_0.6b_ace15.safetensors"


def comfy_dit_name(config_path: str) -> str:
    """Comfy-Org's file name for a DiT folder: acestep-v15-xl-turbo -> acestep_v1.5_xl_turbo.safetensors."""
    name = os.path.basename(os.path.normpath(config_path))
    rest = name[len(DIT_PREFIX):] if name.startswith(DIT_PREFIX) else name
    return f"acestep_v1.5_{rest.replace('-', '_')}.safetensors"


def comfy_checkpoint_name(config_path: str) -> str:
    """acestep-v15-turbo -> ace_step_1.5_turbo_aio.safetensors (Comfy-Org's all-in-one name)."""
    name = os.path.basename(os.path.normpath(config_path))
    rest = name[len(DIT_PREFIX):] if name.startswith(DIT_PREFIX) else name
    return f"ace_step_1.5_{rest.replace('-', '_')}_aio.safetensors"


def _cast(state: dict, dtype: Optional[torch.dtype]) -> dict:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in state.items()}


def comfy_dit_state(checkpoint_dir: str, config_path: str, prefix: str = "",
                    dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    directory = dit_dir(checkpoint_dir, config_path)
    cfg = load_config(checkpoint_dir, config_path)
    odd = unrepresentable_fields(cfg)
    if odd:
        raise ValueError(f"{directory}/config.json sets {odd}, which ComfyUI's format cannot carry (a ComfyUI file "
                         "always runs with the official values); converting would change the model.")
    files = _weight_files(directory, f"DiT weights ({config_path})")
    with torch.device("meta"):
        keys = AceStepModel(cfg).state_dict().keys()
    state = read_safetensors(files, keys)
    return _cast({dit_key_map(keys, prefix)[k]: v for k, v in state.items()}, dtype)


def comfy_vae_state(checkpoint_dir: str, spelling: str = "weight_g", prefix: str = "",
                    dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from .vae import WEIGHTS_FILE

    directory = os.path.join(checkpoint_dir, VAE_DIR)
    with open(require_file(os.path.join(directory, "config.json"), "VAE config"), encoding="utf-8") as f:
        cfg = json.load(f)
    state = load_file(require_file(os.path.join(directory, WEIGHTS_FILE), "VAE weights"))
    out = {}
    for key, (native, shape) in vae_key_map(cfg, spelling).items():
        out[prefix + native] = state[key].reshape(shape)
    return _cast(out, dtype)


def comfy_text_encoder_state(checkpoint_dir: str, prefix: str = "",
                             dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    directory = os.path.join(checkpoint_dir, TEXT_ENCODER_DIR)
    files = _weight_files(directory, "Text encoder weights")
    state = read_safetensors(files, files.keys())
    # Hugging Face may store Qwen3Model keys with or without its "model." base prefix.
    plain = {k[len(TEXT_MODEL_PREFIX):] if k.startswith(TEXT_MODEL_PREFIX) else k: v for k, v in state.items()}
    return _cast({prefix + native: plain[k] for k, native in text_encoder_key_map(plain).items()}, dtype)


def _save(state: dict, path: str) -> str:
    from safetensors.torch import save_file

    from .fileio import atomic_save

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save(path, lambda p: save_file(state, p, metadata={"format": "pt"}))
    return path


def convert_official(checkpoint_dir: str, config_path: str, models_dir: str, *, dtype: Optional[torch.dtype] = None,
                     vae_spelling: str = "weight_g", checkpoint_spelling: str = "parametrizations") -> dict[str, str]:
    """Write the official folder's weights in every ComfyUI format under ``models_dir`` (ComfyUI's folder names):

    diffusion_models/acestep_v1.5_<variant>.safetensors, vae/ace_1.5_vae.safetensors,
    text_encoders/qwen_0.6b_ace15.safetensors, checkpoints/ace_step_1.5_<variant>_aio.safetensors (which also
    carries ComfyUI's text-encoder ``logit_scale`` scalar, as a checkpoint ComfyUI saved does). Returns
    ``{"dit", "vae", "text_encoder", "checkpoint": path}``.
    """
    paths = {
        DIT: os.path.join(models_dir, "diffusion_models", comfy_dit_name(config_path)),
        VAE: os.path.join(models_dir, "vae", COMFY_VAE_NAME),
        TEXT_ENCODER: os.path.join(models_dir, "text_encoders", COMFY_TEXT_ENCODER_NAME),
        CHECKPOINT: os.path.join(models_dir, "checkpoints", comfy_checkpoint_name(config_path)),
    }
    _save(comfy_dit_state(checkpoint_dir, config_path, dtype=dtype), paths[DIT])
    _save(comfy_vae_state(checkpoint_dir, vae_spelling, dtype=dtype), paths[VAE])
    _save(comfy_text_encoder_state(checkpoint_dir, dtype=dtype), paths[TEXT_ENCODER])
    everything = comfy_dit_state(checkpoint_dir, config_path, CHECKPOINT_PREFIXES[DIT], dtype)
    everything.update(comfy_vae_state(checkpoint_dir, checkpoint_spelling, CHECKPOINT_PREFIXES[VAE], dtype))
    everything.update(comfy_text_encoder_state(checkpoint_dir, CHECKPOINT_PREFIXES[TEXT_ENCODER], dtype))
    everything[CHECKPOINT_IGNORED[0]] = torch.tensor(4.6055)  # SDClipModel.logit_scale's initial value
    _save(everything, paths[CHECKPOINT])
    return paths
