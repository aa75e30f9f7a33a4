"""ComfyUI node wrappers. No ML logic here: parse inputs, call acestep_lora, report progress, return outputs."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
