"""Files named by the model: refused unless they lie inside ``allowed_dirs``, with no escape route."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ToolMessage
from langchain_core.tools import ToolException
from PIL import Image

from api_tool.errors import ImagePathNotAllowedError
from api_tool.tool import AttentionPromptTool
from tests.conftest import shared_tiny_attributor
from tests.sample_images import noise, png_base64
from tests.unit_tests.test_tool import runtime_with, tool_call, user_message

REFUSED = "this tool reads no files named in a tool call"
OUTSIDE = "is not an existing file inside the directories this tool may read"
GUIDANCE = "Leave `image` empty to use the latest image the user sent, or pass 'conversation:N'"


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """``allowed/a.png``, ``private/secret.png``, ``allowed/link.png`` -> the secret, ``allowed_link`` -> allowed."""
    allowed, private = tmp_path / "allowed", tmp_path / "private"
    allowed.mkdir()
    private.mkdir()
    noise(1).save(allowed / "a.png")
    noise(2).save(private / "secret.png")
    (allowed / "link.png").symlink_to(private / "secret.png")
    (tmp_path / "allowed_link").symlink_to(allowed, target_is_directory=True)
    return {"root": tmp_path, "allowed": allowed, "private": private, "allowed_link": tmp_path / "allowed_link"}


def ask(tool: AttentionPromptTool, image: str, **extra: Any) -> ToolMessage:
    message = tool.invoke(tool_call({"question": "what is it?", "image": image, **extra}))
    assert isinstance(message, ToolMessage)
    return message


def assert_loaded(tool: AttentionPromptTool, message: ToolMessage, image: Image.Image) -> None:
    """``message`` succeeded and shows exactly the prompted ``image`` (the same call with its base64)."""
    assert message.status == "success", message.content
    assert message.artifact["image_source"] == "the given image"
    assert message.content[1] == ask(tool, png_base64(image)).content[1]


def assert_refused(message: ToolMessage, fragment: str) -> None:
    assert message.status == "error"
    assert isinstance(message.content, str)
    assert fragment in message.content and GUIDANCE in message.content
    assert "base64" not in message.content


def strict_tool(**fields: Any) -> AttentionPromptTool:
    return AttentionPromptTool(attributor=shared_tiny_attributor(), max_side=None, **fields)


def test_by_default_no_model_path_is_read(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    tool = strict_tool()
    monkeypatch.chdir(tree["allowed"])
    for reference in (str(tree["private"] / "secret.png"), str(tree["allowed"] / "a.png"), "a.png", "./a.png"):
        assert_refused(ask(tool, reference), REFUSED)


def test_refusal_is_an_image_path_not_allowed_error(tree: dict[str, Path]) -> None:
    with pytest.raises(ToolException, match=REFUSED) as raised:
        strict_tool()._run(question="q", image=str(tree["private"] / "secret.png"))
    assert isinstance(raised.value.__cause__, ImagePathNotAllowedError)
    with pytest.raises(ToolException, match=OUTSIDE) as raised:
        strict_tool(allowed_dirs=[tree["allowed"]])._run(question="q", image=str(tree["private"] / "secret.png"))
    assert isinstance(raised.value.__cause__, ImagePathNotAllowedError)


def test_a_file_inside_an_allowed_dir_is_read(tree: dict[str, Path]) -> None:
    tool = strict_tool(allowed_dirs=[tree["allowed"]])
    assert_loaded(tool, ask(tool, str(tree["allowed"] / "a.png")), noise(1))


@pytest.mark.parametrize(
    "escape",
    [
        "{private}/secret.png",  # absolute path outside
        "{allowed}/../private/secret.png",  # `..` out of an allowed dir
        "{allowed}/link.png",  # symlink inside the allowed dir pointing outside
        "{allowed}/missing.png",  # does not exist: same answer as outside, nothing learnt
        "{allowed}/.",  # the allowed dir itself is inside but is no file: refused by load_image
    ],
)
def test_escapes_from_an_allowed_dir_are_refused(tree: dict[str, Path], escape: str) -> None:
    tool = strict_tool(allowed_dirs=[tree["allowed"]])
    message = ask(tool, escape.format(allowed=tree["allowed"], private=tree["private"]))
    if escape == "{allowed}/.":
        assert message.status == "error" and "not a file" in message.content
    else:
        assert_refused(message, OUTSIDE)


def test_relative_paths_resolve_against_the_working_directory(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = strict_tool(allowed_dirs=[tree["allowed"]])
    monkeypatch.chdir(tree["allowed"])
    assert_loaded(tool, ask(tool, "a.png"), noise(1))
    assert_refused(ask(tool, "../private/secret.png"), OUTSIDE)
    monkeypatch.chdir(tree["private"])
    assert_refused(ask(tool, "secret.png"), OUTSIDE)


def test_an_allowed_dir_given_as_a_symlink_is_its_target(tree: dict[str, Path]) -> None:
    tool = strict_tool(allowed_dirs=[tree["allowed_link"]])
    assert tool.allowed_dirs == [tree["allowed"].resolve()]
    assert_loaded(tool, ask(tool, str(tree["allowed_link"] / "a.png")), noise(1))
    assert_loaded(tool, ask(tool, str(tree["allowed"] / "a.png")), noise(1))
    assert_refused(ask(tool, str(tree["allowed_link"] / "link.png")), OUTSIDE)
    assert_refused(ask(tool, str(tree["allowed_link"] / ".." / "private" / "secret.png")), OUTSIDE)


def test_tilde_expands_to_home_in_paths_and_in_allowed_dirs(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tree["root"]))
    tool = strict_tool(allowed_dirs=["~/allowed"])
    assert tool.allowed_dirs == [tree["allowed"].resolve()]
    assert_loaded(tool, ask(tool, "~/allowed/a.png"), noise(1))
    assert_refused(ask(tool, "~/private/secret.png"), OUTSIDE)
    assert_refused(ask(tool, "~/allowed/../private/secret.png"), OUTSIDE)
    assert_refused(ask(tool, "~no-such-user-here/a.png"), OUTSIDE)


@pytest.mark.parametrize("scheme", ["file://", "FILE://", "file:"])
def test_file_uris_are_refused_even_inside_an_allowed_dir(tree: dict[str, Path], scheme: str) -> None:
    tool = strict_tool(allowed_dirs=[tree["allowed"]])
    message = ask(tool, f"{scheme}{tree['allowed'] / 'a.png'}")
    assert_refused(message, "file: URIs are not accepted")


def test_a_base64_looking_file_name_is_never_opened(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    name = "A" * 40  # every character is base64, so the string is decoded as base64, not opened
    noise(2).save(tree["private"] / name, format="PNG")
    monkeypatch.chdir(tree["private"])
    for tool in (strict_tool(), strict_tool(allowed_dirs=[tree["private"]])):
        message = ask(tool, name)
        assert message.status == "error" and "not an image" in message.content
        assert f"{name!r} holds only base64 characters, so it was read as a base64 image" in message.content


def test_a_refused_path_is_not_tried_as_anything_else(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[Any] = []
    monkeypatch.setattr("api_tool.image_refs.load_image", lambda ref, **_: loaded.append(ref))
    tool = strict_tool(allowed_dirs=[tree["allowed"]])
    for reference in ("relative/secret.png", str(tree["private"] / "secret.png"), "data:text/plain,x", "HTTP://x/y"):
        assert ask(tool, reference).status == "error"
    assert loaded == []
    ask(tool, str(tree["allowed"] / "a.png"))  # the patched loader is the one a model-named path reaches
    assert loaded == [tree["allowed"] / "a.png"]


def test_images_the_user_sent_and_inline_images_still_work(tree: dict[str, Path]) -> None:
    tool = strict_tool()
    runtime = runtime_with([user_message("look", noise(3))])
    from_user = ask(tool, "", runtime=runtime)
    assert from_user.status == "success"
    assert from_user.artifact["image_source"] == "user image 1 of 1 in the conversation"
    assert ask(tool, "conversation:1", runtime=runtime).content[1] == from_user.content[1]
    assert ask(tool, png_base64(noise(3))).content[1] == from_user.content[1]
    assert ask(tool, f"data:image/png;base64,{png_base64(noise(3))}").content[1] == from_user.content[1]


def test_remote_urls_stay_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []

    def fake_fetch(url: str) -> bytes:
        fetched.append(url)
        return base64.b64decode(png_base64(noise(4)))

    monkeypatch.setattr("api_tool.images._fetch", fake_fetch)
    refused = ask(strict_tool(), "https://example.com/a.png")
    assert refused.status == "error" and "remote image URLs are disabled" in refused.content
    assert fetched == []
    allowed = ask(strict_tool(allow_remote=True), "https://example.com/a.png")
    assert allowed.status == "success" and fetched == ["https://example.com/a.png"]


def test_python_callers_of_annotate_are_trusted_with_paths(tree: dict[str, Path]) -> None:
    result = strict_tool().annotate(str(tree["private"] / "secret.png"), "what is it?")
    assert result.original.size == noise(2).size


def test_allowed_dirs_are_checked_at_construction(tree: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"allowed_dirs: .* is not an existing directory"):
        strict_tool(allowed_dirs=[tree["root"] / "nowhere"])
    with pytest.raises(ValueError, match=r"allowed_dirs: .* is not an existing directory"):
        strict_tool(allowed_dirs=[tree["allowed"] / "a.png"])
    assert strict_tool().allowed_dirs == []
    assert os.path.isabs(strict_tool(allowed_dirs=[tree["allowed"]]).allowed_dirs[0])
