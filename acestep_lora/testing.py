"""Tiny, complete ACE-Step 1.5 checkpoint folders in the official layout, for tests, the demo and benchmarks.

No real weights can be downloaded in CI, so ``make_tiny_checkpoint`` writes a folder the real loaders read as
they read the official download: a small DiT (same architecture, small widths), its silence latent, a small
Oobleck VAE with the real 1920x hop, and a small Qwen3 text encoder with a byte-level BPE tokenizer (Qwen2's
pre-tokenizer) that knows the special tokens the prompts use and, like Qwen3-Embedding's tokenizer, appends
``<|endoftext|>``. Variants ``xl-turbo``/``xl-base``/``xl-sft`` give XL-shaped DiTs (the DiT wider than its
condition encoder), in folders named like the official ``acestep-v15-xl-*``.

``make_tiny_comfy_models`` writes the same weights in ComfyUI's formats (native.convert_official) plus a tokenizer
folder shaped like the one ComfyUI ships (vocab.json, merges.txt, tokenizer_config.json; no post-processor).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch

from .checkpoint import TEXT_ENCODER_DIR, VAE_DIR
from .config import VARIANT_FIELDS, AceStepConfig
from .fileio import atomic_save, atomic_write_json
from .model import AceStepModel

XL = "xl-"
VARIANTS = [*VARIANT_FIELDS, *(XL + v for v in VARIANT_FIELDS)]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TEXT_DIM = 32
# XL's shape in miniature: the DiT (96 wide, 6 heads, 3 layers) wider than its condition encoder (64, 4 heads),
# as the XL models run the DiT at 2560 and the encoder at 2048 (config.XL_FIELDS).
TINY_XL_FIELDS = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, encoder_hidden_size=64, encoder_intermediate_size=128,
                      encoder_num_attention_heads=4, encoder_num_key_value_heads=2)
# Qwen2/Qwen3's pre-tokenizer split (the "Split" regex in their tokenizer.json; also what transformers builds for
# Qwen2Tokenizer from vocab.json + merges.txt), so a ComfyUI-style copy of the tiny tokenizer splits identically.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def tiny_dit_config(variant: str = "turbo", **overrides) -> AceStepConfig:
    """A small DiT config; ``variant`` "turbo"/"base"/"sft", or "xl-turbo" etc. for the XL shape."""
    if variant not in VARIANTS:
        raise ValueError(f"variant '{variant}' is not one of {VARIANTS}")
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=8, text_hidden_dim=TINY_TEXT_DIM,
                  num_lyric_encoder_hidden_layers=2, num_timbre_encoder_hidden_layers=1,
                  num_attention_pooler_hidden_layers=1, fsq_dim=64, vocab_size=64003,
                  **VARIANT_FIELDS[variant.removeprefix(XL)])
    if variant.startswith(XL):
        fields.update(TINY_XL_FIELDS)
    fields.update(overrides)
    return AceStepConfig(**fields)


def init_weights_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic, well-scaled random weights (the scheme the parity fixture documents)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("weight") and p.dim() == 1:  # RMSNorm
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("weight") and p.dim() == 2:  # Linear [out, in]
                p.copy_(noise / math.sqrt(p.shape[1]))
            elif name.endswith("proj_out.1.weight"):  # ConvTranspose1d [in, out, k]
                p.copy_(noise / math.sqrt(p.shape[0] * p.shape[2]))
            elif name.endswith("weight") and p.dim() == 3:  # Conv1d [out, in, k]
                p.copy_(noise / math.sqrt(p.shape[1] * p.shape[2]))
            else:  # biases, modulation tables, special tokens, null condition
                p.copy_(0.1 * noise)


def write_dit(folder: str, cfg: AceStepConfig, seed: int = 0, silence_frames: int = 1500) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    model = AceStepModel(cfg)
    init_weights_(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    data = cfg.to_dict()
    data.update({"architectures": ["AceStepConditionGenerationModel"], "model_type": "acestep", "dtype": "float32"})
    atomic_write_json(os.path.join(folder, "config.json"), data)
    atomic_save(os.path.join(folder, "model.safetensors"), lambda p: save_file(state, p, metadata={"format": "pt"}))
    silence = 0.5 * torch.randn(1, cfg.audio_acoustic_hidden_dim, silence_frames,
                                generator=torch.Generator().manual_seed(seed + 1))
    atomic_save(os.path.join(folder, "silence_latent.pt"), lambda p: torch.save(silence, p))


def write_vae(folder: str, seed: int = 2) -> None:
    """An Oobleck VAE with the official hop (2*4*4*6*10 = 1920) and latent width (64), narrow elsewhere.

    ``encoder_channels`` (see vae.py) keeps the full-rate encoder layers 8 channels wide, so encoding a minute of
    audio takes about a second on a laptop CPU instead of a minute.
    """
    from .vae import Oobleck, save_vae

    cfg = {"encoder_hidden_size": 128, "encoder_channels": 8, "downsampling_ratios": [2, 4, 4, 6, 10],
           "channel_multiples": [1, 2, 4, 8, 16], "decoder_channels": 8, "decoder_input_channels": 64,
           "audio_channels": 2, "sampling_rate": 48000}
    vae = Oobleck(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("weight"):
                fan_in = p.shape[0] * p.shape[2] if ".conv_t1." in name else p.shape[1] * p.shape[2]
                p.copy_(noise / math.sqrt(fan_in))
            else:  # biases, Snake log-alpha / log-beta
                p.copy_(0.1 * noise)
        # Calibrate like a trained VAE: unit-scale posterior means and small posterior stds (scale ~ -4).
        moments = vae.encoder(0.3 * torch.randn(1, 2, 48000 * 4, generator=gen))
        conv2 = vae.encoder.conv2
        spread = moments.std(dim=(0, 2)) + 1e-6
        conv2.weight.div_(spread[:, None, None])
        conv2.bias.sub_(moments.mean(dim=(0, 2))).div_(spread)
        conv2.bias[64:] -= 4.0
    save_vae(vae, cfg, folder)


def _tokenizer_corpus() -> list[str]:
    from .metadata import LANGUAGES
    from .prompts import DEFAULT_DIT_INSTRUCTION, caption_prompt, lyrics_prompt

    words = ("upbeat electronic pop synth dance track chill lofi beat piano ambient rock guitar drums bass "
             "female male vocal instrumental warm bright dark energetic calm happy sad love night city dream "
             "verse chorus bridge intro outro la na oh yeah heart fire sky rain light time away home").split()
    corpus = [DEFAULT_DIT_INSTRUCTION, caption_prompt("upbeat electronic pop", 120, "4", "C major", 30),
              caption_prompt("", None, "", "", 10), lyrics_prompt("[Instrumental]", "unknown")]
    corpus += [lyrics_prompt(f"[verse]\n{w} {v}\n[chorus]\n{v} {w}", lang)
               for w, v, lang in zip(words, reversed(words), LANGUAGES * 2)]
    corpus += [" ".join(words[i:i + 8]) for i in range(0, len(words), 3)]
    corpus += [f"- bpm: {b}\n- keyscale: {n} {m}\n" for b in range(60, 200, 7) for n in "ABCDEFG"
               for m in ("major", "minor")]
    return corpus


def write_text_encoder(folder: str, seed: int = 3, hidden: int = TINY_TEXT_DIM) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    eot = tok.token_to_id("<|endoftext|>")
    # Qwen3-Embedding's tokenizer appends <|endoftext|> to every input; so does this one.
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A $B <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", eot)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   padding_side="left", model_max_length=32768)
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=4096, rope_theta=1_000_000.0, tie_word_embeddings=True,
                      pad_token_id=eot, eos_token_id=eot)
    Qwen3Model(cfg).save_pretrained(folder, safe_serialization=True)


def make_tiny_checkpoint(path: str, variant: str = "turbo", *, seed: int = 0,
                         variants: Optional[list] = None) -> str:
    """Write ``path/{acestep-v15-<variant>, vae, Qwen3-Embedding-0.6B}``; returns ``path``.

    ``variants`` writes several DiT folders (e.g. ["turbo", "base", "xl-turbo"]) sharing one VAE and text
    encoder. Existing parts are kept, so calling it twice is cheap.
    """
    for v in variants or [variant]:
        folder = os.path.join(path, f"acestep-v15-{v}")
        if not os.path.isfile(os.path.join(folder, "silence_latent.pt")):
            write_dit(folder, tiny_dit_config(v), seed=seed)
    if not os.path.isfile(os.path.join(path, VAE_DIR, "config.json")):
        write_vae(os.path.join(path, VAE_DIR), seed=seed + 2)
    if not os.path.isfile(os.path.join(path, TEXT_ENCODER_DIR, "config.json")):
        write_text_encoder(os.path.join(path, TEXT_ENCODER_DIR), seed=seed + 3)
    return path


def write_comfy_tokenizer(official_dir: str, folder: str) -> str:
    """A copy of a tokenizer.json tokenizer in the shape ComfyUI ships Qwen's (comfy/text_encoders/qwen25_tokenizer):
    vocab.json + merges.txt + tokenizer_config.json (class Qwen2Tokenizer), without the appending post-processor."""
    from tokenizers import Tokenizer

    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(official_dir, "tokenizer.json"))
    tok.model.save(folder)  # vocab.json, merges.txt
    special = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    atomic_write_json(os.path.join(folder, "tokenizer_config.json"), {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": special, "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    return folder


def make_tiny_comfy_models(models_dir: str, checkpoint_dir: str, config_path: str = "acestep-v15-turbo",
                           dtype: Optional[torch.dtype] = None, vae_spelling: str = "weight_g") -> dict[str, str]:
    """``checkpoint_dir``'s weights as ComfyUI files under ``models_dir`` (diffusion_models/, vae/, text_encoders/,
    checkpoints/) plus ``<models_dir>/qwen25_tokenizer``; returns ``{"dit", "vae", "text_encoder",
    "checkpoint", "tokenizer": path}``."""
    from .native import convert_official

    paths = convert_official(checkpoint_dir, config_path, models_dir, dtype=dtype, vae_spelling=vae_spelling)
    paths["tokenizer"] = write_comfy_tokenizer(os.path.join(checkpoint_dir, TEXT_ENCODER_DIR),
                                               os.path.join(models_dir, "qwen25_tokenizer"))
    return paths


if __name__ == "__main__":  # python -m acestep_lora.testing <dir> [variant]
    import sys

    target = make_tiny_checkpoint(sys.argv[1], *(sys.argv[2:3] or ["turbo"]))
    print(json.dumps(sorted(os.listdir(target))))
