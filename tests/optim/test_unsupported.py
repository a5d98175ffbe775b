"""Parameters outside Linear/Conv2d: momentum SGD on the raw gradient, warned about once."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD


class _SubclassedLinear(nn.Linear):
    """A subclass may use its weight differently: it is not treated as supported."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(6, 4), nn.Linear(4, 3), nn.LayerNorm(3), _SubclassedLinear(3, 2)
    )


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    tokens = torch.randint(0, 6, (5,), generator=torch.Generator().manual_seed(step))
    return model(tokens).square().mean()


UNSUPPORTED = ["0.weight", "2.weight", "2.bias", "3.weight", "3.bias"]


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_one_warning_names_every_unsupported_parameter(cls):
    with pytest.warns(UserWarning, match="momentum SGD") as record:
        opt = cls(_model())
    assert len(record) == 1
    message = str(record[0].message)
    assert all(name in message for name in UNSUPPORTED)
    assert "1.weight" not in message
    assert opt.layer_names() == ["1"]


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_warn_unsupported_false_is_silent(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(_model(), warn_unsupported=False)


def test_fallback_update_is_momentum_sgd():
    """Fallback parameters follow ``torch.optim.SGD`` (momentum, weight decay, no dampening).

    Both apply the same three elementwise operations in the same order, so
    they agree bitwise.
    """
    lr, momentum, weight_decay = 0.1, 0.8, 0.01
    model, reference = _model(), _model()
    opt = SINGD(model, lr=lr, momentum=momentum, weight_decay=weight_decay, warn_unsupported=False)
    sgd = torch.optim.SGD(
        [p for n, p in reference.named_parameters() if n in UNSUPPORTED],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        foreach=False,
    )
    for step in range(3):
        for model_, opt_ in ((model, opt), (reference, sgd)):
            opt_.zero_grad()
            _loss(model_, step).backward()
        opt.step()
        sgd.step()
        # the supported layer moves differently, so feed both models its weights
        reference[1].load_state_dict(model[1].state_dict())
    parameters = dict(model.named_parameters())
    for name, expected in reference.named_parameters():
        if name in UNSUPPORTED:
            assert torch.equal(parameters[name], expected), name  # rule: docstring (bitwise)


def test_parameter_outside_the_model_is_named_by_position():
    model = nn.Linear(2, 2)
    extra = nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match=r"param_groups\[0\]\[2\]"):
        opt = SINGD(model, params=[*model.parameters(), extra], lr=0.5, momentum=0.0)
    extra.grad = torch.ones(3)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert torch.equal(extra.detach(), torch.full((3,), 0.5))  # 1 − 0.5·1, exact
