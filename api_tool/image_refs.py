"""Images named by a model or a remote client: which strings are read how, and which files may be read.

One policy, shared by the LangChain tool (``AttentionPromptTool``) and the MCP server (``api-prompt serve``),
for an image reference that arrives as text from someone less trusted than the process's own code:

* a ``data:image/...;base64,`` URI, or a plain base64 string (at least 32 base64 characters; wrapped as a
  data URI, so it is never looked up as a file name);
* an ``http(s)`` URL, fetched only with ``allow_remote``;
* anything else is a file path, read only inside ``allowed_dirs``: ``~`` is expanded and symlinks are
  followed, and the result must be an existing file inside one of the (resolved) directories, so ``..``,
  symlinks pointing out and ``file:`` URIs are refused with ``ImagePathNotAllowedError``. A missing file is
  refused with the same message as one outside, so a refusal tells nothing about the disk.

Example:
    >>> from api_tool.image_refs import load_named_image, resolve_allowed_dirs
    >>> roots = resolve_allowed_dirs(["~/Pictures"])  # doctest: +SKIP
    >>> load_named_image("~/Pictures/cat.png", allowed_dirs=roots).size  # doctest: +SKIP
    (640, 480)
    >>> load_named_image("/etc/passwd", allowed_dirs=[])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    api_tool.errors.ImagePathNotAllowedError: '/etc/passwd' is a file path, and this tool reads no files named in a ...
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from PIL import Image

from api_tool.errors import ImageLoadError, ImagePathNotAllowedError, InvalidParameterError, NotAnImageError
from api_tool.images import DEFAULT_MAX_PIXELS, load_image

# The strings ``load_image`` reads as a URL or a data URI before it tries them as a path (same tests, same case),
# and its test for base64 (which it tries as a path first, so base64 is wrapped as a data URI here).
_REMOTE_PREFIXES = ("http://", "https://")
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,")
_BASE64_TEXT = re.compile(r"^[A-Za-z0-9+/=\s_-]{32,}$")
ReferenceKind = Literal["url", "data_uri", "base64", "path"]


def resolve_allowed_dirs(directories: Iterable[str | Path], *, what: str = "allowed_dirs") -> list[Path]:
    """Each directory resolved (``~`` expanded, symlinks followed); ``InvalidParameterError`` naming ``what``
    for one that is not an existing directory.

    Example:
        >>> resolve_allowed_dirs(["/nowhere/at/all"], what="--root")
        Traceback (most recent call last):
        ...
        api_tool.errors.InvalidParameterError: --root: '/nowhere/at/all' is not an existing directory
    """
    resolved = []
    for directory in directories:
        try:
            path = Path(directory).expanduser().resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a symlink loop, "~user" of no known user
            path = None
        if path is None or not path.is_dir():
            raise InvalidParameterError(f"{what}: {str(directory)!r} is not an existing directory")
        resolved.append(path)
    return resolved


def load_named_image(
    reference: str,
    *,
    allowed_dirs: Sequence[Path],
    allow_remote: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    hint: str = "",
) -> Image.Image:
    """The RGB image ``reference`` names, by the policy in the module docstring. Only a URL, data URI or
    base64 string reaches ``load_image`` as text; anything else is a path, checked by ``allowed_path`` and
    passed on resolved. ``allowed_dirs`` must already be resolved (``resolve_allowed_dirs``); ``hint`` ends
    the message of a refused path (what to send instead).

    Raises ``ImagePathNotAllowedError`` for a refused path and the other ``ImageLoadError`` s of
    ``load_image`` (``RemoteImageNotAllowedError``, ``NotAnImageError``, ``ImageTooLargeError``...).

    Example:
        >>> load_named_image("https://example.com/cat.png", allowed_dirs=[])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        api_tool.errors.RemoteImageNotAllowedError: remote image URLs are disabled: 'https://example.com/cat.png'; ...
    """
    text = reference.strip()
    kind = reference_kind(text)
    if kind in ("url", "data_uri"):
        return load_image(text, allow_remote=allow_remote, max_pixels=max_pixels)
    if kind == "base64":
        try:
            return load_image(f"data:image/png;base64,{text}", max_pixels=max_pixels)
        except ImageLoadError as exc:
            raise NotAnImageError(
                f"{text[:60]!r} holds only base64 characters, so it was read as a base64 image: {exc}"
            ) from exc
    return load_image(allowed_path(text, allowed_dirs, hint=hint), max_pixels=max_pixels)


def reference_kind(reference: str) -> ReferenceKind:
    """How ``load_named_image`` reads ``reference``: as an http(s) ``"url"``, a ``"data_uri"``, a plain
    ``"base64"`` string or a file ``"path"``.

    Example:
        >>> [reference_kind(r) for r in ("https://x.org/a.png", "data:image/png;base64,iVBO", "A" * 40, "a.png")]
        ['url', 'data_uri', 'base64', 'path']
    """
    text = reference.strip()
    if text.startswith(_REMOTE_PREFIXES):
        return "url"
    if _DATA_URI.match(text):
        return "data_uri"
    return "base64" if _BASE64_TEXT.match(text) else "path"


def allowed_path(text: str, allowed_dirs: Sequence[Path], *, hint: str = "") -> Path:
    """The resolved file ``text`` names when it lies inside ``allowed_dirs``, else ``ImagePathNotAllowedError``
    (also for a missing file), its message ending with ``hint``.

    Example:
        >>> allowed_path("file:///etc/passwd", [Path("/etc")], hint="Send it inline.")
        Traceback (most recent call last):
        ...
        api_tool.errors.ImagePathNotAllowedError: file: URIs are not accepted ('file:///etc/passwd'). Send it inline.
    """
    if text[:5].lower() == "file:":
        raise ImagePathNotAllowedError(_with_hint(f"file: URIs are not accepted ({text[:200]!r}).", hint))
    if not allowed_dirs:
        raise ImagePathNotAllowedError(
            _with_hint(f"{text[:200]!r} is a file path, and this tool reads no files named in a tool call.", hint)
        )
    try:
        path = Path(text).expanduser().resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, unknown "~user", a NUL byte
        path = None
    if path is None or not any(path.is_relative_to(directory) for directory in allowed_dirs):
        directories = ", ".join(str(directory) for directory in allowed_dirs)
        raise ImagePathNotAllowedError(
            _with_hint(
                f"{text[:200]!r} is not an existing file inside the directories this tool may read ({directories}).",
                hint,
            )
        )
    return path


def _with_hint(message: str, hint: str) -> str:
    return f"{message} {hint}" if hint else message
