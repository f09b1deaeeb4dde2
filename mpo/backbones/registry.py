"""Backbone families found by name: ``model.family: wan`` is ``mpo/backbones/wan.py``, or a package's
entry point, with no list of families to edit anywhere.

Where a name is looked up, in order:

1. families already registered in this process (``@register_backbone("name")`` on the class, which
   every family file carries; also how a test or notebook adds one on the fly);
2. a module ``mpo.backbones.<name>`` (the built-in families: one file each), imported on first use;
3. an entry point named ``<name>`` in the group ``mpo.backbones`` of any installed package, so a user's
   own package adds a family without touching this one::

       # pyproject.toml of the user's package
       [project.entry-points."mpo.backbones"]
       pixart = "my_models.pixart:PixArtBackbone"

   Entry points are seen by every process that ``accelerate launch`` starts, which an in-process
   registration is not.

An unknown name raises :class:`UnknownFamily`, naming every family that would have been found.
Importing this module imports no family: the family files (and diffusers' pipelines) load only when
their name is asked for.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

from mpo.backbones.base import Backbone

if TYPE_CHECKING:
    import torch

    from mpo.schema import ModelConfig

ENTRY_POINT_GROUP = "mpo.backbones"
# Modules of this package that are not families.
_NOT_FAMILIES = frozenset({"base", "registry", "schedules", "tiny"})
_REGISTRY: dict[str, type[Backbone]] = {}


class UnknownFamily(KeyError):
    """``model.family`` names no registered, built-in or entry-point family."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_backbone(name: str):
    """Class decorator: ``@register_backbone("wan")`` makes the class the family ``wan``.

    Registering another class under a taken name is refused (two files claiming one family is a
    packaging mistake that would otherwise be resolved by import order); re-registering the same
    class, e.g. on a module reload, is allowed.
    """

    def wrap(cls: type[Backbone]) -> type[Backbone]:
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise TypeError(f"register_backbone({name!r}): {cls!r} is not a Backbone subclass")
        taken = _REGISTRY.get(name)
        if taken is not None and _qualname(taken) != _qualname(cls):
            raise ValueError(
                f"backbone family {name!r} is already registered by {_qualname(taken)}; "
                f"{_qualname(cls)} cannot take it"
            )
        cls.family = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def unregister_backbone(name: str) -> None:
    """Forget a family registered in this process (tests that register a family on the fly)."""
    _REGISTRY.pop(name, None)


def builtin_families() -> list[str]:
    """The family files of this package (``mpo/backbones/<family>.py``), without importing them."""
    folder = Path(__file__).parent
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(folder)])
        if not m.ispkg and not m.name.startswith("_") and m.name not in _NOT_FAMILIES
    )


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_families() -> list[str]:
    """Every name :func:`get_backbone_class` would find (registered, built-in, entry points)."""
    return sorted(set(_REGISTRY) | set(builtin_families()) | set(_entry_points()))


def get_backbone_class(name: str) -> type[Backbone]:
    """The family class for ``model.family=name``, importing its module on first use."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    entry_points = _entry_points()
    if name in builtin_families():
        importlib.import_module(f"{__package__}.{name}")
        where = f"mpo/backbones/{name}.py"
    elif name in entry_points:
        ep = entry_points[name]
        where = f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP!r})"
        try:
            loaded = ep.load()
        except Exception as err:
            raise ImportError(f"model.family={name!r}: {where} cannot be imported: {err}") from err
        if isinstance(loaded, type) and issubclass(loaded, Backbone) and name not in _REGISTRY:
            register_backbone(name)(loaded)  # an entry point may name the class or a module that registers it
    else:
        raise UnknownFamily(
            f"model.family={name!r} is not a known backbone family; known: {known_families()}"
        )
    if name not in _REGISTRY:
        raise UnknownFamily(
            f"model.family={name!r}: {where} was imported but registers no family {name!r} "
            f'(decorate its Backbone class with @register_backbone("{name}"))'
        )
    return _REGISTRY[name]


def load_backbone(cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
    """Load ``model.path`` with its family's loader; with ``model.tiny: true``, build the family's tiny
    variant there first unless it exists (the only place a tiny model is ever built)."""
    cls = get_backbone_class(cfg.family)
    if cfg.tiny:
        from mpo.backbones.tiny import ensure_tiny

        ensure_tiny(cls, cfg)
    return cls.load(cfg, device)


def load_decoder(cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
    """What the score stage loads: the family's decoder alone (:meth:`Backbone.load_decoder`), the
    tiny variant built first as in :func:`load_backbone`."""
    cls = get_backbone_class(cfg.family)
    if cfg.tiny:
        from mpo.backbones.tiny import ensure_tiny

        ensure_tiny(cls, cfg)
    return cls.load_decoder(cfg, device)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
