"""Looking at pipelines: repr tree, generated docs, JSON Schema, Mermaid."""

from __future__ import annotations

import json

from diffblocks.blocks import Pipeline, block_doc
from tests.core.test_plan import COMPONENTS, img2img_switch
from tests.core.toy import PrepareLatents


def test_repr_is_a_readable_tree() -> None:
    text = repr(Pipeline(img2img_switch(), COMPONENTS))
    assert text.splitlines()[0] == "Pipeline 'toy' (workflows: img2img, text2img)"
    assert "  start: Switch" in text
    assert "[img2img] (when image given)" in text
    assert "predict: Predict(latents, t) -> (noise_pred) [denoiser]" in text


def test_block_doc_lists_fields_and_components() -> None:
    doc = block_doc(PrepareLatents)
    assert doc.startswith("### PrepareLatents\n\nSeeded latents of the requested size.")
    assert "| `height` | int | 16 |" in doc
    assert "| `latents` | float Tensor[batch channels height width] | required |" in doc
    assert "| `decoder` | Decoder | False | used for its scale factor |" in doc


def test_pipeline_doc_has_every_workflow() -> None:
    doc = Pipeline(img2img_switch(), COMPONENTS).doc()
    assert "## Workflow `img2img`" in doc and "## Workflow `text2img`" in doc
    assert "| `strength` | float | 0.5 | start.img2img.encode_image |" in doc


def test_json_schemas_are_json() -> None:
    pipe = Pipeline(img2img_switch(), COMPONENTS)
    schema = pipe.input_schema("img2img")
    json.dumps(schema)
    assert schema["required"] == ["image"]
    assert schema["properties"]["image"]["x-axes"] == ["batch", "channels", "height", "width"]
    assert schema["properties"]["strength"]["maximum"] == 1.0
    out = pipe.output_schema("text2img")
    assert {"images", "latents", "timesteps"} <= set(out["properties"])


def test_mermaid_graph_shows_data_flow_and_loop() -> None:
    graph = Pipeline(img2img_switch(), COMPONENTS).mermaid("img2img")
    assert graph.startswith("flowchart TD")
    assert 'subgraph denoise["denoise: for t in timesteps"]' in graph
    assert "denoise_predict -->|noise_pred| denoise_update" in graph
    assert "in_image -->|image| start_img2img_encode_image" in graph
