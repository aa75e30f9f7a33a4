"""ACE-Step LoRA Train: prepared tensors -> a LoRA (PEFT folder for kaola / the official app, one ComfyUI file)."""
from __future__ import annotations

import logging
import os
import time

from ..acestep_lora import options
from ..acestep_lora.console import TrainingBar
from ..acestep_lora.metrics import ProgressEvent
from ..acestep_lora.train import TrainConfig, TrainingCancelled, train_lora
from . import comfy
from .prepare import PrepareTrainingData, option_widgets
from .preview import loss_chart

EVENT = "acestep_lora.training"  # its message: ProgressEvent.message(node=..., output_dir=...)
PREVIEW_EVERY_SECONDS = 2.0
log = logging.getLogger("acestep_lora.nodes")

# Loss history per node id, so a reloaded browser page can ask for the whole curve again (see nodes/routes.py).
RUNS: dict = {}


class LiveProgress:
    """Training progress for people: the node's progress bar with the loss-curve image, the console bar (the
    engine's log lines print above it), and the browser chart's websocket messages and history (RUNS)."""

    def __init__(self, node_id: str, output_dir: str):
        self.node_id, self.output_dir = node_id, output_dir
        self.bar, self.console = None, TrainingBar()
        self.last_preview = 0.0
        self.run = RUNS.setdefault(node_id, {})
        # output_dir as typed on the node: the chart shows a run only on the node that started it
        self.run.update(points=[], started=time.time(), done=False, output_dir=output_dir)

    def update(self, event: ProgressEvent) -> None:
        if self.bar is None:
            self.bar = comfy.Progress(event.total_steps, node_id=self.node_id)
        self.console.update(event)
        preview = None
        if event.points:
            self.run["points"].extend(event.points)
            self.run.update({k: v for k, v in vars(event).items() if k != "points"})  # what routes.py summarises
            comfy.send_event(EVENT, event.message(node=self.node_id, output_dir=self.output_dir))
            if time.time() - self.last_preview >= PREVIEW_EVERY_SECONDS or event.step == event.total_steps:
                preview = loss_chart(self.run["points"], event.message())
                self.last_preview = time.time()
        self.bar.set(event.step, preview)

    def close(self) -> None:
        self.run["done"] = True
        self.console.close()


class TrainLoRA:
    DESCRIPTION = ("Trains a LoRA on the prepared tensors. Cancel saves a resumable checkpoint (resume_from = "
                   "latest continues it). Writes the PEFT adapter (for kaola's nodes and the official app) and one "
                   "ComfyUI LoRA file with alpha baked in, so strength 1.0 in LoraLoaderModelOnly is the trained "
                   "strength.")
    CATEGORY = comfy.CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("ACE_STEP_LORA_INFO", "STRING")
    RETURN_NAMES = ("lora_info", "training_log")
    OUTPUT_TOOLTIPS = ("The trained LoRA for ACE-Step generation nodes (Text to Music, Cover, Repaint, Simple "
                       "Mode): its PEFT adapter folder (path), scale 1.0, and what it was trained with.",
                       "Per-epoch loss, learning rate, time and ETA, and where the files are.")

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
    live = LiveProgress(str(unique_id), output_dir_as_typed)
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
    return {"ui": {"text": [result.summary]}, "result": (lora_info, result.log)}


NODE_CLASS_MAPPINGS = {"ACEStepLoRA_Train": TrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"ACEStepLoRA_Train": "ACE-Step LoRA Train"}
