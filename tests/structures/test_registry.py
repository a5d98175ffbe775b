"""The name registry (SPEC §2 names): lookup, parametric parsing, errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.structures import STRUCTURE_NAMES as ORACLE_NAMES
from singd.structures import STRUCTURE_NAMES, StructuredMatrix, get_structure

POSITIVE = st.integers(1, 10_000)


def test_names_match_the_oracle() -> None:
    assert set(STRUCTURE_NAMES) == set(ORACLE_NAMES)
    assert {"block30diagonal", "hierarchical15_15", "block3diagonal", "hierarchical2_3"} <= set(
        STRUCTURE_NAMES
    )


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_every_name_gives_its_class(name: str) -> None:
    cls = get_structure(name)
    assert issubclass(cls, StructuredMatrix)
    assert cls.name == name
    assert get_structure(name) is cls


@given(block_size=POSITIVE)
def test_block_diagonal_names_parse(block_size: int) -> None:
    cls = get_structure(f"block{block_size}diagonal")
    assert cls.block_size == block_size
    assert cls.name == f"block{block_size}diagonal"
    assert get_structure(f"block{block_size}diagonal") is cls  # made once


@given(k1=POSITIVE, k2=POSITIVE)
def test_hierarchical_names_parse(k1: int, k2: int) -> None:
    cls = get_structure(f"hierarchical{k1}_{k2}")
    assert (cls.k1_max, cls.k2_max) == (k1, k2)
    assert cls.name == f"hierarchical{k1}_{k2}"
    assert get_structure(f"hierarchical{k1}_{k2}") is cls  # made once


def test_public_api_examples() -> None:
    assert get_structure("block30diagonal").block_size == 30
    hierarchical = get_structure("hierarchical15_15")
    assert hierarchical.block_sizes(10) == (10, 0, 0)  # d ≤ K1
    assert hierarchical.block_sizes(20) == (15, 0, 5)  # K1 < d ≤ K1 + K2
    assert hierarchical.block_sizes(100) == (15, 70, 15)  # d > K1 + K2


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Dense",
        "dense ",
        "blockdiagonal",
        "block0diagonal",
        "block03diagonal",
        "block-3diagonal",
        "block3.5diagonal",
        "hierarchical15",
        "hierarchical_15_15",
        "hierarchical0_3",
        "hierarchical3_0",
        "hierarchical15_15_15",
        "toeplitz",
    ],
)
def test_malformed_names_raise(name: str) -> None:
    with pytest.raises(ValueError, match="block<b>diagonal") as error:
        get_structure(name)
    assert "hierarchical<K1>_<K2>" in str(error.value)
    assert "triltoeplitz" in str(error.value)  # lists the valid forms


def test_non_string_name_raises() -> None:
    with pytest.raises(ValueError, match="string"):
        get_structure(30)  # type: ignore[arg-type]
