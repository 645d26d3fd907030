"""What an evaluation run asks: the modes and :class:`EvalOptions` (batching, drawing, reports).

Shared by the runner (``agents.eval_runner``), the Ray engine and the reports (``agents.eval_reports``).

Example:
    >>> run_modes(["verify", "api"])
    ('plain', 'api', 'verify')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agents.prompts import STRATEGIES
from api_tool.errors import InvalidParameterError
from api_tool.render import STYLES, Style

MODES: tuple[str, ...] = ("plain", "api", "verify", "masked", "masked_hint", "zoom", "iterative")
REFLECTION_MODES: tuple[str, ...] = tuple(STRATEGIES)
ANNOTATING_MODES: frozenset[str] = frozenset(
    {"api", *(name for name, strategy in STRATEGIES.items() if strategy.uses_annotation)}
)


@dataclass(frozen=True)
class EvalOptions:
    """How the modes are run.

    Attributes:
        modes: which modes, in run order (``plain`` first when reflection needs it).
        style, gray_level: how the attention-prompted image is drawn (``api_tool.render``).
        system_prompt: a system message sent with every call to the target.
        rounds: most reflection rounds.
        batch_size: questions per chunk (target batch, map batch).
        concurrency: most target calls at once (``None``: the batch size, or 1 for a local
            transformers target).
        progress: show a progress bar with ETA on stderr.
        gallery_limit: most questions in the HTML gallery.
        thumb_side: longest side of gallery thumbnails, in pixels.
    """

    modes: tuple[str, ...] = ("plain", "api")
    style: Style = "gray"
    gray_level: int = 0
    system_prompt: str | None = None
    rounds: int = 1
    batch_size: int = 8
    concurrency: int | None = None
    progress: bool = True
    gallery_limit: int = 50
    thumb_side: int = 160

    def __post_init__(self) -> None:
        unknown = [mode for mode in self.modes if mode not in MODES]
        if unknown or not self.modes:
            raise InvalidParameterError(f"unknown or no modes {unknown or list(self.modes)}; choose from {MODES}")
        if self.style not in STYLES:
            raise InvalidParameterError(f"style must be one of {STYLES}, got {self.style!r}")
        if not 0 <= self.gray_level <= 255:
            raise InvalidParameterError(f"gray_level must be in 0..255, got {self.gray_level}")
        for name in ("rounds", "batch_size", "gallery_limit", "thumb_side"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.concurrency is not None and self.concurrency < 1:
            raise InvalidParameterError(f"concurrency must be at least 1, got {self.concurrency}")


def run_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """The modes in run order, without repeats, with ``plain`` first when a reflection mode needs it.

    Example:
        >>> run_modes(["verify", "api", "verify"])
        ('plain', 'api', 'verify')
    """
    chosen = list(dict.fromkeys(modes))
    if any(mode in REFLECTION_MODES for mode in chosen) and "plain" not in chosen:
        chosen.insert(0, "plain")
    return tuple(sorted(chosen, key=MODES.index))
