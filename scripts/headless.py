"""Run the pack's nodes without ComfyUI: small stand-ins for the ComfyUI modules the nodes use.

``install(base_dir)`` registers ``folder_paths``, ``comfy.utils``, ``comfy.model_management`` and ``server`` in
``sys.modules`` (behaving like ComfyUI 0.20's: output/models folders and the model kinds the nodes list,
``comfy/`` under ``base_dir`` for its bundled tokenizer, a ProgressBar that records its updates, the
interrupt flag and ``InterruptProcessingException``, a PromptServer that records ``send_sync`` messages).
``load_pack()`` imports this repository as a package exactly as ComfyUI 0.20 loads a folder under ``custom_nodes/``
(``nodes.load_custom_node``): the module is named after the folder's path with "." replaced by "_x_", so the pack
must work under a name that is no Python identifier (``.../custom_nodes/acestep-lora``). Used by the demo and the
node tests; never by the pack itself.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InterruptProcessingException(Exception):
    pass


# ComfyUI's own class derives from BaseException so `except Exception` does not swallow a Cancel.
InterruptProcessingException.__bases__ = (BaseException,)


class ProgressBar:
    instances: list = []

    def __init__(self, total, node_id=None):
        self.total, self.node_id, self.current, self.updates = total, node_id, 0, []
        ProgressBar.instances.append(self)

    def update_absolute(self, value, total=None, preview=None):
        self.current = value
        self.total = total or self.total
        self.updates.append((value, self.total, preview))

    def update(self, value):
        self.update_absolute(self.current + value)


class _PromptServer:
    def __init__(self):
        self.messages = []
        self.client_id = None
        self.routes = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))


def install(base_dir: str) -> types.SimpleNamespace:
    """Register the stand-ins; ComfyUI's base folder is ``base_dir``. Returns handles to their state."""
    output = os.path.join(base_dir, "output")
    models = os.path.join(base_dir, "models")
    for d in (output, models, os.path.join(models, "loras")):
        os.makedirs(d, exist_ok=True)

    fp = types.ModuleType("folder_paths")
    fp.base_path, fp.models_dir = base_dir, models
    fp.folder_names_and_paths = {"loras": ([os.path.join(models, "loras"), os.path.join(output, "loras")],
                                           {".safetensors"})}
    for kind, folders in (("checkpoints", ["checkpoints"]), ("vae", ["vae"]),  # as ComfyUI 0.20's folder_paths
                          ("text_encoders", ["text_encoders", "clip"]),
                          ("diffusion_models", ["unet", "diffusion_models"])):
        fp.folder_names_and_paths[kind] = ([os.path.join(models, f) for f in folders], {".safetensors", ".sft"})
    fp.get_output_directory = lambda: output
    fp.get_input_directory = lambda: os.path.join(base_dir, "input")
    fp.get_temp_directory = lambda: os.path.join(base_dir, "temp")
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths.get(name, ([],))[0])

    state = types.SimpleNamespace(interrupted=False, unloaded=0)
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException

    def throw_exception_if_processing_interrupted():
        if state.interrupted:
            state.interrupted = False
            raise InterruptProcessingException()

    def unload_all_models():
        state.unloaded += 1

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.processing_interrupted = lambda: state.interrupted
    mm.interrupt_current_processing = lambda value=True: setattr(state, "interrupted", value)
    mm.unload_all_models = unload_all_models
    mm.soft_empty_cache = lambda force=False: None

    comfy = types.ModuleType("comfy")
    comfy.__path__ = [os.path.join(base_dir, "comfy")]  # a namespace package, as ComfyUI's (its bundled tokenizer)
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    comfy.utils, comfy.model_management = utils, mm

    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {"instance": _PromptServer()})

    sys.modules.update({"folder_paths": fp, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm,
                        "server": server})
    ProgressBar.instances.clear()
    state.output, state.models, state.server, state.base = output, models, server.PromptServer.instance, base_dir
    return state


def load_pack(name: str = ""):
    """Import the repository root as a package, named as ComfyUI names it (relative imports resolve as there)."""
    name = name or ROOT.replace(".", "_x_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
