"""The one-time notice that a demo model is looking at an image the user brought (issue 14, item 5).

The demo models were trained only on synthetic scenes of coloured shapes on plain or textured
backgrounds; on a photo their maps mean little. A *user image* is anything the user brings: a file
path, a URL, an upload, a data URI, base64 or an image from the conversation. Demo scenes are not:
``"scene:<seed>"`` references and PIL images whose ``info`` holds ``DEMO_SCENE_KEY`` (set it on an
image from ``api_tool.demo.scenes.generate_scene`` to mark it).

Each front door says it once per process: the CLI prints one stderr line, the tool's first result text
carries one sentence, ``create_api_agent`` with the default (demo) tool warns with ``DemoModelWarning``.

Example:
    >>> is_demo_model("demo"), is_user_image("scene:3"), is_user_image("photo.jpg")
    (True, False, True)
"""

from __future__ import annotations

import threading
import warnings

from api_tool.errors import DemoModelWarning

DEMO_SCENE_KEY = "api_demo_scene"
"""``PIL.Image.info`` key that marks a demo scene (its value: the seed)."""
DEMO_MODEL_NAMES = frozenset({"demo", "demo-siglip"})
DEMO_NOTICE = (
    "Note: the demo model was trained only on synthetic scenes of coloured shapes on plain or textured "
    "backgrounds, so its maps mean little on other images; for real images use a real model, e.g. "
    "`api-prompt IMAGE QUESTION --model ViT-L-14-336 --pretrained openai` or "
    'AttentionPromptTool(attributor=ClipAttributor("ViT-L-14-336", pretrained="openai")).'
)

_said: set[str] = set()
_said_lock = threading.Lock()


def is_demo_model(attributor: object) -> bool:
    """Whether ``attributor`` (an Attributor, a registry spec or ``None``, the default) is a demo model.

    Example:
        >>> is_demo_model(None), is_demo_model("clip:ViT-L-14-336@openai"), is_demo_model("lvlm:demo")
        (True, False, True)
    """
    if attributor is None:
        return True
    if isinstance(attributor, str):
        return attributor.split(":", 1)[-1] in DEMO_MODEL_NAMES
    backend = getattr(attributor, "backend", None)  # wrappers (map caches, answer scoring) hold the backend
    if backend is not None and backend is not attributor:
        return is_demo_model(backend)
    return getattr(attributor, "model_name", None) in DEMO_MODEL_NAMES


def is_user_image(image: object) -> bool:
    """Whether ``image`` is one the user brought (not a ``scene:<seed>`` reference nor a marked demo scene).

    Example:
        >>> from PIL import Image
        >>> scene = Image.new("RGB", (8, 8))
        >>> scene.info[DEMO_SCENE_KEY] = 3
        >>> is_user_image(scene), is_user_image(Image.new("RGB", (8, 8)))
        (False, True)
    """
    if isinstance(image, str):
        return not image.strip().startswith("scene:")
    info = getattr(image, "info", None)
    return not (isinstance(info, dict) and DEMO_SCENE_KEY in info)


def first_notice(front_door: str) -> bool:
    """True the first time ``front_door`` (``"cli"``, ``"tool"``, ``"agent"``) asks in this process, then
    False: each front door says the notice once.

    Example:
        >>> reset_notices()
        >>> first_notice("doc"), first_notice("doc")
        (True, False)
    """
    with _said_lock:
        if front_door in _said:
            return False
        _said.add(front_door)
        return True


def warn_demo_model(front_door: str, stacklevel: int = 3) -> bool:
    """Warn once per process and front door with ``DemoModelWarning``; True when it warned.

    Example:
        >>> import warnings
        >>> reset_notices()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_demo_model("doc"), warn_demo_model("doc")
        (True, False)
        >>> len(caught)
        1
    """
    if not first_notice(front_door):
        return False
    warnings.warn(DEMO_NOTICE, DemoModelWarning, stacklevel=stacklevel)
    return True


def reset_notices() -> None:
    """Forget which notices were given (for tests and long-lived servers that want to say it again)."""
    with _said_lock:
        _said.clear()
