"""Text side of the conditioning: Qwen3-Embedding-0.6B for the caption, its token-embedding table for lyrics.

As in official inference (spec §3.1 items 6-7): the caption prompt is tokenised without padding (one prompt at a
time, so no pad tokens exist), truncated at 256 tokens, and run through the whole Qwen3 model (final-norm output,
no attention mask); the lyric prompt is tokenised up to 2048 tokens and only looked up in ``embed_tokens``.

Tokenizer: Qwen3-Embedding's tokenizer.json appends ``<|endoftext|>`` to every input (a TemplateProcessing
post-processor Qwen added in June 2025; QwenLM/Qwen3-Embedding#54). ComfyUI's bundled copy of the same vocabulary
(``comfy/text_encoders/qwen25_tokenizer``: vocab.json, merges.txt, tokenizer_config.json) does not, which is why
ComfyUI writes a second ``<|endoftext|>`` into its ACE-Step prompts. ``load_tokenizer`` reads either folder and
installs that post-processor where it is missing, so both give the official token ids.
"""
from __future__ import annotations

import os

import torch

from .checkpoint import TEXT_ENCODER_DIR, require_dir, require_file
from .console import library_bars_off
from .prompts import CAPTION_MAX_TOKENS, LYRIC_MAX_TOKENS

END_OF_TEXT = "<|endoftext|>"


class TextEncoder:
    def __init__(self, tokenizer, model):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device=None, dtype=None) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def _ids(self, text: str, max_tokens: int) -> torch.Tensor:
        ids = self.tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def encode_caption(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> hidden states [1, L, text_dim] and an all-ones mask [1, L]."""
        ids = self._ids(prompt, CAPTION_MAX_TOKENS)
        hidden = self.model(input_ids=ids).last_hidden_state
        return hidden, torch.ones(ids.shape, device=ids.device)

    @torch.no_grad()
    def embed_lyrics(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> token embeddings [1, L, text_dim] (no transformer) and an all-ones mask [1, L]."""
        ids = self._ids(prompt, LYRIC_MAX_TOKENS)
        return self.model.embed_tokens(ids), torch.ones(ids.shape, device=ids.device)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """Load straight into the target dtype (no fp32 copy of 0.6 B parameters first); the keyword was renamed in
    transformers 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def has_tokenizer(directory: str) -> bool:
    """A folder holds a Qwen tokenizer: a tokenizer.json, or vocab.json + merges.txt (ComfyUI's bundled copy)."""
    return os.path.isfile(os.path.join(directory, "tokenizer.json")) or all(
        os.path.isfile(os.path.join(directory, n)) for n in ("vocab.json", "merges.txt"))


def load_tokenizer(directory: str):
    """The Qwen tokenizer in ``directory``, appending ``<|endoftext|>`` to every input as Qwen3-Embedding's does."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    if not has_tokenizer(directory):
        require_file(os.path.join(directory, "tokenizer.json"), "Text encoder tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if not isinstance(eot, int) or eot == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer '{directory}' has no {END_OF_TEXT} token; it is not a Qwen tokenizer. Use the "
                         f"Qwen3-Embedding-0.6B folder or ComfyUI's comfy/text_encoders/qwen25_tokenizer.")
    if tokenizer("a").input_ids[-1:] != [eot]:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {END_OF_TEXT}", pair=f"$A $B {END_OF_TEXT}", special_tokens=[(END_OF_TEXT, eot)])
    return tokenizer


def load_text_encoder(checkpoint_dir: str, device="cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    from transformers import AutoModel

    directory = require_dir(os.path.join(checkpoint_dir, TEXT_ENCODER_DIR), "Text encoder")
    require_file(os.path.join(directory, "config.json"), "Text encoder config")
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not any(os.path.isfile(os.path.join(directory, n)) for n in weights):
        require_file(os.path.join(directory, "model.safetensors"), "Text encoder weights")
    tokenizer = load_tokenizer(directory)
    with library_bars_off():  # no "Loading weights" bar inside Prepare's own progress display
        model = AutoModel.from_pretrained(directory, **_dtype_kwarg(dtype))
    if not hasattr(model, "embed_tokens"):
        raise ValueError(f"{directory} did not load as a Qwen3 base model (got {type(model).__name__}); "
                         "it should be the Qwen3-Embedding-0.6B folder from ACE-Step/Ace-Step1.5.")
    return TextEncoder(tokenizer, model.to(device))
