"""Structured Kronecker factors (SPEC §2) and the name registry.

:func:`get_structure` maps a name to a :class:`StructuredMatrix` subclass.
Parametric names are parsed here and nowhere else:

* ``block<b>diagonal`` (``b >= 1``) → a cached subclass of
  :class:`~singd.structures.block_diagonal.BlockDiagonal` with class attribute
  ``block_size = b``;
* ``hierarchical<K1>_<K2>`` (``K1, K2 >= 1``) → a cached subclass of
  :class:`~singd.structures.hierarchical.Hierarchical` with class attributes
  ``k1_max = K1``, ``k2_max = K2``.

Numbers are written without leading zeros, so every class has one name.
Classes are imported lazily by module path: a structure module that fails to
import breaks only its own names.
"""

from __future__ import annotations

import functools
import importlib
import re

from singd.structures.base import StructuredMatrix

__all__ = ["STRUCTURE_NAMES", "StructuredMatrix", "get_structure"]

#: Non-parametric names → (module, class).
_FIXED: dict[str, tuple[str, str]] = {
    "dense": ("singd.structures.dense", "Dense"),
    "diagonal": ("singd.structures.diagonal", "Diagonal"),
    "tril": ("singd.structures.triangular", "Tril"),
    "triu": ("singd.structures.triangular", "Triu"),
    "triltoeplitz": ("singd.structures.toeplitz", "TrilToeplitz"),
    "triutoeplitz": ("singd.structures.toeplitz", "TriuToeplitz"),
    "triltopleftdiagonal": ("singd.structures.recursive", "TrilTopLeftDiagonal"),
    "trilbottomrightdiagonal": ("singd.structures.recursive", "TrilBottomRightDiagonal"),
    "triutopleftdiagonal": ("singd.structures.recursive", "TriuTopLeftDiagonal"),
    "triubottomrightdiagonal": ("singd.structures.recursive", "TriuBottomRightDiagonal"),
}

_POSITIVE = r"([1-9][0-9]*)"

#: Parametric families: name pattern → (module, base class, class-name format,
#: the class attributes its numbers set, in order).
_FAMILIES: dict[re.Pattern[str], tuple[str, str, str, tuple[str, ...]]] = {
    re.compile(rf"block{_POSITIVE}diagonal"): (
        "singd.structures.block_diagonal",
        "BlockDiagonal",
        "Block{}Diagonal",
        ("block_size",),
    ),
    re.compile(rf"hierarchical{_POSITIVE}_{_POSITIVE}"): (
        "singd.structures.hierarchical",
        "Hierarchical",
        "Hierarchical{}_{}",
        ("k1_max", "k2_max"),
    ),
}

#: Every non-parametric name and example parametric ones (the test matrix).
STRUCTURE_NAMES: tuple[str, ...] = (
    "dense",
    "diagonal",
    "block3diagonal",
    "block30diagonal",
    "hierarchical2_3",
    "hierarchical15_15",
    "tril",
    "triu",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiagonal",
    "trilbottomrightdiagonal",
    "triutopleftdiagonal",
    "triubottomrightdiagonal",
)


def _load(module: str, class_name: str) -> type[StructuredMatrix]:
    return getattr(importlib.import_module(module), class_name)


@functools.cache
def _family_member(name: str) -> type[StructuredMatrix]:
    """The class of a parametric ``name``, made once per name; ``ValueError`` if none matches."""
    for pattern, (module, base_name, class_format, attributes) in _FAMILIES.items():
        if match := pattern.fullmatch(name):
            numbers = [int(group) for group in match.groups()]
            base = _load(module, base_name)
            namespace = {"name": name, "__module__": base.__module__}
            namespace.update(zip(attributes, numbers, strict=True))
            return type(class_format.format(*numbers), (base,), namespace)
    raise ValueError(
        f"unknown structure name {name!r}; valid forms: {', '.join(sorted(_FIXED))}, "
        "'block<b>diagonal' and 'hierarchical<K1>_<K2>' (positive integers without "
        "leading zeros, e.g. 'block30diagonal', 'hierarchical15_15')"
    )


def get_structure(name: str) -> type[StructuredMatrix]:
    """The structure class called ``name`` (SPEC §2 names).

    Args:
        name: ``dense``, ``diagonal``, ``block<b>diagonal``,
            ``hierarchical<K1>_<K2>``, ``tril``, ``triu``, ``triltoeplitz``,
            ``triutoeplitz`` or one of the four recursive forms
            (``tril``/``triu`` + ``topleftdiagonal``/``bottomrightdiagonal``).

    Returns:
        The class; the same object for the same name on every call.

    Raises:
        ValueError: If ``name`` is unknown or a malformed parametric name.
    """
    if not isinstance(name, str):
        raise ValueError(f"structure name must be a string, got {type(name).__name__}")
    if name in _FIXED:
        return _load(*_FIXED[name])
    return _family_member(name)
