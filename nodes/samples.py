"""Nodes 1 and 2 of the seed: ACE-Step Create Training Sample, ACE-Step Collect Training Samples.

Thin wrappers over acestep_lora/samples.py. Create nodes chain through ``previous`` -> ``sample_info`` and the last
one feeds Collect's ``sample_info``, so one queued workflow saves every sample before collecting the folder.

``sample_info`` (STRING, JSON): the sidecar of this node's sample (the first one for a batch) plus ``audio_path``,
``sidecar_path``, ``status`` ("created" | "exists"), ``note`` (only when bpm detection failed), ``samples`` (one
such record per batch item), ``chain`` (ids of every sample of the chain, upstream first) and ``chain_dirs`` (the
folders they were saved in).
"""
from __future__ import annotations

import json

from ..acestep_lora import lists, metadata
from ..acestep_lora import samples as core
from ..acestep_lora.audio import from_comfy_audio
from . import comfy

DEFAULT_SAMPLES_DIR = "acestep_lora/samples"
TIMESIGNATURE_CHOICES = ["", "2/4", "3/4", "4/4", "6/8"]


class CreateTrainingSample:
    DESCRIPTION = ("Save one training sample: the audio (lossless FLAC at its own sample rate and channels) and a "
                   "JSON file with its caption, lyrics, bpm, key, language and time signature. Running it again with "
                   "the same audio and text writes nothing new; any change makes a new sample, never overwriting "
                   "one. A batch of B clips makes B samples. Chain several Create nodes through 'previous' and "
                   "connect the last one's sample_info to Collect Training Samples.")
    CATEGORY = comfy.CATEGORY
    FUNCTION = "create"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("sample_info",)
    OUTPUT_TOOLTIPS = ("JSON of what was saved (paths, id, metadata, detected bpm, 'created' or 'exists') plus "
                       "'chain': the ids of every sample saved by this chain of Create nodes. Connect it to the next "
                       "Create node's 'previous' or to Collect Training Samples' 'sample_info'.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": ("AUDIO", {"tooltip": "The song or clip to train on (e.g. from Load Audio). Kept at its "
                                               "own sample rate and channels; a batch of B clips makes B samples "
                                               "with the same text."}),
                "caption": ("STRING", {"multiline": True, "default": "",
                                       "tooltip": "Describe the music: genre, instruments, mood, vocals (e.g. "
                                                  "'upbeat electronic pop, synth leads, female vocals'). Required."}),
                "output_dir": ("STRING", {"default": DEFAULT_SAMPLES_DIR,
                                          "tooltip": "Folder the sample is saved in. A relative path is inside "
                                                     "ComfyUI's output folder. Use the same folder in Collect "
                                                     "Training Samples."}),
                "lyrics": ("STRING", {"multiline": True, "default": metadata.INSTRUMENTAL_LYRICS,
                                      "tooltip": "The song's lyrics, with section tags such as [Verse] and "
                                                 "[Chorus]. Use [Instrumental] for music without vocals."}),
                "bpm": ("INT", {"default": 0, "min": 0, "max": metadata.BPM_RANGE[1], "step": 1,
                                "tooltip": "Tempo in beats per minute (30-300). 0 = detect it from the audio; if "
                                           "that fails the tempo is stored as unknown."}),
                "keyscale": ("STRING", {"default": "",
                                        "tooltip": "Musical key, stored as e.g. 'C major' or 'A minor'. Accepted: "
                                                   + metadata.KEYSCALE_FORMS + ". Empty = unknown."}),
                "language": (list(metadata.LANGUAGE_CHOICES), {"default": "instrumental",
                                                               "tooltip": "Language of the vocals (ISO code); "
                                                                          "'instrumental' for music without vocals, "
                                                                          "'unknown' if unsure."}),
            },
            "optional": {
                "timesignature": (TIMESIGNATURE_CHOICES, {"default": "",
                                                          "tooltip": "Time signature (stored as beats per bar: "
                                                                     "2, 3, 4 or 6). Empty = unknown."}),
                "previous": ("STRING", {"forceInput": True,
                                        "tooltip": "Optional: another Create Training Sample node's sample_info. "
                                                   "Chains the nodes so they run in order and Collect can check "
                                                   "that all their samples are in its folder."}),
            },
        }

    def create(self, audio, caption, output_dir, lyrics=metadata.INSTRUMENTAL_LYRICS, bpm=0, keyscale="",
               language="instrumental", timesignature="", previous=None):
        upstream = core.parse_sample_info(previous, "previous")
        folder = comfy.resolve_under_output(output_dir or DEFAULT_SAMPLES_DIR)
        infos = [core.create_sample(wave, rate, caption, folder, lyrics=lyrics, bpm=bpm, keyscale=keyscale,
                                    language=language, timesignature=timesignature)
                 for wave, rate in from_comfy_audio(audio, "audio")]
        chain, chain_dirs = core.extend_chain(upstream, infos)
        info = dict(infos[0], samples=infos, chain=chain, chain_dirs=chain_dirs)
        return (json.dumps(info, ensure_ascii=False, indent=2),)


class CollectTrainingSamples:
    DESCRIPTION = ("Gather every audio file in a folder (and its subfolders) with its caption, lyrics, bpm, key, "
                   "language and time signature, read from the files next to each audio file <name>: <name>.json "
                   "(what Create Training Sample writes: caption, lyrics, bpm, keyscale, language, timesignature), "
                   "<name>_caption.txt (the caption; <name>_prompt.txt also works), <name>_lyrics.txt (the lyrics), "
                   "<name>.txt (the lyrics: the official ACE-Step convention, so a caption saved there is read as "
                   "lyrics). A file without a caption gets its file name as caption; Prepare's table flags both. "
                   "Each output is a JSON list, one entry per audio file, in the same order; connect them to LoRA "
                   "Prepare Training Data.")
    CATEGORY = comfy.CATEGORY
    FUNCTION = "collect"
    RETURN_TYPES = ("STRING",) * 7
    RETURN_NAMES = ("audio_files", "captions", "lyrics_list", "bpm_list", "keyscale_list", "language_list",
                    "timesignature_list")
    OUTPUT_TOOLTIPS = (
        "JSON list of the audio files' full paths, sorted by path.",
        "JSON list of captions (the file name when a file has none: Prepare's table flags it).",
        "JSON list of lyrics ([Instrumental] when a file has none).",
        "JSON list of tempos; \"\" where unknown.",
        "JSON list of keys such as \"C major\"; \"\" where unknown.",
        "JSON list of vocal language codes (\"instrumental\" for music without vocals).",
        "JSON list of time signatures as beats per bar (\"4\" for 4/4); \"\" where unknown.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples_dir": ("STRING", {"default": DEFAULT_SAMPLES_DIR,
                                           "tooltip": "Folder with the training samples, searched with its "
                                                      "subfolders. A relative path is inside ComfyUI's output "
                                                      "folder (where Create Training Sample saves)."}),
            },
            "optional": {
                "sample_info": ("STRING", {"forceInput": True,
                                           "tooltip": "Optional: the last Create Training Sample node's "
                                                      "sample_info. Makes the Create nodes run first and checks "
                                                      "that every sample they saved is in samples_dir."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, samples_dir=DEFAULT_SAMPLES_DIR, **_):
        """Re-run when files in the folder were added, removed or modified since the last run."""
        return core.folder_fingerprint(comfy.resolve_under_output(samples_dir or DEFAULT_SAMPLES_DIR))

    def collect(self, samples_dir, sample_info=None):
        chain = core.parse_sample_info(sample_info, "sample_info")
        typed = samples_dir or DEFAULT_SAMPLES_DIR
        folder = comfy.resolve_under_output(typed)
        try:
            found = core.collect_samples(folder, as_typed=typed)
        except FileNotFoundError as e:
            if chain and chain.get("chain_dirs"):
                raise FileNotFoundError(f"{e} The connected sample_info says its samples were saved in "
                                        f"{', '.join(repr(d) for d in chain['chain_dirs'])}; set samples_dir to "
                                        "that folder.") from e
            raise
        if chain:
            core.check_chain(found, chain, folder, as_typed=typed)
        return (lists.encode_list([s.audio_path for s in found]),
                lists.encode_list([s.caption for s in found]),
                lists.encode_list([s.lyrics for s in found]),
                lists.encode_list([s.bpm for s in found]),
                lists.encode_list([s.keyscale for s in found]),
                lists.encode_list([s.language for s in found]),
                lists.encode_list([s.timesignature for s in found]))


NODE_CLASS_MAPPINGS = {
    "ACEStepLoRA_CreateTrainingSample": CreateTrainingSample,
    "ACEStepLoRA_CollectTrainingSamples": CollectTrainingSamples,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ACEStepLoRA_CreateTrainingSample": "ACE-Step Create Training Sample",
    "ACEStepLoRA_CollectTrainingSamples": "ACE-Step Collect Training Samples",
}
