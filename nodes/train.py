"""ACE-Step LoRA Train: prepared tensors -> a LoRA (PEFT folder for kaola / the official app, one ComfyUI file)."""
from __future__ import annotations

import logging
import os
import time

from ..acestep_lora.console import TrainingBar
from ..acestep_lora.device import DEVICE_CHOICES
from ..acestep_lora.metrics import ProgressEvent
from ..acestep_lora.train import DEFAULT_TARGETS, TIMESTEP_SAMPLING, TrainConfig, TrainingCancelled, train_lora
from . import comfy
from .prepare import PrepareTrainingData, config_choices
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
                       "Mode): {path: PEFT adapter folder, scale: 1.0, ...}.",
                       "Per-epoch loss, learning rate, time and ETA, and where the files are.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tensor_dir": ("STRING", {"default": "acestep_lora/tensors", "tooltip": "Output of Prepare "
                                          "Training Data (relative paths are inside ComfyUI's output folder)."}),
                "checkpoint_dir": ("STRING", {"default": comfy.default_checkpoint_dir(), "tooltip":
                                              "The official ACE-Step 1.5 download (same as in Prepare)."}),
                "config_path": (config_choices(), {"default": "acestep-v15-turbo", "tooltip": "DiT to train: "
                                                   "the one the tensors were prepared with."}),
                "output_dir": ("STRING", {"default": "acestep_lora/runs/my_lora", "tooltip": "Folder for "
                                          "checkpoints and the final adapter; its name is the LoRA's name. A new "
                                          "run needs an empty folder (or resume_from = latest)."}),
                "lora_rank": ("INT", {"default": 64, "min": 4, "max": 256, "step": 4, "tooltip":
                                      "LoRA rank: capacity. 32 quick test, 64 standard, 128 large datasets."}),
                "lora_alpha": ("INT", {"default": 128, "min": 1, "max": 512, "tooltip": "Scaling: the LoRA acts "
                                       "with alpha/rank. Usually 2 x rank."}),
                "lora_dropout": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip":
                                           "Dropout on the LoRA input; guards small datasets against overfitting."}),
                "learning_rate": ("FLOAT", {"default": 3e-4, "min": 1e-7, "max": 1e-2, "step": 1e-5, "round": False,
                                            "tooltip": "Peak learning rate (warm-up, then cosine to 1%). 3e-4 "
                                                       "standard, 1e-4 for large datasets."}),
                "train_epochs": ("INT", {"default": 1000, "min": 1, "max": 10000, "tooltip": "Passes over the "
                                         "dataset. 500 quick, 1000 standard, 2000 for 200+ samples."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 8, "tooltip": "Samples per step (grouped "
                                       "by length). More uses more memory."}),
                "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Batches "
                                                  "averaged per optimizer step (a larger effective batch at no "
                                                  "extra memory)."}),
                "save_every_n_epochs": ("INT", {"default": 200, "min": 0, "max": 10000, "tooltip": "Checkpoint "
                                                "(adapter + resumable state + ComfyUI file) every N epochs; 0 = "
                                                "only at the end. Each checkpoint's LoRA is also listed in "
                                                "LoraLoaderModelOnly as <output_dir name>/epoch_N."}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": False,
                                 "tooltip": "Same seed and data give the same LoRA."}),
                "resume_from": ("STRING", {"default": "", "tooltip": "Empty: new run. 'latest': continue the "
                                           "newest checkpoint in output_dir (also after Cancel). Or a checkpoint "
                                           "folder path."}),
                "target_modules": ("STRING", {"default": DEFAULT_TARGETS, "tooltip": "Decoder layers that get a "
                                              "LoRA (comma-separated): q_proj,k_proj,v_proj,o_proj (official), "
                                              "add gate_proj,up_proj,down_proj for more capacity."}),
            },
            "optional": {
                "timestep_sampling": (list(TIMESTEP_SAMPLING), {"default": "auto", "advanced": True, "tooltip":
                                      "auto: turbo models use the 8 official shift-3 timesteps; base/sft use "
                                      "logit-normal timesteps with condition dropout, as they were trained."}),
                "cfg_dropout": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 0.5, "step": 0.01, "advanced": True,
                                          "tooltip": "With logit-normal sampling: share of steps trained without "
                                                     "the caption (keeps CFG working). Turbo ignores it."}),
                "gradient_checkpointing": (["auto", "on", "off"], {"default": "auto", "advanced": True, "tooltip":
                                           "Recompute activations to save memory (~30% slower). auto: on for "
                                           "GPUs under 20 GB."}),
                "warmup_steps": ("INT", {"default": 100, "min": 0, "max": 10000, "advanced": True, "tooltip":
                                         "Linear warm-up (capped at 10% of all steps)."}),
                "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.1,
                                            "advanced": True, "tooltip": "Gradient clipping."}),
                "trigger_tag": ("STRING", {"default": "", "advanced": True, "tooltip": "Recorded in the LoRA's "
                                           "metadata; empty = Prepare's custom_tag."}),
                "device": (list(DEVICE_CHOICES), {"default": "auto", "advanced": True, "tooltip":
                                                  "auto = CUDA, else Apple MPS, else CPU."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    VALIDATE_INPUTS = PrepareTrainingData.VALIDATE_INPUTS

    def train(self, tensor_dir, checkpoint_dir, config_path, output_dir, lora_rank, lora_alpha, lora_dropout,
              learning_rate, train_epochs, batch_size, gradient_accumulation, save_every_n_epochs, seed,
              resume_from, target_modules, timestep_sampling="auto", cfg_dropout=0.15, gradient_checkpointing="auto",
              warmup_steps=100, max_grad_norm=1.0, trigger_tag="", device="auto", unique_id=None):
        cfg = TrainConfig(
            tensor_dir=comfy.resolve_under_output(tensor_dir),
            checkpoint_dir=comfy.resolve_checkpoint_dir(checkpoint_dir),
            output_dir=comfy.resolve_under_output(output_dir), config_path=config_path, lora_rank=lora_rank,
            lora_alpha=float(lora_alpha), lora_dropout=lora_dropout, learning_rate=learning_rate,
            train_epochs=train_epochs, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
            save_every_n_epochs=save_every_n_epochs, seed=seed, resume_from=resume_from,
            target_modules=target_modules, timestep_sampling=timestep_sampling, cfg_dropout=cfg_dropout,
            gradient_checkpointing=gradient_checkpointing, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
            trigger_tag=trigger_tag, loras_dir=comfy.loras_directory(), device=device)
        return run_training(cfg, unique_id, output_dir)


def run_training(cfg: TrainConfig, unique_id, output_dir_as_typed: str) -> dict:
    """Train with ComfyUI's progress bar, live chart, console bar and Cancel; -> the node's ui and result.
    ``output_dir_as_typed``: the chart shows a run only on the node (of the workflow) that started it."""
    comfy.free_memory()  # ComfyUI's cached models out of the way
    live = LiveProgress(str(unique_id), output_dir_as_typed)
    try:
        result = train_lora(cfg, progress=live.update, cancel_requested=comfy.interrupt_requested)
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
