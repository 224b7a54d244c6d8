"""A checked pipeline: blocks + components, compiled once, called many times."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffblocks.blocks.block import AbstractBlock
from diffblocks.blocks.build import Build, compile_build
from diffblocks.blocks.errors import FieldError, InputError, PlanError, Problem
from diffblocks.blocks.executor import Callback, RunContext, add_location_note, cuda_sync, run_steps
from diffblocks.blocks.formats import PresetInfo, pipeline_format
from diffblocks.blocks.ip_adapter import AbstractIPAdapterMethods
from diffblocks.blocks.lora import AbstractLoRAMethods
from diffblocks.blocks.textual_inversion import AbstractTextualInversionMethods
from diffblocks.blocks.introspect import json_schema, mermaid, outputs_schema, pipeline_doc, render_tree
from diffblocks.blocks.output import PipelineOutput
from diffblocks.blocks.plan import Plan
from diffblocks.blocks.quantizing import Quantization, replacements
from diffblocks.blocks.tree import inserted, removed, replaced
from diffblocks.blocks.validation import check_blocks, validate_inputs
from diffblocks.components.manager import ComponentsManager
from diffblocks.components.models.compile import DENOISER_NAMES, compile_model
from diffblocks.components.quantizers.base import quantizer_of
from diffblocks.components.quantizers.memory import ComponentMemory, component_memory

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


class Pipeline(AbstractLoRAMethods, AbstractTextualInversionMethods, AbstractIPAdapterMethods):
    """Blocks bound to components, with the data flow checked once at construction.

    Args:
        blocks: the root block (usually a :class:`Sequence`). The pipeline keeps its own copy of the tree.
        components: components by name: loaded objects or :class:`ComponentSpec` (loaded lazily).
        manager: a :class:`ComponentsManager` to share loaded components with other pipelines.
        name: a label for tables and errors.
        preset: the preset family and settings the blocks come from (recorded by ``from_pretrained``;
            used by :meth:`save_pretrained`).
        user_inputs: inputs that blocks declare with ``produced()`` but that callers will pass
            instead (e.g. ``("conditioning",)`` for a pipeline built without a prompt encoder).

    Raises:
        PlanError: every problem found (missing or mistyped inputs and components, wrong order), at once.
    """

    def __init__(
        self,
        blocks: AbstractBlock,
        components: Mapping[str, Any] | None = None,
        *,
        manager: ComponentsManager | None = None,
        name: str | None = None,
        preset: PresetInfo | None = None,
        user_inputs: Iterable[str] = (),
    ) -> None:
        self.name = name or blocks.name
        self.preset = preset
        self.user_inputs = tuple(user_inputs)
        self.manager = manager if manager is not None else ComponentsManager()
        self._binding = threading.Lock()
        self._running: list[Build] = []  # versions that calls are running now
        self._retired: set[str] = set()  # keys replaced while a call still runs them: released after it
        self._originals: dict[str, Any] = {}  # float components given as objects, kept while a quantized copy is used
        keys = {name: self.manager.add(name, value, user=self.name) for name, value in (components or {}).items()}
        self._build = self._compile(blocks, keys)

    @classmethod
    def from_pretrained(cls, path_or_repo: str, **kwargs: Any) -> Pipeline:
        """A ready pipeline for a repository in diffusers layout (see :func:`diffblocks.presets.from_pretrained`)."""
        return pipeline_format().load(path_or_repo, **kwargs)

    @classmethod
    def from_single_file(
        cls, path_or_hub_file: str | os.PathLike[str], config: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> Pipeline:
        """A ready pipeline from a single-file checkpoint (see :func:`diffblocks.presets.single_file.from_single_file`)."""
        return pipeline_format().load_single_file(path_or_hub_file, config, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike[str], **options: Any) -> Path:
        """Save components, guider and settings to a folder that :meth:`from_pretrained` (and diffusers) reads.

        See :func:`diffblocks.presets.saving.save_pretrained` for the options and rules.
        """
        return pipeline_format().save(self, folder, **options)

    def push_to_hub(self, repo_id: str, **options: Any) -> CommitInfo:
        """Save to a temporary folder and upload it as one commit (see :func:`diffblocks.presets.publishing.push_to_hub`).

        Returns huggingface_hub's ``CommitInfo``.
        """
        return pipeline_format().push(self, repo_id, **options)

    def compile(self, *, regional: bool = True, component: str | None = None, **compile_kwargs: Any) -> Pipeline:
        """Compile the denoiser with ``torch.compile``, in place; by default only the blocks it repeats.

        Regional compilation (the UNet's ResNets and spatial transformers, Flux's double and single
        blocks) compiles in a fraction of the time of the whole model; see
        :func:`~diffblocks.components.models.compile.compile_model` and ``docs/benchmarks.md``. The model
        keeps its class and files, and every pipeline sharing it runs it compiled. The first call
        compiles; later calls of the same shapes reuse the compiled code.

        Args:
            regional: False compiles the whole model as one graph.
            component: the component to compile (default: ``"unet"`` or ``"transformer"``, whichever the
                pipeline has).
            **compile_kwargs: passed to ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ``fullgraph``, ...).
        """
        name = component or next((n for n in DENOISER_NAMES if n in self._build.keys), None)
        if name is None or name not in self._build.keys:
            wanted = repr(component) if component else " or ".join(map(repr, DENOISER_NAMES))
            raise KeyError(f"pipeline {self.name!r} has no component {wanted}; components: {sorted(self._build.keys)}")
        compile_model(self.manager.get(self._build.keys[name]), regional=regional, **compile_kwargs)
        return self

    # --- building -------------------------------------------------------------------------------------------

    def _compile(self, blocks: AbstractBlock, keys: Mapping[str, str]) -> Build:
        """A new version of this pipeline: ``blocks`` compiled with the components ``keys`` name; see :func:`compile_build`."""
        return compile_build(blocks, keys, manager=self.manager, user_inputs=self.user_inputs, name=self.name)

    # --- calling --------------------------------------------------------------------------------------------

    def __call__(
        self,
        *,
        callbacks: Iterable[Callback] = (),
        progress: bool = True,
        timings: bool = False,
        grad: bool = False,
        **inputs: Any,
    ) -> PipelineOutput:
        """Validate ``inputs`` once, pick the workflow, and run it.

        Args:
            callbacks: functions called after each loop iteration with a :class:`StepInfo`; they may return
                state replacements or call ``info.interrupt()``.
            progress: show a progress bar over loops.
            timings: record seconds per block in ``output.timings``.
            grad: run with autograd on (default: ``torch.inference_mode``).
            **inputs: the pipeline's inputs (see :meth:`input_schema`).
        """
        build = self._build  # this call's version, whatever update_components does meanwhile
        plan = build.select(frozenset(k for k, v in inputs.items() if v is not None))
        context = f"call to {self.name!r} (workflow {plan.workflow!r})"
        state = validate_inputs(plan, inputs, known=build.input_names, context=context)
        run = RunContext(tuple(callbacks), progress, {} if timings else None, sync=cuda_sync() if timings else None,
                         relieve=self.manager.relieve_memory)
        self._acquire(build)
        try:
            check_blocks(plan, state, context=context)
            with torch.enable_grad() if grad else _no_grad(build.bound):
                run_steps(plan.steps, state, run)
        except FieldError as err:
            # a block refused a value only known at run time (e.g. one an earlier block resolved)
            raise InputError([Problem(run.current, err.field, str(err))], context=context) from err
        except Exception as err:
            add_location_note(err, run, plan.workflow)
            raise
        finally:
            self._release(build)
        return PipelineOutput(state, workflow=plan.workflow, timings=run.timings, interrupted=run.interrupted)

    def check(self, **inputs: Any) -> str:
        """Validate ``inputs`` as a call would, without running a block; returns the workflow they pick.

        Raises the call's :class:`InputError` (unknown or mistyped inputs, every block's ``check``), so a
        server or a batch can refuse a request before it queues behind others. Values known only at run
        time are still refused by the run itself.
        """
        build = self._build
        plan = build.select(frozenset(k for k, v in inputs.items() if v is not None))
        context = f"call to {self.name!r} (workflow {plan.workflow!r})"
        state = validate_inputs(plan, inputs, known=build.input_names, context=context)
        self._acquire(build)  # checks read the components (the VAE's factor, the denoiser's size)
        try:
            check_blocks(plan, state, context=context)
        finally:
            self._release(build)
        return plan.workflow

    def _acquire(self, build: Build) -> None:
        """Bind the components (loading lazy ones) for a call; concurrent calls of one version share one binding."""
        with self._binding:
            if build.callers == 0:
                try:
                    for name, key in build.keys.items():
                        build.bound[name] = self.manager.get(key)
                except BaseException:
                    build.bound.clear()
                    raise
                self._running.append(build)
            build.callers += 1

    def _release(self, build: Build) -> None:
        with self._binding:
            build.callers -= 1
            if build.callers:
                return
            build.bound.clear()  # the manager, not the pipeline, keeps components alive between calls
            self._running.remove(build)
            waiting = bool(self._retired)
        if waiting:  # components replaced under this call: free now, unless another call still runs them
            self._retire(())

    def _retire(self, keys: Iterable[str]) -> None:
        """Release ``keys`` (replaced by a newer version) and those retired before, once no version a call runs uses them.

        A released model leaves the manager's placement (its hooks removed, its weights home), which
        must not happen under a call still running it; a key the current version uses again stays.
        """
        with self._binding:
            self._retired.update(keys)
            self._retired -= set(self._build.keys.values())
            used = {key for build in self._running for key in build.keys.values()}
            free, self._retired = self._retired - used, self._retired & used
        for key in free:
            self.manager.release(key, user=self.name)

    # --- changing -------------------------------------------------------------------------------------------

    def update_components(self, **components: Any) -> Pipeline:
        """Swap components by name (objects or specs); the plan is re-checked and nothing changes if it fails."""
        current = self._build.keys
        keys = dict(current)
        added = []
        for name, value in components.items():
            keys[name] = self.manager.add(name, value, user=self.name)
            if keys[name] not in current.values():  # one given again is not dropped if the plan fails
                added.append(keys[name])
        try:
            build = self._compile(self._build.root, keys)
        except PlanError:
            for key in added:
                self.manager.release(key, user=self.name)
            raise
        self._build = build
        self._retire(current[name] for name in components if name in current and current[name] != keys[name])
        return self

    def _change(self, root: AbstractBlock, components: Mapping[str, Any], *, drop: Iterable[str] = ()) -> None:
        """Swap the tree, add or replace components and drop others in one step; nothing changes if the plan fails."""
        current = self._build.keys
        keys = {name: key for name, key in current.items() if name not in set(drop)}
        added: list[str] = []
        for name, value in components.items():
            keys[name] = self.manager.add(name, value, user=self.name)
            if keys[name] not in current.values():
                added.append(keys[name])
        try:
            build = self._compile(root, keys)
        except PlanError:
            for key in added:
                self.manager.release(key, user=self.name)
            raise
        self._build = build
        self._retire(set(current.values()) - set(keys.values()))

    def quantize(self, quantization: Quantization) -> Pipeline:
        """Quantize components, or change or remove their quantizer, always from the original weights.

        Args:
            quantization: one quantizer for the denoiser and text encoders (``unet`` or ``transformer``,
                ``text_encoder``, ``text_encoder_2``, where present), or a quantizer (None: none) per
                component name, e.g. ``{"unet": TorchAoQuantizer("int8wo"), "text_encoder": None}``.

        Components loaded from a repository are read again and quantized (nothing is quantized
        twice); components given as objects are quantized as copies and their originals kept. The
        plan is re-checked, and nothing changes if anything fails.

        Raises:
            ValueError: a named component holds no weights (scheduler, tokenizer, guider) or is unknown.
                Or it holds LoRA adapters or textual inversion tokens, which the new module would lack.
            QuantizerNotInstalledError, UnsupportedQuantizationError: before any weight is read.
        """
        originals = dict(self._originals)
        changes = replacements(self.manager, self._build.keys, quantization, originals=originals)
        self.update_components(**changes)
        self._originals = originals
        return self

    def memory(self) -> list[ComponentMemory]:
        """Bytes per component and device, and what quantized components would take unquantized.

        Loads components that are still lazy. ``print(format_memory(pipe.memory()))`` shows a table.
        """
        return [component_memory(name, self.manager.get(key)) for name, key in self._build.keys.items()]

    def replace_block(self, path: str, block: AbstractBlock) -> Pipeline:
        """Replace the block at ``path``; the new tree is checked and nothing changes if it fails."""
        return self._edit(replaced(self._build.root, path, block))

    def insert_block(self, block: AbstractBlock, *, before: str | None = None, after: str | None = None) -> Pipeline:
        """Insert a block next to a sibling given by dotted path; checked like :meth:`replace_block`."""
        return self._edit(inserted(self._build.root, block, before=before, after=after))

    def remove_block(self, path: str) -> Pipeline:
        """Remove the block at ``path``; checked like :meth:`replace_block`."""
        return self._edit(removed(self._build.root, path))

    def _edit(self, root: AbstractBlock) -> Pipeline:
        self._build = self._compile(root, self._build.keys)
        return self

    # --- looking --------------------------------------------------------------------------------------------

    @property
    def blocks(self) -> AbstractBlock:
        """The pipeline's block tree, an immutable value (edit through replace_block / insert_block / remove_block)."""
        return self._build.root

    @property
    def workflows(self) -> tuple[str, ...]:
        build = getattr(self, "_build", None)
        return tuple(plan.workflow for plan in build.plans.values()) if build is not None else ()

    def plan(self, workflow: str | None = None) -> Plan:
        """The compiled plan of one workflow (the only one when there is no switch)."""
        for plan in self._build.plans.values():
            if workflow is None or plan.workflow == workflow:
                return plan
        raise KeyError(f"no workflow {workflow!r}; workflows: {list(self.workflows)}")

    @property
    def input_names(self) -> frozenset[str]:
        return self._build.input_names

    @property
    def components(self) -> dict[str, Any]:
        """Components by name (loading any that are still lazy)."""
        return {name: self.manager.get(key) for name, key in self._build.keys.items()}

    def component_keys(self) -> dict[str, str]:
        return dict(self._build.keys)

    def __repr__(self) -> str:
        build = getattr(self, "_build", None)
        tree = render_tree(build.root) if build is not None else "(not built)"
        return f"Pipeline {self.name!r} (workflows: {', '.join(self.workflows)})\n" + tree

    def input_schema(self, workflow: str | None = None) -> dict[str, Any]:
        """JSON Schema of the inputs of a workflow."""
        return json_schema(self.plan(workflow).input_model)

    def output_schema(self, workflow: str | None = None) -> dict[str, Any]:
        """JSON Schema of every value a workflow produces."""
        return outputs_schema(self.plan(workflow))

    def doc(self) -> str:
        """Markdown reference of the pipeline's workflows, inputs, outputs and components."""
        return pipeline_doc(self.name, tuple(self._build.plans.values()))

    def mermaid(self, workflow: str | None = None) -> str:
        """A Mermaid flowchart of a workflow's blocks and the values between them."""
        return mermaid(self.plan(workflow))


def _no_grad(bound: Mapping[str, Any]) -> torch.autograd.grad_mode.inference_mode | torch.autograd.grad_mode.no_grad:
    """``inference_mode``, unless a bound component's quantized layers cannot run in it (quanto's int4/int2)."""
    for component in bound.values():
        if isinstance(component, torch.nn.Module):
            quantizer = quantizer_of(component)
            if quantizer is not None and not quantizer.runs_in_inference_mode:
                return torch.no_grad()
    return torch.inference_mode()
