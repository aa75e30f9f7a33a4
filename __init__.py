"""ComfyUI entry point of the acestep-lora node pack (classic V1 node API).

Importing this file without ComfyUI installed works too: the nodes only touch ComfyUI modules when they run.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
