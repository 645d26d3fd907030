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


def test_help_and_usage_errors_import_no_heavy_library() -> None:
    script = (
        "import sys\n"
        "from api_tool.cli import main\n"
        "for argv in (['--help'], ['only-one-argument', '-o', 'x.png']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'open_clip', 'langchain_core') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr
    assert "usage: api-prompt" in result.stdout and "QUESTION" in result.stderr


def cli(image: Path | str, model_dir: Path, *flags: str) -> int:
    return main([str(image), "a cat", "--model", f"local-dir:{model_dir}", *flags])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("api-prompt: error:"), err
    return err


def test_output_over_the_input_is_refused_unless_asked(tiny_model_dir, image_path: Path, capsys) -> None:
    before = image_path.read_bytes()
    assert cli(image_path, tiny_model_dir, "-o", str(image_path)) == 2
    assert "over an input image" in one_error_line(capsys) and image_path.read_bytes() == before
    assert cli(image_path, tiny_model_dir, "-o", str(image_path.parent / "." / image_path.name)) == 2
    assert image_path.read_bytes() == before
    assert cli(image_path, tiny_model_dir, "-o", str(image_path), "--overwrite") == 0
    assert image_path.read_bytes() != before


def test_output_formats_folders_and_missing_suffixes(tiny_model_dir, image_path: Path, tmp_path: Path, capsys) -> None:
    assert cli(image_path, tiny_model_dir, "-o", str(tmp_path / "out.xyz")) == 2
    assert "'.xyz'" in one_error_line(capsys) and not (tmp_path / "out.xyz").exists()
    assert cli(image_path, tiny_model_dir, "-o", str(tmp_path / "no_suffix")) == 0
    assert Image.open(tmp_path / "no_suffix").format == "PNG"
    assert cli(image_path, tiny_model_dir, "-o", str(tmp_path / "photo.jpg")) == 0
    assert Image.open(tmp_path / "photo.jpg").format == "JPEG"
    folder = tmp_path / "existing"
    folder.mkdir()
    assert cli(image_path, tiny_model_dir, "-o", str(folder)) == 0
    expected = in_process(image_path, "a cat", tiny_model_dir)
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "scene.png")), expected)
    assert json.loads((folder / "scene.json").read_text())["question"] == "a cat"


def test_unavailable_device_is_one_line_naming_the_devices(tiny_model_dir, image_path, tmp_path, capsys) -> None:
    assert cli(image_path, tiny_model_dir, "-o", str(tmp_path / "x.png"), "--device", "cuda:99") == 2
    err = one_error_line(capsys)
    assert "'cuda:99' is not available" in err and "available: cpu" in err
    assert cli(image_path, tiny_model_dir, "-o", str(tmp_path / "x.png"), "--device", "gpu") == 2
    assert "not a torch device" in one_error_line(capsys)


def test_remote_urls_need_the_cli_flag(tiny_model_dir, tmp_path: Path, capsys) -> None:
    assert cli("http://example.invalid/cat.png", tiny_model_dir, "-o", str(tmp_path / "x.png")) == 2
    err = one_error_line(capsys)
    assert "--allow-remote" in err and "allow_remote=True" not in err


def test_batch_of_images_and_questions_in_one_process(tiny_model_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    from api_tool.backends import registry

    folder, loose = tmp_path / "folder", tmp_path / "loose"
    folder.mkdir()
    loose.mkdir()
    rng = np.random.default_rng(11)
    for directory, name, size in [(folder, "a.png", (50, 80)), (folder, "b.jpg", (64, 64)), (loose, "c.png", (90, 40))]:
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(directory / name)
    (folder / "notes.txt").write_text("not an image")
    (loose / "broken.png").write_bytes(b"not a png")
    loads = []
    real_load = registry._load
    monkeypatch.setattr(registry, "_load", lambda *args: loads.append(args[0]) or real_load(*args))
    registry.clear_cache()
    out = tmp_path / "out"
    argv = [str(folder), str(loose / "*.png"), str(tmp_path / "missing.png"), "-q", "a cat", "-q", "the sky"]
    status = main([*argv, "-o", str(out), "--json", "--model", f"local-dir:{tiny_model_dir}"])
    captured = capsys.readouterr()
    assert status == 2 and len(loads) == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("api-prompt: error:") for line in errors[1:])
    assert "broken.png" in captured.err and "missing.png" in captured.err
    report = json.loads(captured.out)
    assert [Path(s["output"]).name for s in report["maps"]] == [
        "a_q1.png",
        "a_q2.png",
        "b_q1.png",
        "b_q2.png",
        "c_q1.png",
        "c_q2.png",
    ]
    assert len(report["errors"]) == 2
    for summary in report["maps"]:
        result = attention_prompt(summary["image"], summary["question"], get_attributor(f"local-dir:{tiny_model_dir}"))
        np.testing.assert_array_equal(np.asarray(Image.open(summary["output"])), np.asarray(result.image))
        row, col = np.unravel_index(np.argmax(result.mask), result.mask.shape)
        assert (summary["peak"]["x"], summary["peak"]["y"]) == (col, row)
        assert summary["image_size"] == list(result.original.size)
        x0, y0, x1, y1 = summary["box"]
        assert 0 <= x0 <= col < x1 <= result.original.width and 0 <= y0 <= row < y1 <= result.original.height
        assert {"load", "attribute", "upsample", "render", "write"} <= set(summary["timings"])
        assert json.loads(Path(summary["output"]).with_suffix(".json").read_text()) == summary


def test_several_questions_on_one_image_cost_one_image_pass(tiny_model_dir, image_path, tmp_path, capsys) -> None:
    attributor = get_attributor(f"local-dir:{tiny_model_dir}")
    attributor._cache.clear()  # type: ignore[attr-defined]
    passes = []
    handle = attributor.visual.register_forward_hook(lambda *_: passes.append(1))  # type: ignore[attr-defined]
    try:
        argv = [str(image_path), "-q", "a cat", "-q", "a dog", "-q", "the sky", "-o", str(tmp_path / "o")]
        assert main([*argv, "--model", f"local-dir:{tiny_model_dir}"]) == 0
    finally:
        handle.remove()
    assert len(passes) == 1 and len(list((tmp_path / "o").glob("*.png"))) == 3


def test_blank_questions_are_refused_before_the_model_loads(tiny_model_dir, image_path, tmp_path, capsys) -> None:
    argv = [
        str(image_path),
        "-q",
        "a cat",
        "-q",
        "  ",
        "-o",
        str(tmp_path / "o"),
        "--model",
        f"local-dir:{tiny_model_dir}",
    ]
    assert main(argv) == 2
    assert "question 2: the query is empty" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "o").glob("*.png")) == ["scene_q1.png"]


def test_public_names_are_the_functions_even_after_their_modules_load() -> None:
    script = (
        "import api_tool.prompt, api_tool.images, api_tool.maps\n"
        "import api_tool\n"
        "from api_tool import render, attention_prompt, load_image, AttributionMap\n"
        "names = (render, attention_prompt, load_image)\n"
        "print(all(callable(f) and not isinstance(f, type(api_tool)) for f in names))\n"
        "print(sorted(api_tool.__all__) == sorted(set(dir(api_tool)) & set(api_tool.__all__)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["True", "True"], result.stderr
