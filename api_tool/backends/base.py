"""The contract every attribution backend fulfils."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from api_tool.images import ImageRef
from api_tool.maps import AttributionMap


@runtime_checkable
class Attributor(Protocol):
    """Scores how much each image region matters for a text query.

    ``attribute_batch`` pairs ``images[i]`` with ``queries[i]`` and runs them as one batch;
    ``attribute_many`` asks several questions about one image and pays for the image once.
    """

    name: str

    def attribute(self, image: ImageRef, query: str) -> AttributionMap:
        """The map for one image and one query."""
        ...

    def attribute_batch(self, images: Sequence[ImageRef], queries: Sequence[str]) -> list[AttributionMap]:
        """One map per ``(images[i], queries[i])`` pair."""
        ...

    def attribute_many(self, image: ImageRef, queries: Sequence[str]) -> list[AttributionMap]:
        """One map per query, all on the same image."""
        ...
