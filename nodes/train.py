"""ACE-Step LoRA Train: prepared tensors -> a LoRA (PEFT folder for kaola / the official app, one ComfyUI file),
with audio previews and a held-out validation loss while it trains (acestep_lora/previews.py, validation.py).

Preview clips are copied into ComfyUI's temp folder (``temp/acestep_lora/<node id>/``), which ``/view`` serves: the
websocket messages name them (``previews[i].audio``) so web/acestep_lora.js plays the newest while training runs,
and the node's result lists them as ``ui.audio`` (ComfyUI's audio preview format) and returns the last epoch's clips
as an AUDIO output.
"""
from __future__ import annotations

import logging
import os
import shutil
import time


from ..acestep_lora import options
from ..acestep_lora.audio import to_comfy_audio
from ..acestep_lora.console import TrainingBar
from ..acestep_lora.metrics import ProgressEvent
from ..acestep_lora.previews import saved_previews
from ..acestep_lora.sampler import SAMPLE_RATE
from ..acestep_lora.train import TrainConfig, TrainingCancelled, train_lora
from ..acestep_lora.validation import BEST_DIR, best_info
from . import comfy
from .prepare import PrepareTrainingData, option_widgets
from .preview import loss_chart

EVENT = "acestep_lora.training"  # ProgressEvent.message(node=..., output_dir=..., started=...), previews playable
PREVIEW_FOLDER = "acestep_lora"  # inside ComfyUI's temp folder
PREVIEW_EVERY_SECONDS = 2.0
log = logging.getLogger("acestep_lora.nodes")

# Loss history per node id, so a reloaded browser page can ask for the whole curve again (see nodes/routes.py).
RUNS: dict = {}


def playable(node_id: str, run_dir: str, entry: dict) -> dict:
    """A preview set (ProgressEvent.previews entry, ``files`` relative to ``run_dir``) plus ``audio``: its clips
    copied into ComfyUI's temp folder, as ``{"filename", "subfolder", "type": "temp"}`` for /view."""
    subfolder = f"{PREVIEW_FOLDER}/{node_id}"
    folder = os.path.join(comfy.temp_directory(), *subfolder.split("/"))
    os.makedirs(folder, exist_ok=True)
    label = "base" if entry.get("base") else f"epoch_{entry['epoch']}"
    audio = []
    for i, file in enumerate(entry["files"], 1):
        source = os.path.join(run_dir, file)
        if not os.path.isfile(source):
            log.warning(f"preview clip {source} is missing; not shown")
            continue
        name = f"{label}_{i}.flac"
        shutil.copyfile(source, os.path.join(folder, name))
        audio.append({"filename": name, "subfolder": subfolder, "type": "temp"})
    return {**entry, "audio": audio}


class LiveProgress:
    """Training progress for people: the node's progress bar with the loss-curve image, the console bar (the
    engine's log lines print above it), and the browser chart's websocket messages and history (RUNS): losses,
    validation losses and preview clips (copied to ComfyUI's temp folder so the browser can play them)."""

    def __init__(self, node_id: str, output_dir: str, run_dir: str = ""):
        self.node_id, self.output_dir, self.run_dir = node_id, output_dir, run_dir
        self.bar, self.console = None, TrainingBar()
        self.last_preview = 0.0
        self.run = RUNS.setdefault(node_id, {})
        # output_dir as typed on the node: the chart shows a run only on the node that started it
        self.run.update(points=[], validation=[], previews=[], started=time.time(), done=False, output_dir=output_dir)

    def update(self, event: ProgressEvent) -> None:
        if self.bar is None:
            self.bar = comfy.Progress(event.total_steps, node_id=self.node_id)
        self.console.update(event)
        preview = None
        if event.points or event.validation or event.previews:
            sets = [playable(self.node_id, self.run_dir, p) for p in event.previews]
            self.run["points"].extend(event.points)
            self.run["validation"] = merge(self.run["validation"], event.validation, lambda v: v[0])
            self.run["previews"] = merge(self.run["previews"], sets, lambda p: p["step"])
            # what routes.py summarises
            self.run.update({k: v for k, v in vars(event).items() if k not in ("points", "validation", "previews")})
            # started: which run of this node (the chart starts afresh on another one)
            comfy.send_event(EVENT, dict(event.message(node=self.node_id, output_dir=self.output_dir,
                                                       started=self.run["started"]), previews=sets))
            if event.points and (time.time() - self.last_preview >= PREVIEW_EVERY_SECONDS
                                 or event.step == event.total_steps):
                preview = loss_chart(self.run["points"], event.message(), self.run["validation"])
                self.last_preview = time.time()
        self.bar.set(event.step, preview)

    def close(self) -> None:
        self.run["done"] = True
        self.console.close()


def merge(existing: list, new: list, step) -> list:
    """New validation points / preview sets supersede those at or after the first new step (a resume from an
    earlier checkpoint, a new run), as the chart's points do."""
    if not new:
        return existing
    first = min(step(x) for x in new)
    return [x for x in existing if step(x) < first] + list(new)


class TrainLoRA:
    DESCRIPTION = ("Trains a LoRA on the prepared tensors. Cancel saves a resumable checkpoint (resume_from = "
                   "latest continues it). Writes the PEFT adapter (for kaola's nodes and the official app) and one "
                   "ComfyUI LoRA file with alpha baked in, so strength 1.0 in LoraLoaderModelOnly is the trained "
                   "strength. While it trains, it plays short preview clips of the LoRA (and of the model without "
                   "it, to compare) and charts a validation loss on held-out samples; the LoRA of the epoch where "
                   "that loss was lowest is kept in best/.")
    CATEGORY = comfy.CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("ACE_STEP_LORA_INFO", "STRING", "AUDIO")
    RETURN_NAMES = ("lora_info", "training_log", "previews")
    OUTPUT_TOOLTIPS = ("The trained LoRA for ACE-Step generation nodes (Text to Music, Cover, Repaint, Simple "
                       "Mode): its PEFT adapter folder (path), scale 1.0, and what it was trained with.",
                       "Per-epoch loss, learning rate, time and ETA, and where the files are.",
                       "The preview clips of the last epoch (48 kHz stereo, one batch item per clip) for Save "
                       "Audio or Preview Audio; with previews off, 1 s of silence.")

    @classmethod
    def INPUT_TYPES(cls):
        return {**option_widgets(options.TRAIN), "hidden": {"unique_id": "UNIQUE_ID"}}

    VALIDATE_INPUTS = PrepareTrainingData.VALIDATE_INPUTS

    def train(self, unique_id=None, **inputs):  # inputs: the option table's widgets
        cfg = options.config_from_inputs(
            TrainConfig, inputs, tensor_dir=comfy.resolve_under_output(inputs["tensor_dir"]),
            checkpoint_dir=comfy.resolve_checkpoint_dir(inputs["checkpoint_dir"]),
            output_dir=comfy.resolve_under_output(inputs["output_dir"]), loras_dir=comfy.loras_directory())
        return run_training(cfg, unique_id, inputs["output_dir"])


def run_training(cfg: TrainConfig, unique_id, output_dir_as_typed: str) -> dict:
    """Train with ComfyUI's progress bar, live chart, console bar and Cancel; -> the node's ui and result.
    ``output_dir_as_typed``: the chart shows a run only on the node (of the workflow) that started it."""
    comfy.free_memory()  # ComfyUI's cached models out of the way
    live = LiveProgress(str(unique_id), output_dir_as_typed, cfg.output_dir)
    try:
        result = train_lora(cfg, progress=live.update, cancel_requested=comfy.interrupt_requested,
                            folders=comfy.model_folders(cfg.checkpoint_dir))
    except TrainingCancelled as stop:
        live.close()  # the console bar first, so the message is the last line
        log.info(stop.resumable.message("queue it again with resume_from = latest to continue"))
        comfy.raise_interrupt()  # ComfyUI reports the prompt as interrupted
    finally:
        live.close()
    loras_dir = comfy.loras_directory()
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    lora_info = {
        "path": result.adapter_dir, "scale": 1.0, "comfy_lora_path": result.comfy_lora_path,
        "comfy_lora_name": os.path.relpath(result.comfy_lora_path, loras_dir)
        if result.comfy_lora_path.startswith(loras_dir) else os.path.basename(result.comfy_lora_path),
        "rank": cfg.lora_rank, "alpha": alpha, "config_path": cfg.config_path,
        "target_modules": cfg.target_modules, "trigger_tag": result.trigger_tag, "epochs": result.epochs,
        "steps": result.steps, "final_loss": result.final_loss, "output_dir": result.output_dir,
        "epoch_loras": [os.path.relpath(p, loras_dir) if p.startswith(loras_dir) else p for p in result.epoch_loras],
    }
    best = best_info(result.output_dir)
    if best is not None:
        lora_info["best"] = {"path": os.path.join(result.output_dir, BEST_DIR, best["adapter"]),
                             "epoch": best["epoch"], "validation_loss": best["validation_loss"]}
    sets = [playable(str(unique_id), result.output_dir,
                     dict(s, files=[os.path.relpath(f, result.output_dir) for f in s["files"]]))
            for s in saved_previews(result.output_dir)]
    latest = [s for s in sets if not s["base"]][-1:]
    ui = {"text": [result.summary], "audio": [a for s in latest + [s for s in sets if s["base"]] for a in s["audio"]],
          "acestep_lora_previews": sets}
    return {"ui": ui, "result": (lora_info, result.log, to_comfy_audio(
        [os.path.join(result.output_dir, f) for f in latest[0]["files"]] if latest else [], SAMPLE_RATE))}


NODE_CLASS_MAPPINGS = {"ACEStepLoRA_Train": TrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"ACEStepLoRA_Train": "ACE-Step LoRA Train"}
