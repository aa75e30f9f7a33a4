"""ComfyUI node wrappers. No ML logic here: parse inputs, call acestep_lora, report progress, return outputs."""
from ..acestep_lora import console
from . import prepare, samples, train
from . import routes  # noqa: F401  live-chart HTTP routes; registers only inside a running ComfyUI

console.install()  # the pack's log lines in ComfyUI's console, prefixed once, above the training bar

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (samples, prepare, train):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
