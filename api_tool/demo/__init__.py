"""Offline demo models and the synthetic scenes they are trained and measured on.

* ``api_tool.demo.scenes``: seeded scenes of coloured shapes with masks, boxes, captions and questions.
* ``api_tool.demo.clip_model``: the small CLIP shipped with the package (``load_demo_clip``).
* the training scripts live outside the library, in the repository's ``training/`` folder
  (``python -m training.train_clip``, ``python -m training.train_llava``).

Example:
    >>> from api_tool.demo import generate_scene
    >>> generate_scene(0, size=(256, 192)).image.size
    (256, 192)
"""

from api_tool.demo.clip_model import DEMO_CLIP_RECOMMENDED, CompactTokenizer, load_demo_clip
from api_tool.demo.scenes import (
    BACKGROUNDS,
    COLOURS,
    POPE_SPLITS,
    QUESTION_TYPES,
    REFERENCE_KINDS,
    SHAPES,
    SMALL_OBJECT_CONFIG,
    WHOLE_SCENE_TYPES,
    Question,
    Reference,
    Scene,
    SceneConfig,
    SceneObject,
    existence_questions,
    generate_scene,
    make_question,
    reference_query,
    render_layouts,
    sample_layouts,
    scene_questions,
    whole_scene_question,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DEMO_CLIP_RECOMMENDED",
    "POPE_SPLITS",
    "QUESTION_TYPES",
    "REFERENCE_KINDS",
    "SHAPES",
    "SMALL_OBJECT_CONFIG",
    "WHOLE_SCENE_TYPES",
    "CompactTokenizer",
    "Question",
    "Reference",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "existence_questions",
    "generate_scene",
    "load_demo_clip",
    "make_question",
    "reference_query",
    "render_layouts",
    "sample_layouts",
    "scene_questions",
    "whole_scene_question",
]
