"""ACE-Step LoRA Prepare Training Data: audio + metadata lists -> cached training tensors."""
from __future__ import annotations

import hashlib
import logging
import os

from ..acestep_lora import checkpoint as ckpt
from ..acestep_lora import lists
from ..acestep_lora.audio import from_comfy_audio
from ..acestep_lora.console import CountBar
from ..acestep_lora.device import DEVICE_CHOICES
from ..acestep_lora.prepare import LONG_AUDIO_CHOICES, PrepareItem, PrepareSettings, prepare_dataset
from . import comfy

KNOWN_CONFIGS = ["acestep-v15-turbo", "acestep-v15-base", "acestep-v15-sft", "acestep-v15-turbo-shift3"]


def config_choices() -> list[str]:
    found = ckpt.list_dit_configs(comfy.default_checkpoint_dir())
    return found + [c for c in KNOWN_CONFIGS if c not in found]


def _list_input(tooltip: str) -> tuple:
    return ("STRING", {"default": "", "multiline": True, "tooltip": tooltip})


class PrepareTrainingData:
    DESCRIPTION = ("Encodes audio and its metadata into training tensors (VAE latents, caption and lyric "
                   "conditioning) exactly as ACE-Step 1.5 generation conditions the model. The status ends with a "
                   "table of what will be trained on: per file the duration used, the caption and lyrics and where "
                   "they came from, the tempo (typed or detected), key, language, and notes such as a caption taken "
                   "from the file name or a cropped song. Metadata next to each audio file <name>: <name>.json, "
                   "<name>_caption.txt, <name>_lyrics.txt, or <name>.txt (= lyrics, the official convention). "
                   "Results are cached: re-running encodes only new or changed samples.")
    CATEGORY = comfy.CATEGORY
    FUNCTION = "prepare"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("tensor_dir", "status")
    OUTPUT_TOOLTIPS = ("Folder with one .pt per sample and manifest.json; connect it to ACE-Step LoRA Train.",
                       "What was encoded and what came from the cache, what to check before training, and the "
                       "table of every sample: duration used, caption, lyrics, bpm (typed or detected), key, "
                       "language, notes.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio_files": _list_input("Audio file paths, one per sample: a JSON array (as Collect Training "
                                           "Samples outputs), one per line, or comma-separated. Samples from "
                                           "audio_input_1..4 come after these."),
                "captions": _list_input("Caption per sample (genre, instruments, mood): "
                                        + lists.CAPTIONS_RULE + "."),
                "lyrics_list": _list_input("Lyrics per sample; empty or [Instrumental] for no vocals: "
                                           + lists.LYRICS_RULE + "."),
                "bpm_list": _list_input("Tempo per sample (e.g. 120,128,90): " + lists.VALUES_RULE
                                        + ". Empty or 0 = unknown (detected from the audio when detect_bpm is on)."),
                "keyscale_list": _list_input("Key per sample, e.g. C Major, Am, F#m: " + lists.VALUES_RULE
                                             + ". Empty = unknown."),
                "language_list": _list_input("Vocal language code per sample (en, zh, ja, ..., instrumental): "
                                             + lists.VALUES_RULE + ". Empty = unknown."),
                "output_dir": ("STRING", {"default": "acestep_lora/tensors", "tooltip": "Where the tensors go. "
                                          "Relative paths are inside ComfyUI's output folder."}),
                "checkpoint_dir": ("STRING", {"default": comfy.default_checkpoint_dir(), "tooltip":
                                              "The official ACE-Step 1.5 download (folders acestep-v15-*, vae, "
                                              "Qwen3-Embedding-0.6B)."}),
                "config_path": (config_choices(), {"default": "acestep-v15-turbo", "tooltip":
                                                   "DiT folder inside checkpoint_dir. Train with the same one."}),
                "device": (list(DEVICE_CHOICES), {"default": "auto", "tooltip": "auto = CUDA, else Apple MPS, "
                                                  "else CPU."}),
            },
            "optional": {
                **{f"audio_input_{i}": ("AUDIO", {"tooltip": f"Audio from a Load Audio node (sample after the "
                                                             f"files{' and audio_input_' + str(i - 1) if i > 1 else ''})."})
                   for i in range(1, 5)},
                "custom_tag": ("STRING", {"default": "", "tooltip": "A trigger word added to every caption "
                                          "(e.g. 'mystyle')."}),
                "tag_position": (["append", "prepend", "replace"], {"default": "append", "tooltip":
                                 "append: 'caption, tag'; prepend: 'tag, caption'; replace: the tag alone."}),
                "max_duration": ("FLOAT", {"default": 240.0, "min": 1.0, "max": 600.0, "step": 1.0, "tooltip":
                                           "Longest training sample in seconds (240 s as the official trainer). "
                                           "Longer audio is split or cropped, see long_audio."}),
                "long_audio": (list(LONG_AUDIO_CHOICES), {"default": "segments", "advanced": True, "tooltip":
                               "Audio longer than max_duration. segments: split into equal pieces of at most "
                               "max_duration, each a training sample with the same metadata (all of the song is "
                               "used). crop: keep the first max_duration seconds (the official trainer's way; the "
                               "rest is lost). Only the part used is decoded."}),
                "detect_bpm": ("BOOLEAN", {"default": True, "advanced": True, "tooltip":
                               "Measure the tempo of samples whose bpm is unknown and train with it (the table "
                               "says 'detected'); off: unknown stays unknown (N/A in the prompt)."}),
                "timesignature_list": ("STRING", {"default": "", "forceInput": True, "tooltip":
                                                  "Time signature per sample (4/4, 3/4, ...), from Collect."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, config_path):
        # Any DiT folder name or path is allowed (the dropdown lists only what the default folder holds).
        return True if config_path else "config_path is empty; choose a DiT folder such as acestep-v15-turbo."

    @classmethod
    def IS_CHANGED(cls, audio_files="", **kwargs):
        """Re-run when an input file changes on disk (the inputs alone would let ComfyUI reuse a stale result)."""
        h = hashlib.sha256()
        for path in lists.parse_list(audio_files, "audio_files"):
            full = comfy.resolve_input_path(path)
            stat = os.stat(full) if os.path.exists(full) else None
            h.update(f"{full}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}".encode())
        return h.hexdigest()

    def prepare(self, audio_files, captions, lyrics_list, bpm_list, keyscale_list, language_list, output_dir,
                checkpoint_dir, config_path, device, custom_tag="", tag_position="append", max_duration=240.0,
                long_audio="segments", detect_bpm=True, timesignature_list="", unique_id=None, **audio_inputs):
        paths = [comfy.resolve_input_path(p) for p in lists.parse_list(audio_files, "audio_files") if p]
        waveforms = []
        for i in range(1, 5):
            value = audio_inputs.get(f"audio_input_{i}")
            if value is not None:
                clips = from_comfy_audio(value, f"audio_input_{i}")
                waveforms += [(f"audio_input_{i}" + (f"[{j}]" if len(clips) > 1 else ""), w, sr)
                              for j, (w, sr) in enumerate(clips)]
        count = len(paths) + len(waveforms)
        raw = dict(captions=captions, lyrics_list=lyrics_list, bpm_list=bpm_list, keyscale_list=keyscale_list,
                   language_list=language_list, timesignature_list=timesignature_list)
        per_file, notes = lists.metadata_lists(raw, count)
        items = []
        for index in range(count):
            meta = dict(caption=per_file["captions"][index], lyrics=per_file["lyrics_list"][index],
                        bpm=per_file["bpm_list"][index], keyscale=per_file["keyscale_list"][index],
                        language=per_file["language_list"][index] or "unknown",
                        timesignature=per_file["timesignature_list"][index])
            if index < len(paths):
                items.append(PrepareItem(name=paths[index], path=paths[index], **meta))
            else:
                name, waveform, rate = waveforms[index - len(paths)]
                items.append(PrepareItem(name=name, waveform=waveform, sample_rate=rate, **meta))

        bar = comfy.Progress(max(1, count), node_id=unique_id)
        settings = PrepareSettings(checkpoint_dir=comfy.resolve_checkpoint_dir(checkpoint_dir),
                                   config_path=config_path, device=device, custom_tag=custom_tag,
                                   tag_position=tag_position, max_duration=max_duration, long_audio=long_audio,
                                   detect_bpm=bool(detect_bpm))

        console = CountBar("prepare")

        def progress(done, total, message):
            bar.set(done)
            console.update(done, total, message)

        comfy.free_memory()  # ComfyUI's cached generation models out of the way of the VAE and encoders
        try:
            result = prepare_dataset(items, comfy.resolve_under_output(output_dir), settings, progress=progress,
                                     check_cancel=comfy.check_interrupt, input_notes=notes)
        finally:
            console.close()
        logging.getLogger("acestep_lora.nodes").info(result.status)
        return {"ui": {"text": [result.status]}, "result": (result.tensor_dir, result.status)}


NODE_CLASS_MAPPINGS = {"ACEStepLoRA_PrepareTrainingData": PrepareTrainingData}
NODE_DISPLAY_NAME_MAPPINGS = {"ACEStepLoRA_PrepareTrainingData": "ACE-Step LoRA Prepare Training Data"}
