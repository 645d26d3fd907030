"""CUDA graphs for the image pass at small batches, where launching ~500 kernels costs more than running them.

``GraphedPass`` wraps a function of one CUDA tensor (the letterboxed uint8 batch; the function runs the
tower and the Psi decomposition) and, per input shape up to ``max_batch`` images, captures it once into a
``torch.cuda.CUDAGraph`` after two eager warm-up calls (torch's recipe: warm-up on a side stream). Later
calls copy the input into the captured buffer and replay the graph: the same kernels on the same
shapes, so the outputs equal the eager ones within float rounding, for a fraction of the CPU time.

The outputs of a replay live in the graph's own buffers and are overwritten by the next replay: the
caller reads them before calling again (``ClipAttributor`` does so under its forward lock). Anything else
runs eagerly: CPU and MPS tensors, batches above ``max_batch``, every call with ``enabled`` False, and
the shapes whose capture failed (the last failure is kept in ``failure``; each is warned about once).
At most ``max_graphs`` shapes are kept; each holds its activations' memory (about 70 MiB for
ViT-L-14-336 fp16 at batch 1).

Example:
    >>> import torch
    >>> doubled = GraphedPass(lambda x: x * 2, max_batch=4)
    >>> doubled(torch.ones(2)).tolist()  # on the CPU: eager
    [2.0, 2.0]
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

__all__ = ["GraphedPass"]

Output = TypeVar("Output")


@dataclass
class _Captured(Generic[Output]):
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: Output


class GraphedPass(Generic[Output]):
    """``function(pixels)`` replayed from a CUDA graph per input shape (see the module docstring)."""

    def __init__(self, function: Callable[[torch.Tensor], Output], max_batch: int = 8, max_graphs: int = 4) -> None:
        self.function = function
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self.enabled = True
        self.failure: str | None = None
        self._graphs: OrderedDict[tuple[int, ...], _Captured[Output]] = OrderedDict()
        self._failed: set[tuple[int, ...]] = set()

    def __call__(self, pixels: torch.Tensor) -> Output:
        key = tuple(pixels.shape)
        if not self.enabled or pixels.device.type != "cuda" or pixels.shape[0] > self.max_batch or key in self._failed:
            return self.function(pixels)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(pixels)
            except RuntimeError as exc:
                self._failed.add(key)
                self.failure = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"CUDA graph capture failed for {key}, running it eagerly: {self.failure}", stacklevel=2)
                return self.function(pixels)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        captured.static_input.copy_(pixels)
        captured.graph.replay()
        return captured.static_output

    def _capture(self, pixels: torch.Tensor) -> _Captured[Output]:
        static_input = pixels.clone()
        side_stream = torch.cuda.Stream(device=pixels.device)
        side_stream.wait_stream(torch.cuda.current_stream(pixels.device))
        with torch.cuda.stream(side_stream):
            for _ in range(2):
                self.function(static_input)
        torch.cuda.current_stream(pixels.device).wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (a target LVLM answering) does not break this capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_output = self.function(static_input)
        return _Captured(graph, static_input, static_output)
