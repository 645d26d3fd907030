"""Every prompt text the agents package sends, in one place, with when to use each.

Also here: :data:`AGENT_SYSTEM_PROMPT` (when an agent should call the tool) and
:data:`TOOL_CALLING_TEMPLATE` (how a local model without native tool calling is taught to call tools).

Reflection strategies (placeholders ``{question}`` and ``{answer}``, the previous answer):

* ``verify`` (default): the original image, the annotated image and the first answer; the model
  confirms or corrects and ends with ``FINAL: <answer>``. Use it with capable instruction-following
  models. Both images are shown because masking the background can itself create hallucinations
  (context matters for "is there a ...?" questions).
* ``masked``: the paper's plain API, the question asked again on the annotated image alone. Use it to
  reproduce the paper or with models that take one image only.
* ``masked_hint``: as ``masked`` plus "the answer is related to the unmasked visible regions"
  (the authors' hint variant). Use it with single-image models that ignore a darkened background.
* ``zoom`` (ViCrop-style): the original image and a crop of the attended region resized to the
  target's input, then the question. Use it for small details in large images: the target sees the
  downscaled whole and the detail at full resolution.
* ``iterative``: the original image and the previous answer, no annotation: a text-only re-ask (the
  paper's baseline). Use it as the control that tells whether the annotation, not the second look,
  changed the answer.

Example:
    >>> STRATEGIES["masked_hint"].render(question="What colour is the ball?", answer="red")
    'What colour is the ball? (Hint: The answer is related to the unmasked visible regions.)'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from api_tool.errors import InvalidParameterError

StrategyName = Literal["verify", "masked", "masked_hint", "zoom", "iterative"]
ImageRole = Literal["original", "annotated", "crop"]

IMAGE_LABELS: dict[ImageRole, str] = {
    "original": "Original image:",
    "annotated": (
        "The same image with the regions most relevant to the question kept and the rest darkened "
        "(an automatic estimate, which can be wrong):"
    ),
    "crop": "A zoomed-in view of the region most relevant to the question (an automatic estimate, which can be wrong):",
}

VERIFY_TEMPLATE = """Question: {question}
Your first answer was: {answer}

Look at both images again and check that answer against what you see, especially in the highlighted \
regions. If it is right, keep it; if it is wrong or incomplete, correct it.
End your reply with one line of the form:
FINAL: <your answer>"""

MASKED_TEMPLATE = "{question}"

ZOOM_TEMPLATE = "{question}"

MASKED_HINT_TEMPLATE = "{question} (Hint: The answer is related to the unmasked visible regions.)"

ITERATIVE_TEMPLATE = (
    "{question} \n Your previous answer is {answer}. Evaluate the quality of the answer and provide a new answer."
)

AGENT_SYSTEM_PROMPT = """You are a careful visual assistant.
You have a tool, `attention_prompt`, that returns the user's image with the regions relevant to a \
question kept and the rest darkened. Call it when a question depends on a small or specific part of \
the image (a detail, a count, a colour, whether something is present, text in a corner), when the \
image is cluttered, or when you are unsure of your first reading. Pass the user's question as \
`question`; leave `image` out to use the user's most recent image. Do not call it for questions about \
the whole scene or for text-only questions.
The annotated image is an automatic estimate: use it to look again at the right place, but trust the \
original image when the two disagree. If the tool reports an error, follow its advice or answer \
without it."""

TOOL_CALLING_TEMPLATE = """You can call these tools:
{tools}
To call a tool, reply with only one JSON object on one line, and nothing else:
{{"tool": "<tool name>", "arguments": {{<arguments as JSON>}}}}
The tool's result will come back in the next message. If no tool is needed, answer directly."""

_FINAL_LINE = re.compile(
    r"^[\s*_#>-]*final(?:\s+answer)?[\s*_]*[:：]\s*(?P<answer>.+?)\s*$", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True)
class ReflectionStrategy:
    """How the target is re-asked.

    Attributes:
        name: the strategy's name.
        template: the text, with ``{question}`` and ``{answer}`` placeholders.
        images: which images go before the text, in order.
        needs_final_line: the reply must end with ``FINAL: <answer>``; otherwise the whole reply is the
            new answer.
        when_to_use: one line for documentation and traces.
    """

    name: StrategyName
    template: str
    images: tuple[ImageRole, ...]
    needs_final_line: bool
    when_to_use: str

    @property
    def uses_annotation(self) -> bool:
        """Whether the strategy shows the tool's output, the annotated image or the crop (if not, the loop
        skips the tool)."""
        return "annotated" in self.images or "crop" in self.images

    def render(self, *, question: str, answer: str) -> str:
        """The re-ask text."""
        return self.template.format(question=question, answer=answer)


STRATEGIES: dict[str, ReflectionStrategy] = {
    "verify": ReflectionStrategy(
        name="verify",
        template=VERIFY_TEMPLATE,
        images=("original", "annotated"),
        needs_final_line=True,
        when_to_use="capable models; keeps the background, so the annotation cannot hide context",
    ),
    "masked": ReflectionStrategy(
        name="masked",
        template=MASKED_TEMPLATE,
        images=("annotated",),
        needs_final_line=False,
        when_to_use="the paper's plain API; single-image models",
    ),
    "masked_hint": ReflectionStrategy(
        name="masked_hint",
        template=MASKED_HINT_TEMPLATE,
        images=("annotated",),
        needs_final_line=False,
        when_to_use="single-image models that should focus on the visible regions",
    ),
    "zoom": ReflectionStrategy(
        name="zoom",
        template=ZOOM_TEMPLATE,
        images=("original", "crop"),
        needs_final_line=False,
        when_to_use="small details in large images: the original plus the attended region at full resolution",
    ),
    "iterative": ReflectionStrategy(
        name="iterative",
        template=ITERATIVE_TEMPLATE,
        images=("original",),
        needs_final_line=False,
        when_to_use="control: a second look without the annotation (the paper's baseline)",
    ),
}


def get_strategy(name: str) -> ReflectionStrategy:
    """The strategy called ``name``, or ``InvalidParameterError`` listing the known ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InvalidParameterError(
            f"unknown reflection strategy {name!r}; choose one of {tuple(STRATEGIES)}"
        ) from None


def parse_final_answer(reply: str) -> str | None:
    """The answer on the last ``FINAL: ...`` line of ``reply`` (markdown and quotes removed), or ``None``.

    Example:
        >>> parse_final_answer("The ball looks red.\\n**FINAL:** red")
        'red'
        >>> parse_final_answer("no marker here") is None
        True
    """
    matches = list(_FINAL_LINE.finditer(reply))
    if not matches:
        return None
    answer = matches[-1].group("answer").strip().strip("*_`\"'").strip()
    return answer or None
