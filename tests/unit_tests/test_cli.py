"""The api-prompt command end to end on a tiny local open_clip model directory."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from api_tool.backends.registry import get_attributor
from api_tool.cli import main
from api_tool.prompt import attention_prompt
from tests.conftest import build_tiny_clip


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_clip")
    model = build_tiny_clip()
    config = {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {"layers": 3, "width": 48, "head_width": 16, "patch_size": 16, "image_size": 64},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {},
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    return directory


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, size=(60, 100, 3), dtype=np.uint8)).save(path)
    return path


def in_process(image_path: Path, query: str, model_dir: Path, style: str = "gray") -> np.ndarray:
    """What the CLI should write: the library's prompted image with the same model and defaults."""
    attributor = get_attributor(f"local-dir:{model_dir}", device="cpu")
    return np.asarray(attention_prompt(image_path, query, attributor, style).image)  # type: ignore[arg-type]


def test_cli_writes_the_prompted_png(tiny_model_dir: Path, image_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "prompted.png"
    status = main([str(image_path), "where is the cat?", "-o", str(out), "--model", f"local-dir:{tiny_model_dir}"])
    assert status == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "attribute" in printed and "model" in printed
    written = Image.open(out)
    assert written.size == (100, 60)
    original = np.asarray(Image.open(image_path), dtype=np.int32)
    prompted = np.asarray(written, dtype=np.int32)
    assert (prompted <= original + 1).all()  # gray level 0 only darkens
    assert (prompted != original).any()
    np.testing.assert_array_equal(prompted, in_process(image_path, "where is the cat?", tiny_model_dir))


@pytest.mark.parametrize("style", ["heatmap", "crop", "contour"])
def test_cli_styles(tiny_model_dir: Path, image_path: Path, tmp_path: Path, style: str) -> None:
    out = tmp_path / f"{style}.png"
    args = [str(image_path), "a dog", "-o", str(out), "--model", f"local-dir:{tiny_model_dir}", "--style", style]
    assert main(args) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), in_process(image_path, "a dog", tiny_model_dir, style))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.png", "where?"], "image file not found"),
        (["IMAGE", "   "], "query is empty"),
        (["IMAGE", "q", "--layer", "9"], "out of range"),
        (["IMAGE", "q", "--model", "ViT-Q-99"], "unknown CLIP model"),
        (["IMAGE", "q", "--kernel-size", "4"], "odd"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tiny_model_dir, image_path, tmp_path, capsys, args, message) -> None:
    args = [str(image_path) if arg == "IMAGE" else arg for arg in args]
    if "--model" not in args:
        args += ["--model", f"local-dir:{tiny_model_dir}"]
    assert main([*args, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("api-prompt: error:")


def test_console_script_is_installed(tiny_model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    command = [sys.executable, "-m", "api_tool.cli", str(image_path), "a cat", "-o", str(out)]
    result = subprocess.run(
        [*command, "--model", f"local-dir:{tiny_model_dir}"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(out)), in_process(image_path, "a cat", tiny_model_dir))
    scripts = entry_points(group="console_scripts")
    assert scripts["api-prompt"].value == "api_tool.cli:main"


@pytest.mark.parametrize(
    "flags",
    [
        ["--backend", "llava", "--combine", "cls"],
        ["--pretrained", "openai"],
        ["--model", "local-dir:/x", "--pretrained", "y"],
    ],
)
def test_cli_rejects_flags_that_would_be_ignored(image_path: Path, tmp_path: Path, flags: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(image_path), "q", "-o", str(tmp_path / "x.png"), *flags])
    assert info.value.code == 2
