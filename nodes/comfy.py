"""The only place the nodes touch ComfyUI: folders, progress bar, cancel, live messages, memory.

Each hook degrades to a plain fallback when ComfyUI is absent, so the nodes also run from scripts and tests.
Model folders are ComfyUI 0.20's ``folder_paths`` kinds (``diffusion_models`` incl. ``unet``, ``checkpoints``,
``vae``, ``text_encoders`` incl. ``clip``, and any extra_model_paths.yaml adds) and the Qwen tokenizer ComfyUI
ships in ``comfy/text_encoders/qwen25_tokenizer`` (what its own ACE-Step 1.5 text encoder uses).
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ..acestep_lora.metrics import json_safe
from ..acestep_lora.source import COMFY_TOKENIZER, Folders

CATEGORY = "audio/ACE-Step LoRA"  # where all of this pack's nodes sit in ComfyUI's node menu


def _folder_paths():
    try:  # inside ComfyUI (looked up per call, so stand-ins installed later are seen too)
        import folder_paths  # type: ignore

        return folder_paths
    except ImportError:
        return None


def output_directory() -> str:
    fp = _folder_paths()
    return fp.get_output_directory() if fp is not None else os.getcwd()


def temp_directory() -> str:
    """ComfyUI's temp folder (emptied at start-up; /view serves it as type "temp"), else <output>/../temp."""
    fp = _folder_paths()
    if fp is not None and hasattr(fp, "get_temp_directory"):
        return fp.get_temp_directory()
    return os.path.join(os.path.dirname(output_directory()), "temp")


def models_directory() -> str:
    fp = _folder_paths()
    return fp.models_dir if fp is not None else os.path.join(os.getcwd(), "models")


def resolve_under_output(path: str) -> str:
    """A relative path means "inside ComfyUI's output folder" (the current folder outside ComfyUI)."""
    path = os.path.expanduser((path or "").strip())
    return path if os.path.isabs(path) else os.path.join(output_directory(), path)


def resolve_input_path(path: str) -> str:
    """A typed audio path: absolute as is; relative is looked up in the current folder, ComfyUI's input folder,
    then its output folder (where Create Training Sample writes)."""
    path = os.path.expanduser((path or "").strip())
    if os.path.isabs(path) or os.path.exists(path):
        return path
    fp = _folder_paths()
    if fp is not None:
        for base in (fp.get_input_directory(), fp.get_output_directory()):
            candidate = os.path.join(base, path)
            if os.path.exists(candidate):
                return candidate
    return path


def resolve_checkpoint_dir(path: str) -> str:
    """The checkpoint folder a user typed: absolute or ~ as is; a relative path is tried against the current
    folder, ComfyUI's base folder and its models folder (so "models/Ace-Step1.5" works in every ComfyUI build)."""
    path = os.path.expanduser((path or "").strip())
    if os.path.isabs(path) or os.path.isdir(path):
        return path
    fp = _folder_paths()
    if fp is not None:
        for base in (getattr(fp, "base_path", None), fp.models_dir):
            if base and os.path.isdir(os.path.join(base, path)):
                return os.path.join(base, path)
    return path


def default_checkpoint_dir() -> str:
    """Where the kaola pack's users keep the official download: <ComfyUI models>/Ace-Step1.5."""
    return os.path.join(models_directory(), "Ace-Step1.5")


def _folder_list(kind: str) -> list[str]:
    fp = _folder_paths()
    if fp is None:
        return [os.path.join(models_directory(), kind)]
    try:
        return list(fp.get_folder_paths(kind))
    except (KeyError, AttributeError):  # a ComfyUI without this kind
        return []


def tokenizer_dirs() -> list[str]:
    """ComfyUI's bundled Qwen tokenizer folder: in its ``comfy`` package (a namespace package: ``__path__``, no
    ``__file__``), which sits next to folder_paths.py whatever --base-directory points the model folders to."""
    roots = []
    try:
        import comfy  # type: ignore

        roots += list(getattr(comfy, "__path__", None) or [])
    except ImportError:
        pass
    fp = _folder_paths()
    if fp is not None and getattr(fp, "__file__", None):
        roots.append(os.path.join(os.path.dirname(fp.__file__), "comfy"))
    found = [os.path.join(os.path.realpath(r), *COMFY_TOKENIZER) for r in roots]
    return list(dict.fromkeys(found))


def model_folders(checkpoint_dir: Optional[str] = None) -> Folders:
    """ComfyUI's model folders and the official download (``checkpoint_dir``, default models/Ace-Step1.5), for
    the model dropdowns and to find what they name."""
    return Folders(checkpoint_dir=checkpoint_dir or default_checkpoint_dir(),
                   diffusion_models=_folder_list("diffusion_models"), checkpoints=_folder_list("checkpoints"),
                   vae=_folder_list("vae"), text_encoders=_folder_list("text_encoders"),
                   tokenizer_dirs=tokenizer_dirs())


def loras_directory() -> str:
    """First folder of ComfyUI's ``loras`` list (what LoraLoaderModelOnly lists), else output/loras."""
    fp = _folder_paths()
    if fp is not None:
        try:
            dirs = fp.get_folder_paths("loras")
            if dirs:
                return dirs[0]
        except Exception:
            pass
    return os.path.join(output_directory(), "loras")


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (Prepare checks per sample)."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def interrupt_requested() -> bool:
    """Whether the user pressed Cancel; asks without clearing it (the trainer's cancel callback)."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return False
    return bool(mm.processing_interrupted())


def raise_interrupt() -> None:
    """End the node as ComfyUI's Cancel does (clearing the flag): ComfyUI reports the prompt as interrupted."""
    import comfy.model_management as mm  # type: ignore

    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()  # the flag was cleared meanwhile: still an interrupted prompt


def free_memory() -> None:
    """Ask ComfyUI to unload its cached models first, so training has the GPU to itself."""
    try:
        import comfy.model_management as mm  # type: ignore
    except ImportError:
        return
    mm.unload_all_models()
    mm.soft_empty_cache()


def send_event(event: str, data: dict, sid: Optional[str] = None) -> None:
    """Push a JSON message to the browser (the live training chart listens for it)."""
    data = json_safe(data)
    try:
        from server import PromptServer  # type: ignore
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data, sid)


class Progress:
    """ComfyUI progress bar (with optional PIL preview image) when available; no-op otherwise."""

    def __init__(self, total: int, node_id: Optional[str] = None):
        self.total = max(1, int(total))
        try:
            import comfy.utils  # type: ignore

            self.bar: Any = comfy.utils.ProgressBar(self.total, node_id=node_id)
        except ImportError:
            self.bar = None

    def set(self, value: int, preview=None) -> None:
        if self.bar is not None:
            self.bar.update_absolute(min(int(value), self.total), self.total,
                                     ("PNG", preview, None) if preview is not None else None)
