"""langchain-tests ToolsIntegrationTests for AttentionPromptTool, offline on a tiny random-weight CLIP."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from langchain_tests.integration_tests import ToolsIntegrationTests
from PIL import Image

from api_tool.tool import AttentionPromptTool
from tests.conftest import shared_tiny_attributor


def example_png_base64() -> str:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class TestAttentionPromptToolIntegration(ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> type[AttentionPromptTool]:
        return AttentionPromptTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"attributor": shared_tiny_attributor(), "max_side": 64}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"question": "where is the red square?", "image": example_png_base64()}
