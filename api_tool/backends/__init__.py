"""Attribution backends: CLIP (open_clip) and LLaVA-family LVLMs (transformers)."""
