"""The public singd 0.0.5 import paths resolve to our classes and stay in sync with the registry.

``PUBLIC_STRUCTURES`` and ``PUBLIC_TEMPLATES`` list every public structure name
this package resolves.  A structure added to the registry (``STRUCTURE_NAMES``)
without a public alias fails :func:`test_every_structure_family_has_a_public_alias`
unless it is in ``OURS_ONLY`` (no counterpart in the public package); an alias
pointing at another class fails :func:`test_public_structure_names_are_the_registry_classes`.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from singd import SINGD
from singd.optim.optimizer import SINGD as PublicSINGD
from singd.structures import STRUCTURE_NAMES, StructuredMatrix, get_structure
from singd.structures.block_diagonal import BlockDiagonal
from singd.structures.hierarchical import Hierarchical

#: (public module, public class) → our registry name.
PUBLIC_STRUCTURES: dict[tuple[str, str], str] = {
    ("singd.structures.dense", "DenseMatrix"): "dense",
    ("singd.structures.diagonal", "DiagonalMatrix"): "diagonal",
    ("singd.structures.blockdiagonal", "Block30DiagonalMatrix"): "block30diagonal",
    ("singd.structures.blockdiagonal", "Block3DiagonalMatrix"): "block3diagonal",
    ("singd.structures.hierarchical", "Hierarchical15_15Matrix"): "hierarchical15_15",
    ("singd.structures.hierarchical", "Hierarchical3_2Matrix"): "hierarchical3_2",
    ("singd.structures.triltoeplitz", "TrilToeplitzMatrix"): "triltoeplitz",
    ("singd.structures.triutoeplitz", "TriuToeplitzMatrix"): "triutoeplitz",
    ("singd.structures.trilbottomrightdiag", "TrilBottomRightDiagonalMatrix"): (
        "trilbottomrightdiagonal"
    ),
    ("singd.structures.triltopleftdiag", "TrilTopLeftDiagonalMatrix"): "triltopleftdiagonal",
    ("singd.structures.triubottomrightdiag", "TriuBottomRightDiagonalMatrix"): (
        "triubottomrightdiagonal"
    ),
    ("singd.structures.triutopleftdiag", "TriuTopLeftDiagonalMatrix"): "triutopleftdiagonal",
}

#: (public module, public class) → our parametric base class.
PUBLIC_TEMPLATES: dict[tuple[str, str], type[StructuredMatrix]] = {
    ("singd.structures.blockdiagonal", "BlockDiagonalMatrixTemplate"): BlockDiagonal,
    ("singd.structures.hierarchical", "HierarchicalMatrixTemplate"): Hierarchical,
    ("singd.structures.base", "StructuredMatrix"): StructuredMatrix,
}

#: Our structures without a counterpart in the public package.
OURS_ONLY = frozenset({"tril", "triu"})

#: Thin compat modules (no structure of their own): exactly these public names.
THIN_MODULES = (
    "singd.structures.blockdiagonal",
    "singd.structures.triltoeplitz",
    "singd.structures.triutoeplitz",
    "singd.structures.trilbottomrightdiag",
    "singd.structures.triltopleftdiag",
    "singd.structures.triubottomrightdiag",
    "singd.structures.triutopleftdiag",
)


def _resolve(module: str, name: str) -> object:
    return getattr(importlib.import_module(module), name)


def test_public_optimizer_path_is_ours() -> None:
    assert PublicSINGD is SINGD


@pytest.mark.parametrize(("path", "name"), PUBLIC_STRUCTURES.items(), ids=lambda v: str(v))
def test_public_structure_names_are_the_registry_classes(path: tuple[str, str], name: str) -> None:
    assert _resolve(*path) is get_structure(name)


@pytest.mark.parametrize(("path", "cls"), PUBLIC_TEMPLATES.items(), ids=lambda v: str(v))
def test_public_template_names_are_our_base_classes(
    path: tuple[str, str], cls: type[StructuredMatrix]
) -> None:
    assert _resolve(*path) is cls


def test_every_structure_family_has_a_public_alias() -> None:
    aliased = {get_structure(name) for name in PUBLIC_STRUCTURES.values()}
    templates = set(PUBLIC_TEMPLATES.values()) - {StructuredMatrix}
    missing = [
        name
        for name in STRUCTURE_NAMES
        if name not in OURS_ONLY
        and get_structure(name) not in aliased
        and not templates.intersection(get_structure(name).__bases__)
    ]
    assert missing == [], f"structures without a public singd alias: {missing}"
    assert OURS_ONLY <= set(STRUCTURE_NAMES)  # an exemption must name a real structure


@pytest.mark.parametrize("module", THIN_MODULES)
def test_thin_modules_export_exactly_the_listed_names(module: str) -> None:
    listed = {cls for mod, cls in [*PUBLIC_STRUCTURES, *PUBLIC_TEMPLATES] if mod == module}
    assert set(importlib.import_module(module).__all__) == listed


def test_unknown_public_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="Hierarchical2_2Matrix"):
        _resolve("singd.structures.hierarchical", "Hierarchical2_2Matrix")


def test_parametric_alias_is_the_registry_class_whichever_is_imported_first() -> None:
    """Fresh interpreter, registry first: importing the alias must not make a second class."""
    code = (
        "from singd.structures import get_structure\n"
        "first = get_structure('hierarchical15_15')\n"
        "from singd.structures.hierarchical import Hierarchical15_15Matrix\n"
        "assert Hierarchical15_15Matrix is first\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(set(PUBLIC_STRUCTURES.values())))
def test_isinstance_holds_for_the_factors_of_an_optimizer(name: str) -> None:
    opt = PublicSINGD(nn.Linear(4, 3), structures=(name, name))
    public = {v: _resolve(*k) for k, v in PUBLIC_STRUCTURES.items()}[name]
    assert isinstance(opt.Ks[""], public) and isinstance(opt.Cs[""], public)
    assert isinstance(opt.Ks[""], StructuredMatrix)
    assert torch.equal(opt.Ks[""].to_dense(), torch.eye(5))
