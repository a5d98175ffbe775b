"""``finite_flags``: the fused finiteness check agrees with ``isfinite(t).all()`` per tensor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from singd.optim.checks import host_values
from singd.optim.finiteness import extremes, finite_flags

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.complex64)
SPECIALS = (float("nan"), float("inf"), float("-inf"))


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of any dtype of :data:`DTYPES`, maybe empty, maybe with special entries."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator, dtype=torch.float64)
    if tensor.numel():
        # the dtype's largest finite value: finite, and must stay so in the check
        tensor.view(-1)[0] = draw(st.sampled_from([0.0, float(torch.finfo(torch.float16).max)]))
        for _ in range(draw(st.integers(0, 2))):
            index = draw(st.integers(0, tensor.numel() - 1))
            tensor.view(-1)[index] = draw(st.sampled_from(SPECIALS))
    tensor = tensor.to(dtype)
    if dtype.is_complex and tensor.numel() and draw(st.booleans()):
        tensor.view(-1)[-1] = complex(0.0, draw(st.sampled_from(SPECIALS)))  # imaginary only
    return tensor


@pytest.mark.parametrize("fused", [False, True])
@given(values=st.lists(tensors(), min_size=0, max_size=6))
@example(values=[torch.tensor([float("nan"), float("inf")]), torch.tensor([], dtype=torch.float16)])
@example(
    values=[
        torch.tensor([1e300], dtype=torch.float64),
        torch.tensor([65504.0], dtype=torch.float16),
    ]
)
@example(values=[torch.tensor([0.0, float("-inf")], dtype=torch.bfloat16), torch.ones(3)])
# finite, but any norm other than max|t| overflows: a 2-norm or 1-norm check fails here
@example(values=[torch.tensor([65504.0, 65504.0], dtype=torch.float16), torch.full((2,), 3e38)])
def test_finite_flags_match_isfinite(values: list[torch.Tensor], fused: bool) -> None:
    """Both reductions (``aminmax`` per tensor, the CPU's; ``_foreach_norm``, CUDA's)."""
    flags = [bool(flag) for flag in finite_flags(values, fused=fused)]
    assert flags == [bool(torch.isfinite(t).all()) for t in values]


SCALAR_DTYPES = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.bool,
    torch.int64,
)


@given(
    st.lists(
        st.tuples(st.sampled_from(SCALAR_DTYPES), st.integers(-1000, 1000)), min_size=0, max_size=8
    )
)
@example([(torch.bool, 1), (torch.float32, 7), (torch.bool, 0), (torch.float32, -3)])
def test_host_values_reads_every_scalar_in_order(entries: list[tuple[torch.dtype, int]]) -> None:
    """``host_values`` groups by dtype for the read, and returns the input order.

    Rule: exact (each value is representable in its dtype and in float64 —
    ``bool`` reads ``v ≠ 0``, the halves hold these integers rounded, compared
    after the same rounding).
    """
    scalars = [torch.tensor(value).to(dtype) for dtype, value in entries]
    assert host_values(scalars) == [float(scalar.double()) for scalar in scalars]


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6)])
def test_permuted_views_are_checked_in_memory_order(special: float, shape: tuple[int, ...]) -> None:
    """A transposed/permuted view (how ``ĝ`` comes out of ``singd_precondition``) is reduced
    through the contiguous tensor it permutes, with the same flags as the view itself.

    Rule: exact (the same entries), for every special value at every position
    class (first, last, interior) and for the finite view; a row-sliced view
    (not a permutation of a contiguous tensor) is still checked.
    """
    base = torch.randn(shape, dtype=torch.float32)
    view = base.permute(*reversed(range(base.dim())))
    assert not view.is_contiguous()
    assert bool(finite_flags([view])[0])
    for index in (0, base.numel() // 2, base.numel() - 1):
        broken = base.clone()
        broken.view(-1)[index] = special
        permuted = broken.permute(*reversed(range(broken.dim())))
        sliced = broken.reshape(shape[0], -1)[:, 1:]
        flags = [bool(flag) for flag in finite_flags([permuted, sliced])]
        assert flags == [False, bool(torch.isfinite(sliced).all())]


def _full_size_ops(view: torch.Tensor) -> list[str]:
    """The operators ``finite_flags([view])`` runs on a tensor of ``view``'s shape (profiler)."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, record_shapes=True) as profiler:
        finite_flags([view])
    shape = sorted(view.shape)
    return [
        event.name
        for event in profiler.events()
        if any(sorted(seen) == shape for seen in event.input_shapes or [])
    ]


def test_a_transposed_view_is_not_copied() -> None:
    """``aminmax`` of a strided input copies it first; the permuted view avoids that.

    Rule: exact: no ``clone``/``copy_`` of the 64 × 65 transposed view runs (profiler).
    """
    full_size = _full_size_ops(torch.randn(65, 64).T)
    assert "aten::aminmax" in full_size
    assert not set(full_size) & {"aten::clone", "aten::contiguous", "aten::copy_"}


LAYOUTS = (
    "contiguous",
    "transposed",
    "column slice",
    "transposed slice",
    "column",
    "every other row",
)


def _layouts(base: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of ``base`` (7 × 9) in the layouts the step hands to the checks."""
    return {
        "contiguous": base,
        "transposed": base.T,
        "column slice": base[:, :8],  # ĝ_W of [ĝ_W, ĝ_b]
        "transposed slice": base[:, :8].T,  # a Toeplitz product: [:, :d]ᵀ of its buffer
        "column": base[:, 8],
        "every other row": base[::2],
    }


def _unravel(index: int, shape: torch.Size) -> list[int]:
    """The coordinates of row-major position ``index`` in ``shape``."""
    coordinates = []
    for size in reversed(shape):
        coordinates.append(index % size)
        index //= size
    return coordinates[::-1]


@pytest.mark.parametrize("special", [*SPECIALS, None])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_extremes_are_those_of_a_contiguous_copy(special: float | None, layout: str) -> None:
    """``extremes`` of a view is ``aminmax`` of its contiguous copy, in every layout.

    Rule: exact (a minimum and a maximum are entries; NaN compared as NaN), with
    each special value at the first, an interior and the last entry of the view.
    """
    for position in (0, 30, -1):
        base = torch.randn(7, 9, generator=torch.Generator().manual_seed(position))
        view = _layouts(base)[layout]
        if special is not None:  # written through the view: an entry the view reads
            view[tuple(_unravel(position % view.numel(), view.shape))] = special
        low, high = extremes(view)
        expected_low, expected_high = torch.aminmax(view.contiguous())
        assert torch.equal(low, expected_low) or (low.isnan() and expected_low.isnan())
        assert torch.equal(high, expected_high) or (high.isnan() and expected_high.isnan())


@pytest.mark.parametrize("layout", ["column slice", "transposed slice"])
def test_a_padded_view_is_not_copied(layout: str) -> None:
    """A view whose rows are contiguous but padded is reduced row by row, not copied.

    Rule: exact: no ``clone``/``copy_``/``contiguous`` of the 64 × 65 view runs, and
    its reductions do (profiler).
    """
    base = torch.randn(64, 66)
    full_size = _full_size_ops(base[:, :65] if layout == "column slice" else base[:, :65].T)
    assert {"aten::amin", "aten::amax"} <= set(full_size)
    assert not set(full_size) & {"aten::clone", "aten::contiguous", "aten::copy_"}
