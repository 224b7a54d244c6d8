"""Looking at blocks and pipelines: a tree, generated docs, JSON Schema and Mermaid graphs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, create_model
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticOmit, core_schema

from diffblocks.blocks.block import AbstractBlock, Block, field_type
from diffblocks.blocks.compat import describe_type
from diffblocks.blocks.plan import LoopStep, Plan, Step
from diffblocks.blocks.tree import render, walk


class _SchemaGenerator(GenerateJsonSchema):
    """JSON Schema that describes Python-only values (tensors, images, generators) instead of failing."""

    def is_instance_schema(self, schema: core_schema.IsInstanceSchema) -> JsonSchemaValue:
        cls = schema["cls"]
        return {"type": "object", "format": f"{cls.__module__}.{cls.__qualname__}"}

    def callable_schema(self, schema: core_schema.CallableSchema) -> JsonSchemaValue:
        raise PydanticOmit

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        try:
            return super().default_schema(schema)
        except Exception:  # defaults that are not JSON (tensors, objects) are left out, not fatal
            return self.generate_inner(schema["schema"])


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """JSON Schema of a pydantic model whose fields may hold tensors or other Python objects."""
    return model.model_json_schema(schema_generator=_SchemaGenerator)


def outputs_schema(plan: Plan) -> dict[str, Any]:
    fields = {name: (tp, ...) for name, (tp, _) in plan.produced.items()}
    model = create_model(f"{plan.workflow.capitalize()}Outputs", __config__={"arbitrary_types_allowed": True}, **fields)
    return json_schema(model)


def render_tree(block: AbstractBlock, indent: str = "") -> str:
    """A readable tree of a block and its children with their inputs and outputs."""
    return render(block, indent)


def block_doc(block: type[Block] | Block) -> str:
    """Markdown reference of one block: summary, inputs, outputs, components."""
    cls = block if isinstance(block, type) else type(block)
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    lines = [f"### {cls.__name__}", "", summary, ""] if summary else [f"### {cls.__name__}", ""]
    lines += _field_table("Inputs", cls.input_fields())
    lines += _field_table("Outputs", cls.output_fields())
    components = cls.components()
    if components:
        lines += ["**Components**", "", "| name | type | optional | description |", "|---|---|---|---|"]
        for name, decl in components.items():
            lines.append(f"| `{name}` | {describe_type(decl.annotation())} | {decl.optional} | {decl.description} |")
        lines.append("")
    return "\n".join(lines)


def _field_table(title: str, fields: dict[str, Any]) -> list[str]:
    if not fields:
        return []
    rows = [f"**{title}**", "", "| name | type | default | description |", "|---|---|---|---|"]
    for name, info in fields.items():
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=False))
        rows.append(f"| `{name}` | {describe_type(field_type(info))} | {default} | {info.description or ''} |")
    return [*rows, ""]


def pipeline_doc(name: str, plans: Sequence[Plan]) -> str:
    """Markdown reference of a pipeline from its plans: workflows, their inputs, and every block."""
    lines = [f"# {name}", "", f"Workflows: {', '.join(plan.workflow for plan in plans)}", ""]
    for plan in plans:
        lines += [f"## Workflow `{plan.workflow}`", "", "| input | type | default | used by |", "|---|---|---|---|"]
        for name, user in plan.user_inputs.items():
            default = "required" if user.required else repr(user.info.get_default(call_default_factory=False))
            lines.append(f"| `{name}` | {describe_type(user.annotation)} | {default} | {', '.join(user.consumers)} |")
        lines.append("")
    lines += ["## Blocks", ""]
    seen: set[type] = set()
    for plan in plans:
        for _, block in plan.blocks:
            if type(block) not in seen:
                seen.add(type(block))
                lines.append(block_doc(block))
    return "\n".join(lines)


def mermaid(plan: Plan) -> str:
    """A Mermaid flowchart: user inputs -> blocks -> values, with loops as subgraphs."""
    lines = ["flowchart TD"]
    producers: dict[str, str] = {}
    for name in plan.user_inputs:
        lines.append(f'    in_{_id(name)}(["{name}"])')
        producers[name] = f"in_{_id(name)}"
    _mermaid_steps(plan.steps, lines, producers, "    ")
    return "\n".join(lines)


def _mermaid_steps(steps: tuple[Step | LoopStep, ...], lines: list[str], producers: dict[str, str], pad: str) -> None:
    for step in steps:
        node = _id(step.path)
        if isinstance(step, LoopStep):
            loop = step.loop
            lines.append(f'{pad}subgraph {node}["{step.path}: for {loop.item} in {loop.over}"]')
            for name in (loop.item, loop.index, loop.count):
                producers[name] = node
            _mermaid_steps(step.body, lines, producers, pad + "    ")
            lines.append(f"{pad}end")
            continue
        lines.append(f'{pad}{node}["{step.path}"]')
        for name in step.inputs:
            source = producers.get(name)
            if source is not None and source != node:
                lines.append(f"{pad}{source} -->|{name}| {node}")
        for name in step.output_cls.model_fields:
            producers[name] = node


def _id(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def component_names(block: AbstractBlock) -> set[str]:
    """Names of every component the leaves of a block tree declare (all workflows)."""
    return {name for node in walk(block) if isinstance(node.block, Block) for name in node.block.components()}
