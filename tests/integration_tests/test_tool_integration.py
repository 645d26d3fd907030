"""langchain-tests ToolsIntegrationTests for AttentionPromptTool, offline on a tiny random-weight CLIP."""

from __future__ import annotations

from typing import Any

from langchain_tests.integration_tests import ToolsIntegrationTests

from api_tool.tool import AttentionPromptTool
from tests.conftest import shared_tiny_attributor
from tests.sample_images import noise, png_base64


class TestAttentionPromptToolIntegration(ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> type[AttentionPromptTool]:
        return AttentionPromptTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"attributor": shared_tiny_attributor(), "max_side": 64}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"question": "where is the red square?", "image": png_base64(noise(0))}
