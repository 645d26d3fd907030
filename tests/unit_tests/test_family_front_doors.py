"""Every LVLM family through the front doors users take: a saved directory through the registry and
``api-prompt --backend lvlm --model DIR``, chat through ``ChatTransformersVLM`` (invoke and stream), and
self-attribution of that chat model in the reflection loop's tool."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.messages import HumanMessage
from PIL import Image

from agents.chat_models import ChatTransformersVLM
from agents.reflection import default_tool
from api_tool.backends.lvlm import LvlmAttributor
from api_tool.backends.registry import get_attributor
from api_tool.cli import main
from api_tool.families import lvlm_families
from tests.tiny_lvlms.gemma3 import build_tiny_gemma3
from tests.tiny_lvlms.idefics3 import build_tiny_idefics3, build_tiny_smolvlm
from tests.tiny_lvlms.internvl import build_tiny_internvl
from tests.tiny_lvlms.llava_next import build_tiny_llava_next, build_tiny_llava_onevision
from tests.tiny_lvlms.qwen2_vl import build_tiny_qwen2_vl
from tests.tiny_models import tiny_llava
from tests.tolerances import assert_sums_close


def _llava(seed: int = 0) -> tuple[Any, Any]:
    tiny = tiny_llava(seed=seed)
    return tiny.model, tiny.processor


BUILDERS: dict[str, tuple[str, Callable[..., tuple[Any, Any]]]] = {
    "llava": ("llava", _llava),
    "llava_next": ("llava_next", build_tiny_llava_next),
    "llava_onevision": ("llava_onevision", build_tiny_llava_onevision),
    "gemma3": ("gemma3", build_tiny_gemma3),
    "idefics3": ("idefics3", build_tiny_idefics3),
    "smolvlm": ("smolvlm", build_tiny_smolvlm),
    "internvl": ("internvl", build_tiny_internvl),
    "qwen2_vl": ("qwen2_vl", partial(build_tiny_qwen2_vl, variant="qwen2_vl")),
    "qwen2_5_vl": ("qwen2_vl", partial(build_tiny_qwen2_vl, variant="qwen2_5_vl")),
    "qwen3_vl": ("qwen2_vl", partial(build_tiny_qwen2_vl, variant="qwen3_vl")),
}
"""Test case -> (family in the table, builder of a tiny random-weight model and its processor)."""
QUESTION = "what is in the image?"


def photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(5).integers(0, 256, (36, 60, 3), dtype=np.uint8))


def test_every_lvlm_family_in_the_table_is_tested_here() -> None:
    assert {entry.name for entry in lvlm_families()} <= {family for family, _ in BUILDERS.values()}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any, Any]:
    family, build = BUILDERS[request.param]
    model, processor = build(seed=0)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return family, directory, model, processor


def test_a_saved_model_of_every_family_through_the_registry_and_the_cli(saved, tmp_path: Path, capsys) -> None:
    name, directory, model, processor = saved
    loaded = get_attributor(f"lvlm:{directory}", device="cpu", layer=-1, max_new_tokens=3)
    amap = loaded.attribute(photo(), QUESTION)
    assert amap.metadata["family"] == name and amap.upsample().shape == (36, 60)
    in_memory = LvlmAttributor.from_model(model, processor, layer=-1, max_new_tokens=3).attribute(photo(), QUESTION)
    assert in_memory.metadata["answer"] == amap.metadata["answer"]
    assert_sums_close(in_memory.raw, amap.raw, n_terms=2048)
    image = tmp_path / "photo.png"
    photo().save(image)
    argv = [str(image), QUESTION, "-o", str(tmp_path / "out.png"), "--backend", "lvlm", "--model", str(directory)]
    assert main([*argv, "--device", "cpu", "--layer", "-1"]) == 0
    assert Image.open(tmp_path / "out.png").size == (60, 36)
    assert f"wrote {tmp_path / 'out.png'}" in capsys.readouterr().out


def test_chat_and_self_attribution_with_every_family(saved) -> None:
    name, _, model, processor = saved
    buffer = io.BytesIO()
    photo().save(buffer, format="PNG")
    block = {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode(), "mime_type": "image/png"}
    message = HumanMessage([{"type": "text", "text": QUESTION}, block])
    vlm = ChatTransformersVLM(hf_model=model, processor=processor, max_tokens=4)
    reply = vlm.invoke([message])
    assert isinstance(reply.content, str)
    assert "".join(str(chunk.content) for chunk in vlm.stream([message])) == reply.content
    assert vlm.self_attribution_family == name
    tool = default_tool(vlm, layer=-1, max_new_tokens=3)
    assert isinstance(tool.backend, LvlmAttributor) and tool.backend.model is model
    scored = tool.annotate(photo(), QUESTION, answer="a cat").map
    assert scored.metadata["family"] == name and scored.metadata["mode"] == "teacher_forcing"
    assert scored.metadata["answer"] == "a cat"
