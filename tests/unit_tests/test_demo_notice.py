"""The one-time notice that a demo model is used on the user's own image (CLI, tool, agent)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from langchain_core.messages import AIMessage
from PIL import Image

from agents.agent import create_api_agent
from api_tool.cli import main
from api_tool.demo_notice import (
    DEMO_NOTICE,
    DEMO_SCENE_KEY,
    first_notice,
    is_demo_model,
    is_user_image,
    reset_notices,
)
from api_tool.errors import DemoModelWarning
from api_tool.images import encode_image
from api_tool.tool import AttentionPromptTool
from tests.conftest import shared_tiny_attributor
from tests.unit_tests.test_agent import model_with


@pytest.fixture(autouse=True)
def fresh_notices() -> Iterator[None]:
    reset_notices()
    yield
    reset_notices()


def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(40, 64, 3), dtype=np.uint8))


def test_what_counts_as_a_demo_model_and_a_user_image() -> None:
    assert is_demo_model(None) and is_demo_model("demo") and is_demo_model("clip:demo-siglip")
    assert is_demo_model("lvlm:demo") and not is_demo_model("clip:ViT-L-14-336@openai")
    assert not is_demo_model(shared_tiny_attributor())
    assert is_user_image("photo.jpg") and is_user_image("data:image/png;base64,AAAA") and is_user_image(photo())
    scene = photo()
    scene.info[DEMO_SCENE_KEY] = 7
    assert not is_user_image(scene) and not is_user_image("scene:7")
    assert first_notice("x") and not first_notice("x") and first_notice("y")


def test_the_tool_says_it_once_with_a_demo_model_and_never_with_another() -> None:
    data, _ = encode_image(photo())
    call = {"type": "tool_call", "id": "1", "name": "attention_prompt", "args": {"image": data, "question": "a cat"}}
    demo = AttentionPromptTool(attributor="demo")
    texts = [demo.invoke(call).content[0]["text"] for _ in range(2)]
    assert texts[0].endswith(DEMO_NOTICE) and DEMO_NOTICE not in texts[1]
    reset_notices()
    other = AttentionPromptTool(attributor=shared_tiny_attributor())
    assert DEMO_NOTICE not in other.invoke(call).content[0]["text"]


def test_the_agent_warns_once_with_the_default_tool() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_api_agent(model_with(AIMessage("hi")))
        create_api_agent(model_with(AIMessage("hi")))
        create_api_agent(
            model_with(AIMessage("hi")), attention_tool=AttentionPromptTool(attributor=shared_tiny_attributor())
        )
    notices = [w for w in caught if issubclass(w.category, DemoModelWarning)]
    assert len(notices) == 1 and str(notices[0].message) == DEMO_NOTICE
    reset_notices()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_api_agent(
            model_with(AIMessage("hi")), attention_tool=AttentionPromptTool(attributor=shared_tiny_attributor())
        )
    assert not [w for w in caught if issubclass(w.category, DemoModelWarning)]


def test_the_cli_prints_one_stderr_line_for_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "photo.png"
    photo().save(image)
    assert main([str(image), "a cat", "-o", str(tmp_path / "a.png")]) == 0
    assert main([str(image), "a dog", "-o", str(tmp_path / "b.png")]) == 0
    assert capsys.readouterr().err.count(DEMO_NOTICE) == 1


def test_demo_notice_false_silences_the_tool_and_the_agent_for_demo_scenes() -> None:
    data, _ = encode_image(photo())
    call = {"type": "tool_call", "id": "1", "name": "attention_prompt", "args": {"image": data, "question": "a cat"}}
    quiet = AttentionPromptTool(attributor="demo", demo_notice=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_api_agent(model_with(AIMessage("hi")), attention_tool=quiet)
        text = quiet.invoke(call).content[0]["text"]
    assert DEMO_NOTICE not in text
    assert not [w for w in caught if issubclass(w.category, DemoModelWarning)]
    assert DEMO_NOTICE in AttentionPromptTool(attributor="demo").invoke(call).content[0]["text"]
