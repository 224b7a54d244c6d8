"""The built-in tiny text-to-image preset: its procedural world, evaluation checker and text encoder."""

from diffblocks.presets.tiny.captions import caption
from diffblocks.presets.tiny.checker import CheckResult, adherence, check, located, relation_holds
from diffblocks.presets.tiny.detect import Detection, detect
from diffblocks.presets.tiny.eval_prompts import EVAL_PROMPTS
from diffblocks.presets.tiny.parse import parse_prompt
from diffblocks.presets.tiny.phrases import vocabulary_text
from diffblocks.presets.tiny.scene import Background, ObjectSpec, PromptSpec, Scene, SceneObject, scene_spec
from diffblocks.presets.tiny.text_encoder import (
    TEXT_MAX_LENGTH,
    PromptFeatures,
    encode_prompts,
    load_text_encoder,
    packaged_text_encoder_dir,
    verify_packaged_weights,
)
from diffblocks.presets.tiny.vocabulary import (
    BACKGROUND_COLOURS,
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
)
from diffblocks.presets.tiny.world import make_batch, render, sample_scene

__all__ = [
    "BACKGROUND_COLOURS",
    "COLOURS",
    "EVAL_PROMPTS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "TEXT_MAX_LENGTH",
    "Background",
    "CheckResult",
    "Detection",
    "ObjectSpec",
    "PromptFeatures",
    "PromptSpec",
    "Scene",
    "SceneObject",
    "adherence",
    "caption",
    "check",
    "detect",
    "encode_prompts",
    "load_text_encoder",
    "located",
    "make_batch",
    "packaged_text_encoder_dir",
    "parse_prompt",
    "relation_holds",
    "render",
    "sample_scene",
    "scene_spec",
    "vocabulary_text",
    "verify_packaged_weights",
]
