"""The model-family table, the LVLM mechanism's geometry (tiles back onto the image) and its front doors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from api_tool.backends.llava import LlavaAttributor
from api_tool.backends.lvlm import LvlmAttributor, single_tile_grid_box, stitch_tiles, tile_grids
from api_tool.backends.lvlm_families.base import Tile
from api_tool.backends.lvlm_families.llava import letterbox_tile_box
from api_tool.backends.registry import get_attributor
from api_tool.cli import main
from api_tool.errors import UnknownModelError, UnsupportedModelError
from api_tool.families import FAMILIES, backend_names, family, lvlm_family_of, table
from api_tool.geometry import Letterbox
from tests.tiny_models import TinyLlava, tiny_llava
from tests.tolerances import assert_sums_close


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory: pytest.TempPathFactory) -> TinyLlava:
    return tiny_llava(tmp_path_factory.mktemp("tiny-llava"), layers=2, seed=1)


def literal_stitch(grids, tiles, image_size, cell):
    """Per canvas cell and tile cell, one at a time: the tile cell's mass times the share of its area
    that lies inside the canvas cell (clipped to the image)."""
    width, height = image_size
    rows, cols = int(np.ceil(height / cell[1] - 1e-9)), int(np.ceil(width / cell[0] - 1e-9))
    canvas = np.zeros((rows, cols))
    for r in range(rows):
        for c in range(cols):
            cx0, cx1 = c * cell[0], min((c + 1) * cell[0], width)
            cy0, cy1 = r * cell[1], min((r + 1) * cell[1], height)
            for values, tile in zip(grids, tiles):
                x0, y0, x1, y1 = tile.box
                tile_rows, tile_cols = tile.grid
                tw, th = (x1 - x0) / tile_cols, (y1 - y0) / tile_rows
                for tr in range(tile_rows):
                    for tc in range(tile_cols):
                        ox = max(0.0, min(cx1, x0 + (tc + 1) * tw) - max(cx0, x0 + tc * tw))
                        oy = max(0.0, min(cy1, y0 + (tr + 1) * th) - max(cy0, y0 + tr * th))
                        canvas[r, c] += values[tr, tc] * ox * oy / (tw * th)
    return canvas


def test_stitching_equals_the_literal_per_cell_sum_and_keeps_the_mass() -> None:
    rng = np.random.default_rng(0)
    base = Tile(torch.arange(4), (2, 2), (0.0, 0.0, 120.0, 80.0))  # a base view of the whole image
    left = Tile(torch.arange(16), (4, 4), (0.0, 0.0, 60.0, 80.0))  # two high-resolution halves
    right = Tile(torch.arange(16), (4, 4), (60.0, 0.0, 120.0, 80.0))
    attention = rng.random(36)
    attention /= attention.sum()
    grids = tile_grids(attention, [base, left, right])
    canvas, grid_box = stitch_tiles(grids, [base, left, right], (120, 80))
    assert canvas.shape == (4, 8) and grid_box == (0.0, 0.0, 8.0, 4.0)
    np.testing.assert_allclose(canvas, literal_stitch(grids, [base, left, right], (120, 80), (15.0, 20.0)))
    assert canvas.sum() == pytest.approx(1.0)  # every tile lies inside the image: all attention is kept


def test_stitching_drops_what_lies_outside_the_image() -> None:
    padded = Tile(torch.arange(4), (2, 2), (0.0, -40.0, 80.0, 120.0))  # letterboxed: half of each row outside
    finer = Tile(torch.arange(4), (2, 2), (0.0, 0.0, 40.0, 40.0))  # a detail tile in the top-left corner
    canvas, grid_box = stitch_tiles([np.full((2, 2), 0.125), np.full((2, 2), 0.125)], [padded, finer], (80, 80))
    assert canvas.shape == (4, 4) and grid_box == (0.0, 0.0, 4.0, 4.0)
    np.testing.assert_allclose(
        canvas, literal_stitch([np.full((2, 2), 0.125)] * 2, [padded, finer], (80, 80), (20, 20))
    )
    assert canvas.sum() == pytest.approx(0.25 + 0.5)  # half of the padded tile's attention lies off the image
    assert canvas[0, 0] == pytest.approx(0.125 * (20 * 20) / (40 * 80) + 0.125)  # 1/8 of the padded cell


def test_a_letterboxed_tile_gives_the_letterbox_grid_box() -> None:
    for size in [(400, 200), (200, 400), (333, 333), (50, 7)]:
        letterbox = Letterbox.fit(size, side=64)
        tile = Tile(torch.arange(64), (8, 8), letterbox_tile_box(letterbox))
        np.testing.assert_allclose(single_tile_grid_box(tile, size), letterbox.grid_box((8, 8)), atol=1e-9)


def test_table_recognises_families_and_refuses_others() -> None:
    assert family("llava").backend == "lvlm" and family("clip").backend == "clip"
    assert "lvlm" in backend_names() and "llava" in backend_names()
    with pytest.raises(UnknownModelError, match="no model family 'nope'"):
        family("nope")
    from types import SimpleNamespace

    assert lvlm_family_of(SimpleNamespace(model_type="llava")).name == "llava"
    with pytest.raises(UnsupportedModelError, match="model_type 'bert'"):
        lvlm_family_of(SimpleNamespace(model_type="bert", architectures=["BertModel"]))
    printed = table()
    for entry in FAMILIES:
        assert f"{entry.name}  [{entry.backend}]" in printed and entry.verified in printed


def test_lvlm_spec_and_llava_spec_give_the_same_map(saved_llava: TinyLlava) -> None:
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    lvlm = get_attributor(f"lvlm:{saved_llava.directory}", device="cpu", layer=1, max_new_tokens=3)
    llava = get_attributor(f"llava:{saved_llava.directory}", device="cpu", layer=1, max_new_tokens=3)
    assert isinstance(lvlm, LvlmAttributor) and type(llava) is LlavaAttributor
    got, want = lvlm.attribute(image, "what is it?"), llava.attribute(image, "what is it?")
    assert got.metadata["family"] == "llava" and got.metadata["answer"] == want.metadata["answer"]
    assert_sums_close(got.raw, want.raw, n_terms=2048)
    assert got.metadata["tiles"] == [{"grid": [8, 8], "box": list(letterbox_tile_box(Letterbox.fit((50, 30), 64)))}]


def test_cli_backend_lvlm_and_models(saved_llava: TinyLlava, tmp_path: Path, capsys) -> None:
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(image)
    argv = [str(image), "what is it?", "-o", str(tmp_path / "o.png"), "--backend", "lvlm", "--device", "cpu"]
    assert main([*argv, "--model", str(saved_llava.directory), "--layer", "1", "--json"]) == 0
    assert '"answer"' in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "llava  [lvlm]" in capsys.readouterr().out


def test_the_library_imports_nothing_from_agents() -> None:
    script = (
        "import pkgutil, importlib, sys, api_tool\n"
        "for module in pkgutil.walk_packages(api_tool.__path__, 'api_tool.'):\n"
        "    importlib.import_module(module.name)\n"
        "print(sorted(name for name in sys.modules if name == 'agents' or name.startswith('agents.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr


def test_a_chat_model_and_attributors_share_one_copy_of_the_weights(saved_llava: TinyLlava) -> None:
    from agents.chat_models import ChatTransformersVLM
    from api_tool.backends import registry

    registry.clear_cache()
    chat = ChatTransformersVLM.from_pretrained(str(saved_llava.directory), device="cpu")
    lvlm = get_attributor(f"lvlm:{saved_llava.directory}", device="cpu", layer=1)
    llava = get_attributor(f"llava:{saved_llava.directory}", device="cpu", layer=0)
    assert lvlm.model is chat.hf_model and llava.model is chat.hf_model  # type: ignore[attr-defined]
    assert registry.shared_model(f"lvlm:{saved_llava.directory}", device="cpu")[0] is chat.hf_model
    registry.clear_cache()
