"""ComfyUI entry point of the acestep-lora node pack (classic V1 node API).

Importing this file without ComfyUI installed works too: the nodes only touch ComfyUI modules when they run.
ComfyUI imports it as a package named after the folder's path, which may hold a "-" (``custom_nodes/acestep-lora``);
the relative imports below work under any such name. pytest leaves this file alone (tests/conftest.py), and the
installable core (``pip install .``) is ``acestep_lora/`` alone.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
