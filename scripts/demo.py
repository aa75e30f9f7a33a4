"""End-to-end demo on a tiny generated checkpoint (or real weights in $ACESTEP_CHECKPOINT_DIR).

Foundation stage: loads every part of the checkpoint, encodes a synthetic clip through the VAE, the caption and
lyrics through the text encoder and the condition encoder, and runs one DiT velocity prediction.
"""
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from acestep_lora import load_dit, load_silence_latent, load_text_encoder, load_vae  # noqa: E402
from acestep_lora.prompts import caption_prompt, lyrics_prompt  # noqa: E402
from acestep_lora.testing import make_tiny_checkpoint  # noqa: E402


def main():
    out = os.path.join(ROOT, "demo_output")
    ckpt = os.environ.get("ACESTEP_CHECKPOINT_DIR") or make_tiny_checkpoint(os.path.join(out, "checkpoints"))
    print(f"checkpoint: {ckpt}")
    t0 = time.time()
    vae, text, model = load_vae(ckpt), load_text_encoder(ckpt), load_dit(ckpt, "acestep-v15-turbo")
    silence = load_silence_latent(ckpt, "acestep-v15-turbo")
    seconds = 6
    t = torch.arange(48000 * seconds) / 48000
    audio = (0.4 * torch.sin(2 * math.pi * 220 * t) * (torch.sin(2 * math.pi * 2 * t) > 0)).expand(1, 2, -1)
    latents = vae.encode_tiled(audio).mean.transpose(1, 2)  # (1, T, 64)
    caption, cmask = text.encode_caption(caption_prompt("a pulsing synth tone", 120, "4", "A minor", seconds))
    lyrics, lmask = text.embed_lyrics(lyrics_prompt("[Instrumental]", "unknown"))
    with torch.no_grad():
        enc, emask = model.encoder(caption, cmask, lyrics, lmask, silence[:, :750], torch.zeros(1, dtype=torch.long))
        frames = latents.shape[1]
        context = torch.cat([silence[:, :frames], torch.ones(1, frames, 64)], dim=-1)
        tt = torch.tensor([0.5])
        velocity = model.decoder(hidden_states=0.5 * latents + 0.5 * torch.randn_like(latents), timestep=tt,
                                 timestep_r=tt, encoder_hidden_states=enc, context_latents=context)[0]
    print(f"latents {tuple(latents.shape)}, condition {tuple(enc.shape)}, velocity {tuple(velocity.shape)} "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
