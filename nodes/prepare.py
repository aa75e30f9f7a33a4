"""ACE-Step LoRA Prepare Training Data: audio + metadata lists -> cached training tensors."""
from __future__ import annotations

import hashlib
import logging
import os

from ..acestep_lora import lists, options
from ..acestep_lora.audio import from_comfy_audio
from ..acestep_lora.console import CountBar
from ..acestep_lora.prepare import PrepareItem, PrepareSettings, prepare_dataset
from ..acestep_lora.source import default_model_choice, model_choices, part_choices
from . import comfy

# Listed when no model is found at all: the official folder names (a saved workflow's value stays valid; running
# it says where to put the files).
KNOWN_CONFIGS = ["acestep-v15-turbo", "acestep-v15-base", "acestep-v15-sft", "acestep-v15-turbo-shift3",
                 "acestep-v15-xl-turbo", "acestep-v15-xl-base", "acestep-v15-xl-sft"]


def option_widgets(group) -> dict:
    """The group's widgets from the option table, with what only ComfyUI knows: the default checkpoint folder
    under its models folder, and the models found there and in ComfyUI's model folders (config_path's dropdown:
    official DiT folders, then diffusion_models/... and checkpoints/... files; the default is the 2B turbo,
    wherever it is), and the VAE and text-encoder files (vae, text_encoder)."""
    folders = comfy.model_folders()
    models = model_choices(folders) or KNOWN_CONFIGS
    defaults = {"checkpoint_dir": folders.checkpoint_dir, "config_path": default_model_choice(models)}
    choices = {"config_path": models, "vae": part_choices(folders, "vae"),
               "text_encoder": part_choices(folders, "text_encoder")}
    widgets = {o.name for o in options.node_order(group)}
    return options.node_inputs(group, defaults={k: v for k, v in defaults.items() if k in widgets},
                               choices={k: v for k, v in choices.items() if k in widgets})


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
        widgets = option_widgets(options.PREPARE)
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
                **widgets["required"],
            },
            "optional": {
                **{f"audio_input_{i}": ("AUDIO", {"tooltip": "Audio from a Load Audio node (sample after the files"
                                                             f"{' and audio_input_' + str(i - 1) if i > 1 else ''})."})
                   for i in range(1, 5)},
                **widgets["optional"],
                "timesignature_list": ("STRING", {"default": "", "forceInput": True, "tooltip":
                                                  "Time signature per sample (4/4, 3/4, ...), from Collect."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, config_path):
        # Any model is allowed (the dropdown lists what the default folders hold; a typed path works too); a
        # missing one is named, with both ways to get it, when the node runs.
        return True if config_path else "config_path is empty; choose a model such as acestep-v15-turbo."

    @classmethod
    def IS_CHANGED(cls, audio_files="", **kwargs):
        """Re-run when an input file changes on disk (the inputs alone would let ComfyUI reuse a stale result)."""
        h = hashlib.sha256()
        for path in lists.parse_list(audio_files, "audio_files"):
            full = comfy.resolve_input_path(path)
            stat = os.stat(full) if os.path.exists(full) else None
            h.update(f"{full}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}".encode())
        return h.hexdigest()

    def prepare(self, audio_files, captions, lyrics_list, bpm_list, keyscale_list, language_list,
                timesignature_list="", unique_id=None, **inputs):  # inputs: the option table's widgets, audio_input_N
        paths = [comfy.resolve_input_path(p) for p in lists.parse_list(audio_files, "audio_files") if p]
        waveforms = []
        for i in range(1, 5):
            value = inputs.get(f"audio_input_{i}")
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
        settings = options.config_from_inputs(PrepareSettings, inputs,
                                              checkpoint_dir=comfy.resolve_checkpoint_dir(inputs["checkpoint_dir"]))

        console = CountBar("prepare")

        def progress(done, total, message):
            bar.set(done)
            console.update(done, total, message)

        comfy.free_memory()  # ComfyUI's cached generation models out of the way of the VAE and encoders
        try:
            result = prepare_dataset(items, comfy.resolve_under_output(inputs["output_dir"]), settings,
                                     progress=progress, check_cancel=comfy.check_interrupt, input_notes=notes,
                                     folders=comfy.model_folders(settings.checkpoint_dir))
        finally:
            console.close()
        logging.getLogger("acestep_lora.nodes").info(result.status)
        return {"ui": {"text": [result.status]}, "result": (result.tensor_dir, result.status)}


NODE_CLASS_MAPPINGS = {"ACEStepLoRA_PrepareTrainingData": PrepareTrainingData}
NODE_DISPLAY_NAME_MAPPINGS = {"ACEStepLoRA_PrepareTrainingData": "ACE-Step LoRA Prepare Training Data"}
