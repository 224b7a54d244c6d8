"""The leaf block: typed inputs and outputs, declared components, a config, one ``__call__``."""

from __future__ import annotations

import copy
import inspect
import re
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

from diffblocks.blocks.fields import Produced

_MSG_UNBOUND = (
    "block {block!r} has no component {name!r} bound: blocks get their components from a Pipeline. "
    "Build one with Pipeline(blocks, components={{...}}) and call it, or bind a dict for a unit test "
    "with block.bind({{{name!r}: obj}})."
)


class BlockIO(BaseModel):
    """Base of every block's ``Inputs`` and ``Outputs``: fields are the block's signature.

    Float fields refuse infinity and NaN: no setting of a diffusion run is meaningful at infinity,
    and one such value (an infinite guidance scale) turns every pixel into NaN.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class NoIO(BlockIO):
    """Declares that a block takes no inputs or returns no outputs."""


class BlockConfig(BaseModel):
    """Base of a block's ``Config``: frozen settings fixed when the block is built."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class ComponentDecl:
    """A component a block needs, declared as an annotated class attribute: ``vae: AutoencoderKL = component()``.

    Reading the attribute on a bound block returns the pipeline's component; the annotation is the
    type the plan checks the component against.
    """

    __slots__ = ("name", "optional", "description", "owner")

    def __init__(self, *, optional: bool = False, description: str = "") -> None:
        self.name = ""
        self.optional = optional
        self.description = description
        self.owner: type | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.owner = owner

    def __get__(self, block: Block | None, owner: type) -> Any:
        if block is None:
            return self
        try:
            return block._bound[self.name]
        except KeyError:
            if self.optional:
                return None
            raise LookupError(_MSG_UNBOUND.format(block=block.name, name=self.name)) from None

    def annotation(self) -> Any:
        """The declared component type, resolved from the owner's annotations."""
        assert self.owner is not None
        return _type_hints(self.owner).get(self.name, Any)


def component(*, optional: bool = False, description: str = "") -> Any:
    """Declare a component a block uses. ``optional=True`` lets the pipeline build without it (it reads as None)."""
    return ComponentDecl(optional=optional, description=description)


class AbstractBlock(ABC):
    """Anything that can stand in a pipeline: a leaf :class:`Block` or a composite.

    A block tree is seen through :meth:`children` and rebuilt through :meth:`replace_children`;
    :func:`diffblocks.blocks.walk` visits it with paths.
    """

    name: str

    def children(self) -> tuple[AbstractBlock, ...]:
        """The blocks directly inside this one, in order (a leaf has none)."""
        return ()

    def child_names(self) -> tuple[str, ...]:
        """The path segment of each child: its name in a sequence or loop, its branch name in a switch."""
        return tuple(child.name for child in self.children())

    def replace_children(self, children: tuple[AbstractBlock, ...]) -> Self:
        """This block with other children, as a new block; the original is unchanged."""
        if children:
            raise ValueError(f"block {self.name!r} is a leaf and cannot hold blocks")
        return self

    @abstractmethod
    def renamed(self, name: str) -> Self:
        """This block under another name, as a new block; the original is unchanged."""

    def summary(self) -> str:
        """One line that names the block in a printed tree."""
        return f"{self.name}: {type(self).__name__}"

    def child_heading(self, key: str) -> str | None:
        """A line printed above the child at ``key`` (a switch names the branch and its trigger)."""
        return None


class Block(AbstractBlock):
    """A single step: subclass it, declare ``Inputs``/``Outputs``/components, implement ``__call__``.

    See docs/quickstart.md for a complete example (declaring, composing, running, subclassing).
    """

    Inputs: ClassVar[type[BlockIO]] = NoIO
    Outputs: ClassVar[type[BlockIO]] = NoIO
    Config: ClassVar[type[BlockConfig]] = BlockConfig
    _bound: Mapping[str, Any]

    def __init__(self, *, name: str | None = None, **config: Any) -> None:
        self.name = name or default_block_name(type(self))
        self.config = self.Config(**config)
        self._bound = {}

    def summary(self) -> str:
        ins, outs = ", ".join(self.input_fields()), ", ".join(self.output_fields())
        components = ", ".join(self.components())
        return f"{self.name}: {type(self).__name__}({ins}) -> ({outs})" + (f" [{components}]" if components else "")

    def __repr__(self) -> str:
        return self.summary()

    @abstractmethod
    def __call__(self, inputs: Any) -> Any:
        """Run the step on validated ``Inputs`` and return ``Outputs``."""

    def check(self, inputs: Any) -> None:
        """Check this block's inputs once per call, before any block runs; override to add checks.

        ``inputs`` is this block's own ``Inputs``, holding what the caller gave (defaults filled
        in). An input that an earlier block produces is not known yet: it is absent from
        ``inputs.model_fields_set`` (read it with :func:`known`). Check values together or against
        the components (``self.vae``) and raise :class:`FieldError` naming the field; the pipeline
        reports every block's problems at once, with the block's path. Values known only at run
        time are checked in ``__call__``: a ``FieldError`` raised there is reported the same way.
        """

    def check_fit(self, components: Mapping[str, Any]) -> None:
        """Check, once when the pipeline is built, that this block's loaded components fit together.

        ``components`` holds those of this block's components that are loaded objects (a
        component still a :class:`ComponentSpec` is left out, and checked by :meth:`check` at the
        call). Raise :class:`FieldError` naming the component and both sides (a ControlNet made for
        another UNet); the pipeline reports every block's problems in one ``PlanError``.
        """

    def bind(self, components: Mapping[str, Any]) -> Block:
        """Give this block its components directly (pipelines do this; useful in unit tests)."""
        self._bound = components
        return self

    def unbound(self) -> Self:
        """A copy of this block with no components bound.

        A pipeline keeps such copies, so it never shares a leaf (and the components bound to it)
        with the caller's tree or with another pipeline.
        """
        clone = copy.copy(self)
        clone._bound = {}
        return clone

    def renamed(self, name: str) -> Self:
        clone = self.unbound()
        clone.name = name
        return clone

    @classmethod
    def components(cls) -> dict[str, ComponentDecl]:
        """The components this block declares, by attribute name."""
        found: dict[str, ComponentDecl] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if isinstance(value, ComponentDecl):
                    found[attr] = value
        return found

    @classmethod
    def input_fields(cls) -> dict[str, FieldInfo]:
        return dict(cls.Inputs.model_fields)

    @classmethod
    def output_fields(cls) -> dict[str, FieldInfo]:
        return dict(cls.Outputs.model_fields)

    @classmethod
    def declaration_site(cls) -> str:
        """``file:line`` of the class statement, for error messages."""
        try:
            _, line = inspect.getsourcelines(cls)
            return f"{inspect.getsourcefile(cls)}:{line}"
        except (OSError, TypeError):
            return cls.__module__


def known(inputs: BlockIO, name: str) -> Any:
    """The value of input ``name`` when the caller gave it (or its default applies), else None.

    In :meth:`Block.check`, inputs that earlier blocks produce are not known yet; this reads an
    input that is the caller's in one pipeline and a block's output in another.
    """
    return inputs.__dict__.get(name) if name in inputs.model_fields_set else None


def default_block_name(cls: type) -> str:
    """``EncodePrompt`` -> ``encode_prompt``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except NameError as err:
        raise TypeError(
            f"cannot resolve the annotations of {cls.__qualname__}: {err}. "
            "Import the component and field types at module level (not only under TYPE_CHECKING)."
        ) from err


def field_type(field: FieldInfo) -> Any:
    """The declared annotation of a pydantic field (with its metadata re-attached, less the :func:`produced` marker)."""
    annotation = field.annotation
    metadata = [m for m in field.metadata if not isinstance(m, Produced)]
    if metadata:
        return typing.Annotated[(annotation, *metadata)]  # type: ignore[misc]
    return annotation

