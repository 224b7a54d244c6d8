"""Several ControlNets steering one UNet, held as one component."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, cast, final

import torch
from torch import nn
from typing_extensions import Self

from diffblocks.components.hub import resolve_folder
from diffblocks.components.models.base import AbstractModel
from diffblocks.components.models.controlnet.model import ControlNetModel
from diffblocks.components.models.controlnet.union import ControlNetUnionModel
from diffblocks.components.models.loading import CONFIG_NAME

_MSG_NO_UNION = "MultiControlNetUnionModel holds at least one ControlNetUnionModel: give plain ControlNets a MultiControlNetModel"

M = TypeVar("M", bound=AbstractModel[Any])
N = TypeVar("N", bound=nn.Module)


class AbstractMultiControlNet(nn.Module, Generic[N]):
    """Several ControlNets of one kind (:attr:`net_class`), held as one component, in order.

    It holds the nets only; the denoiser runs each with its own control image, scale and window,
    and sums their residuals. Saved and loaded as diffusers saves its multi-ControlNets.
    """

    net_class: ClassVar[type[AbstractModel[Any]]]
    # the classes it holds: net_class, and for a union's multi-ControlNet also plain ControlNets
    held_classes: ClassVar[tuple[type[AbstractModel[Any]], ...]] = ()

    def __init__(self, nets: Iterable[N]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        held = self.held_classes or (self.net_class,)
        kind, name = " or ".join(f"{c.__name__}s" for c in held), type(self).__name__
        if len(self.nets) < 2:
            raise ValueError(f"{name} takes two or more ControlNets, got {len(self.nets)}: give one {self.net_class.__name__} as it is")
        for i, net in enumerate(self.nets):
            if not isinstance(net, held):
                raise TypeError(f"{name} takes {kind}, but net {i} is a {type(net).__name__}")

    def __len__(self) -> int:
        return len(self.nets)

    def __iter__(self) -> Iterator[N]:
        return iter(cast("list[N]", list(self.nets)))

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike[str],
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Self:
        """The nets of a diffusers multi-ControlNet folder: ``controlnet``, ``controlnet_1``, ... (see :func:`numbered_nets`)."""
        nets = numbered_nets(cls.net_class, path_or_repo, subfolder=subfolder, revision=revision, variant=variant, dtype=dtype, device=device)
        return cls(cast("list[N]", nets))

    def save_pretrained(self, folder: str | os.PathLike[str], *, variant: str | None = None, max_shard_size: int | str | None = None) -> None:
        """Save as diffusers does: the first net in ``folder``, net ``i`` in ``folder_i``."""
        save_numbered(list(self), folder, variant=variant, max_shard_size=max_shard_size)


@final
class MultiControlNetModel(AbstractMultiControlNet[ControlNetModel]):
    """ControlNets that act together: their residuals are summed, in order (diffusers' ``MultiControlNetModel``).

    It holds the nets only; the denoiser runs each with its own control image, scale and window.

    Args:
        nets: two or more ControlNets for the same UNet.

    Example:
        >>> from diffblocks.components.models.controlnet import ControlNetParams
        >>> params = ControlNetParams(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2)
        >>> len(MultiControlNetModel([ControlNetModel(params), ControlNetModel(params)]))
        2
    """

    net_class = ControlNetModel


@final
class MultiControlNetUnionModel(AbstractMultiControlNet[ControlNetUnionModel | ControlNetModel]):
    """SDXL ControlNet-Unions, and plain ControlNets beside them, that act together (diffusers' ``MultiControlNetUnionModel``).

    Each net reads its own control image (a union: one per control mode it is given) and its own
    scale and window; inside a multi-ControlNet a union scales its residuals, not its images'
    features (diffusers' ``from_multi``), and the residuals of all nets are summed in order.
    diffusers' class holds unions only; a plain :class:`ControlNetModel` may stand beside them
    here, and a folder holding one loads here only (each net by its config's ``_class_name``).

    Args:
        nets: two or more nets for the same UNet, at least one a :class:`ControlNetUnionModel`.

    Example:
        >>> from diffblocks.components.models.controlnet import ControlNetUnionParams
        >>> params = ControlNetUnionParams(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2, addition_embed_type="text_time",
        ...     addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, num_trans_channel=32,
        ...     num_trans_head=4, num_proj_channel=32)
        >>> len(MultiControlNetUnionModel([ControlNetUnionModel(params), ControlNetUnionModel(params)]))
        2
    """

    net_class = ControlNetUnionModel
    held_classes = (ControlNetUnionModel, ControlNetModel)

    def __init__(self, nets: Iterable[ControlNetUnionModel | ControlNetModel]) -> None:
        super().__init__(nets)
        if not any(isinstance(net, ControlNetUnionModel) for net in self.nets):
            raise TypeError(_MSG_NO_UNION)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike[str],
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Self:
        """The nets of a multi-ControlNet folder, each loaded as the class its ``config.json`` names."""
        root, names = numbered_folders(path_or_repo, subfolder=subfolder, revision=revision, kind=cls.__name__)
        nets = []
        for name in names:
            class_name = json.loads((root / name / CONFIG_NAME).read_text()).get("_class_name")
            net_class = ControlNetModel if class_name == ControlNetModel.diffusers_class_name else ControlNetUnionModel
            nets.append(net_class.from_pretrained(root, subfolder=name, variant=variant, dtype=dtype, device=device))
        return cls(nets)


def numbered_folders(
    path_or_repo: str | os.PathLike[str], *, subfolder: str | None, revision: str | None = None, kind: str
) -> tuple[Path, list[str]]:
    """The folder holding a saved multi-ControlNet's nets, and their names: ``<folder>``, ``<folder>_1``, ...

    Raises:
        FileNotFoundError: the first folder holds no ``config.json`` (``kind`` names what was looked for).
    """
    if subfolder:
        root, first = resolve_folder(path_or_repo, revision=revision, allow_patterns=[f"{subfolder}*/*"]), subfolder
    else:
        folder = resolve_folder(path_or_repo, revision=revision)
        root, first = folder.parent, folder.name
    names = [first]
    while (root / f"{first}_{len(names)}" / CONFIG_NAME).is_file():
        names.append(f"{first}_{len(names)}")
    if not (root / first / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{root / first} holds no {CONFIG_NAME}: it is not a saved {kind}")
    return root, names


def numbered_nets(
    cls: type[M],
    path_or_repo: str | os.PathLike[str],
    *,
    subfolder: str | None,
    revision: str | None = None,
    **kwargs: Any,
) -> list[M]:
    """Several nets saved as diffusers saves a multi-ControlNet: ``<folder>``, ``<folder>_1``, ``<folder>_2``, ...

    ``<folder>`` is ``subfolder`` inside ``path_or_repo``, or ``path_or_repo`` itself. ``kwargs``
    (``variant``, ``dtype``, ``device``) go to each net's ``from_pretrained``.

    Raises:
        FileNotFoundError: the first folder holds no ``config.json``.
    """
    root, names = numbered_folders(path_or_repo, subfolder=subfolder, revision=revision, kind=cls.__name__)
    return [cls.from_pretrained(root, subfolder=name, **kwargs) for name in names]


def save_numbered(nets: list[Any], folder: str | os.PathLike[str], **kwargs: Any) -> None:
    """Save ``nets`` as :func:`numbered_nets` reads them (and diffusers writes them)."""
    path = Path(folder)
    for i, net in enumerate(nets):
        net.save_pretrained(path if i == 0 else path.with_name(f"{path.name}_{i}"), **kwargs)


def controlnets(
    component: ControlNetModel | ControlNetUnionModel | MultiControlNetModel | MultiControlNetUnionModel,
) -> tuple[ControlNetModel | ControlNetUnionModel, ...]:
    """The nets of a UNet ``controlnet`` component, one or several, in order."""
    return (component,) if isinstance(component, (ControlNetModel, ControlNetUnionModel)) else tuple(component)


__all__ = [
    "AbstractMultiControlNet",
    "MultiControlNetModel",
    "MultiControlNetUnionModel",
    "controlnets",
    "numbered_folders",
    "numbered_nets",
    "save_numbered",
]
