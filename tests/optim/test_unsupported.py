"""Parameters outside Kronecker layers: momentum SGD on the raw gradient, warned about once."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD


class _SubclassedLinear(nn.Linear):
    """A subclass overriding ``forward`` may use its weight differently: not a Linear kind."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.tanh())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(6, 4), nn.Linear(4, 3), nn.LayerNorm(3), _SubclassedLinear(3, 2)
    )


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    tokens = torch.randint(0, 6, (5,), generator=torch.Generator().manual_seed(step))
    return model(tokens).square().mean()


UNSUPPORTED = ["0.weight", "2.weight", "2.bias", "3.weight", "3.bias"]
#: SINGD preconditions the embedding (a diagonal input factor) and the LayerNorm
#: (elementwise); KFAC, with dense factors only, leaves both to the fallback.
SUPPORTED = {SINGD: ["0", "1"], KFAC: ["1"]}
FALLBACK = {SINGD: ["3.weight", "3.bias"], KFAC: UNSUPPORTED}


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_one_warning_names_every_unsupported_parameter(cls):
    with pytest.warns(UserWarning, match="momentum SGD") as record:
        opt = cls(_model())
    assert len(record) == 1
    message = str(record[0].message)
    assert all(name in message for name in FALLBACK[cls])
    assert ("2.weight" in message) == (cls is KFAC)
    assert "1.weight" not in message
    assert ("'0' falls back: KFAC keeps dense factors" in message) == (cls is KFAC)
    assert opt.layer_names() == SUPPORTED[cls]


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_warn_unsupported_false_is_silent(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(_model(), warn_unsupported=False)


def _fallback_matches_torch(
    fallback: str, make_torch: Callable[..., torch.optim.Optimizer]
) -> None:
    """SINGD's fallback parameters take the same steps as ``make_torch`` on them, bitwise."""
    lr, momentum, weight_decay = 0.1, 0.8, 0.01
    model, reference = _model(), _model()
    opt = SINGD(
        model,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        warn_unsupported=False,
        fallback=fallback,
    )
    fallback_names = FALLBACK[SINGD]
    torch_opt = make_torch(
        [p for n, p in reference.named_parameters() if n in fallback_names],
        lr=lr,
        weight_decay=weight_decay,
    )
    for step in range(3):
        for model_, opt_ in ((model, opt), (reference, torch_opt)):
            opt_.zero_grad()
            _loss(model_, step).backward()
        opt.step()
        torch_opt.step()
        # the preconditioned layers move differently, so feed both models their weights
        for index in (0, 1, 2):
            reference[index].load_state_dict(model[index].state_dict())
    parameters = dict(model.named_parameters())
    for name, expected in reference.named_parameters():
        if name in fallback_names:
            assert torch.equal(parameters[name], expected), name  # rule: docstring (bitwise)


def test_fallback_update_is_momentum_sgd():
    """The default fallback follows ``torch.optim.SGD`` (momentum, weight decay, no dampening).

    Both apply the same three elementwise operations in the same order, so
    they agree bitwise.
    """
    _fallback_matches_torch(
        "sgd", lambda params, **kw: torch.optim.SGD(params, momentum=0.8, foreach=False, **kw)
    )


def test_fallback_adamw_is_torch_adamw():
    """``fallback="adamw"`` follows ``torch.optim.AdamW`` (single-tensor kernel), bitwise.

    Same elementwise operations in the same order (``updates.adamw_parameter_update``).
    """
    _fallback_matches_torch(
        "adamw", lambda params, **kw: torch.optim.AdamW(params, foreach=False, **kw)
    )


def test_fallback_adamw_checkpoint_round_trip():
    model = _model()
    opt = SINGD(model, warn_unsupported=False, fallback="adamw")
    _loss(model, 0).backward()
    opt.step()
    clone = SINGD(_model(), warn_unsupported=False, fallback="adamw")
    clone.load_state_dict(opt.state_dict())
    saved = opt.state_dict()["state"]
    assert any("exp_avg" in entry for entry in saved.values())
    for index, entry in clone.state_dict()["state"].items():
        for key, value in entry.items():
            expected = saved[index][key]
            assert (
                torch.equal(value, expected)
                if isinstance(value, torch.Tensor)
                else value == expected
            )


@pytest.mark.parametrize("bad", ["adam", None, 3])
def test_unknown_fallback_is_rejected(bad):
    with pytest.raises(ValueError, match="fallback must be one of"):
        SINGD(_model(), warn_unsupported=False, fallback=bad)


def test_parameter_outside_the_model_is_named_by_position():
    model = nn.Linear(2, 2)
    extra = nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match=r"param_groups\[0\]\[2\]"):
        opt = SINGD(model, params=[*model.parameters(), extra], lr=0.5, momentum=0.0)
    extra.grad = torch.ones(3)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert torch.equal(extra.detach(), torch.full((3,), 0.5))  # 1 − 0.5·1, exact
