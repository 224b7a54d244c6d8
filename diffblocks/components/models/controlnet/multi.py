"""Several ControlNets steering one UNet, held as one component."""

from __future__ import annotations

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
from diffblocks.components.models.loading import CONFIG_NAME

M = TypeVar("M", bound=AbstractModel[Any])
N = TypeVar("N", bound=nn.Module)


class AbstractMultiControlNet(nn.Module, Generic[N]):
    """Several ControlNets of one kind (:attr:`net_class`), held as one component, in order.

    It holds the nets only; the denoiser runs each with its own control image, scale and window,
    and sums their residuals. Saved and loaded as diffusers saves its multi-ControlNets.
    """

    net_class: ClassVar[type[AbstractModel[Any]]]

    def __init__(self, nets: Iterable[N]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        kind, name = self.net_class.__name__, type(self).__name__
        if len(self.nets) < 2:
            raise ValueError(f"{name} takes two or more ControlNets, got {len(self.nets)}: give one {kind} as it is")
        for i, net in enumerate(self.nets):
            if not isinstance(net, self.net_class):
                raise TypeError(f"{name} takes {kind}s, but net {i} is a {type(net).__name__}")

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
    if subfolder:
        root, first = resolve_folder(path_or_repo, revision=revision, allow_patterns=[f"{subfolder}*/*"]), subfolder
    else:
        folder = resolve_folder(path_or_repo, revision=revision)
        root, first = folder.parent, folder.name
    names = [first]
    while (root / f"{first}_{len(names)}" / CONFIG_NAME).is_file():
        names.append(f"{first}_{len(names)}")
    if not (root / first / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{root / first} holds no {CONFIG_NAME}: it is not a saved {cls.__name__}")
    return [cls.from_pretrained(root, subfolder=name, **kwargs) for name in names]


def save_numbered(nets: list[Any], folder: str | os.PathLike[str], **kwargs: Any) -> None:
    """Save ``nets`` as :func:`numbered_nets` reads them (and diffusers writes them)."""
    path = Path(folder)
    for i, net in enumerate(nets):
        net.save_pretrained(path if i == 0 else path.with_name(f"{path.name}_{i}"), **kwargs)


def controlnets(component: ControlNetModel | MultiControlNetModel) -> tuple[ControlNetModel, ...]:
    """The ControlNets of a ``controlnet`` component, one or several, in order."""
    return (component,) if isinstance(component, ControlNetModel) else tuple(component)


__all__ = ["AbstractMultiControlNet", "MultiControlNetModel", "controlnets", "numbered_nets", "save_numbered"]
