"""Live read-only views of an optimizer's state under the public singd package's names.

``SINGD.Ks``, ``Cs``, ``m_Ks``, ``m_Cs`` (layer name → structured factor) and
``module_names`` (module → layer name) are :class:`FactorView` and
:class:`ModuleNameView` objects.  They copy nothing: every lookup reads the
optimizer's current state, so a view kept across ``step()`` or
``load_state_dict()`` never goes stale.  The factor *objects* they return are
the live ones of that moment; a step replaces them by new objects rather than
changing them, so look a factor up again after a step.  Writing through a view
raises ``TypeError``: the state changes only through ``step()`` and
``load_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

from torch import nn

from singd.optim.layers import Layer
from singd.structures import StructuredMatrix


def _read_only(attribute: str) -> NoReturn:
    """Raise the ``TypeError`` of a write through the view ``attribute``."""
    raise TypeError(
        f"{attribute} is a read-only view of the optimizer's state; it changes only through "
        "step() and load_state_dict()"
    )


class FactorView(Mapping[str, StructuredMatrix]):
    """Layer name → one factor (``K``, ``C``, ``m_K`` or ``m_C``) of its live state.

    Args:
        attribute: the public attribute name, for error messages (e.g. ``"SINGD.Ks"``).
        states: the optimizer's layer name → layer state dict (not copied).
        factor: the key of the factor in a layer state.
        includes: whether a layer is in the view (``m_Ks`` holds only layers
            whose group has ``alpha1 != 0``, as in the public package).
    """

    def __init__(
        self,
        attribute: str,
        states: Mapping[str, Mapping[str, Any]],
        factor: str,
        includes: Callable[[str], bool],
    ) -> None:
        self._attribute = attribute
        self._states = states
        self._factor = factor
        self._includes = includes

    def __getitem__(self, name: str) -> StructuredMatrix:
        if name not in self._states or not self._includes(name):
            raise KeyError(name)
        return self._states[name][self._factor]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._states if self._includes(name))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, name: str, value: object) -> NoReturn:
        _read_only(self._attribute)

    def __delitem__(self, name: str) -> NoReturn:
        _read_only(self._attribute)

    def __repr__(self) -> str:
        return f"{self._attribute}({dict(self)!r})"


class ModuleNameView(Mapping[nn.Module, str]):
    """Kronecker-preconditioned module → its qualified name, in module order.

    Args:
        attribute: the public attribute name, for error messages.
        layers: the optimizer's layer name → :class:`~singd.optim.layers.Layer` dict (not copied).
    """

    def __init__(self, attribute: str, layers: Mapping[str, Layer]) -> None:
        self._attribute = attribute
        self._layers = layers

    def __getitem__(self, module: nn.Module) -> str:
        for name, layer in self._layers.items():
            if layer.module is module:
                return name
        raise KeyError(module)

    def __iter__(self) -> Iterator[nn.Module]:
        return (layer.module for layer in self._layers.values())

    def __len__(self) -> int:
        return len(self._layers)

    def __setitem__(self, module: nn.Module, name: object) -> NoReturn:
        _read_only(self._attribute)

    def __delitem__(self, module: nn.Module) -> NoReturn:
        _read_only(self._attribute)

    def __repr__(self) -> str:
        return f"{self._attribute}({dict(self)!r})"
