"""The per-reference-kind pointing benchmark scores exactly: a map that always peaks on one object hits
exactly the queries whose targets include that object, and the tolerance is a distance to the mask."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from api_tool.demo.scenes import REFERENCE_KINDS, Scene, generate_scene, reference_query
from benchmarks.demo_clip_quality import point_hits_mask, reference_pointing


@dataclass(frozen=True)
class FixedMap:
    values: np.ndarray

    def upsample(self) -> np.ndarray:
        return self.values


class PeakOnFirstObject:
    """An attributor whose every map peaks on one pixel of the scene's first object."""

    def __init__(self, scenes: list[Scene]) -> None:
        self.peaks = {id(scene.image): scene.objects[0].mask for scene in scenes}

    def attribute_many(self, image: object, queries: list[str]) -> list[FixedMap]:
        mask = self.peaks[id(image)]
        rows, cols = np.nonzero(mask)
        values = np.zeros(mask.shape, dtype=np.float32)
        values[rows[len(rows) // 2], cols[len(cols) // 2]] = 1.0
        return [FixedMap(values) for _ in queries]


def test_pointing_per_kind_counts_the_queries_whose_targets_hold_the_peak() -> None:
    scenes = [generate_scene(seed, size=(160, 112), n_objects=2 + seed % 3) for seed in range(6)]
    results = reference_pointing(PeakOnFirstObject(scenes), scenes, "non-square", tolerance=0.0)  # type: ignore[arg-type]
    for result in results:
        hits = []
        for scene in scenes:
            ref = reference_query(scene.objects, result.kind, random.Random(f"{scene.seed}-{result.kind}"), scene.size)
            if ref is not None:
                hits.append(0 in ref.targets)
        assert result.queries == len(hits) and result.pointing == np.mean(hits)
        assert 0.0 < result.baseline < 1.0
    assert [r.kind for r in results] == list(REFERENCE_KINDS)


def test_a_hit_is_a_distance_to_the_mask_not_to_its_box() -> None:
    ring = np.zeros((9, 9), dtype=bool)
    ring[1, 1:8] = ring[7, 1:8] = ring[1:8, 1] = ring[1:8, 7] = True
    assert not point_hits_mask((4, 4), ring, 2.0) and point_hits_mask((4, 4), ring, 3.0)
    assert point_hits_mask((1, 4), ring, 0.0) and not point_hits_mask((0, 0), np.zeros((3, 3), dtype=bool), 5.0)
