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
_BLOCK = re.compile(rf"block{_POSITIVE}diagonal")
_HIERARCHICAL = re.compile(rf"hierarchical{_POSITIVE}_{_POSITIVE}")

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
def _block_diagonal(block_size: int) -> type[StructuredMatrix]:
    """The ``block<b>diagonal`` class (made once per ``b``)."""
    base = _load("singd.structures.block_diagonal", "BlockDiagonal")
    return type(
        f"Block{block_size}Diagonal",
        (base,),
        {
            "name": f"block{block_size}diagonal",
            "block_size": block_size,
            "__module__": base.__module__,
        },
    )


@functools.cache
def _hierarchical(k1_max: int, k2_max: int) -> type[StructuredMatrix]:
    """The ``hierarchical<K1>_<K2>`` class (made once per ``(K1, K2)``)."""
    base = _load("singd.structures.hierarchical", "Hierarchical")
    return type(
        f"Hierarchical{k1_max}_{k2_max}",
        (base,),
        {
            "name": f"hierarchical{k1_max}_{k2_max}",
            "k1_max": k1_max,
            "k2_max": k2_max,
            "__module__": base.__module__,
        },
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
    if match := _BLOCK.fullmatch(name):
        return _block_diagonal(int(match.group(1)))
    if match := _HIERARCHICAL.fullmatch(name):
        return _hierarchical(int(match.group(1)), int(match.group(2)))
    raise ValueError(
        f"unknown structure name {name!r}; valid forms: {', '.join(sorted(_FIXED))}, "
        "'block<b>diagonal' and 'hierarchical<K1>_<K2>' (positive integers without "
        "leading zeros, e.g. 'block30diagonal', 'hierarchical15_15')"
    )
