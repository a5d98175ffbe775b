"""The public package's optimizer attributes: live read-only views and ``set_current_grad_scale``.

Tolerance rule: scaling a loss by ``s = 4^8`` multiplies every gradient by a
power of two and ``sqrt(s)`` is one too, so a run with ``(s · loss)`` and
``set_current_grad_scale(s)`` equals the unscaled run bitwise (no overflow or
underflow at these magnitudes).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd.optim.optimizer import SINGD
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix
from tests.optim.nested import same_state, state_snapshot

SCALE = 4.0**8


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _backward(model: nn.Module, step: int, scale: float = 1.0) -> None:
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
    (scale * model(x).square().mean()).backward()


def _step(opt: SINGD, model: nn.Module, step: int) -> None:
    opt.zero_grad()
    _backward(model, step)
    opt.step()


def test_views_hold_every_layer_by_name_and_follow_the_state() -> None:
    model = _model()
    opt = SINGD(model, structures=("diagonal", "dense"), T=1, lr_cov=0.1)
    Ks, Cs, names = opt.Ks, opt.Cs, opt.module_names
    assert list(Ks) == list(Cs) == opt.layer_names() == ["0", "2"]
    assert dict(names) == {model[0]: "0", model[2]: "2"}
    assert list(names.values()) == list(Ks)
    assert isinstance(Ks["0"], DiagonalMatrix) and isinstance(Cs["2"], DenseMatrix)
    before = Ks["0"]
    _step(opt, model, 0)
    for name in opt.layer_names():  # views kept across a step read the new factors
        state = opt.layer_state(name)
        assert Ks[name] is state["K"] and Cs[name] is state["C"]
        assert opt.m_Ks[name] is state["m_K"] and opt.m_Cs[name] is state["m_C"]
    assert not torch.equal(before.to_dense(), Ks["0"].to_dense())
    assert opt.steps == 1


def test_momenta_views_hold_only_groups_with_riemannian_momentum() -> None:
    model = _model()
    groups = [
        {"params": model[0].parameters(), "alpha1": 0.0},
        {"params": model[2].parameters(), "alpha1": 0.5},
    ]
    opt = SINGD(model, groups)
    assert list(opt.m_Ks) == list(opt.m_Cs) == ["2"]
    assert "0" not in opt.m_Ks and len(opt.m_Ks) == 1
    with pytest.raises(KeyError):
        opt.m_Ks["0"]


@pytest.mark.parametrize("attribute", ["Ks", "Cs", "m_Ks", "m_Cs"])
def test_factor_views_reject_writes_and_deletes(attribute: str) -> None:
    opt = SINGD(_model())
    view = getattr(opt, attribute)
    factor = view["0"]
    with pytest.raises(TypeError, match=rf"SINGD\.{attribute} is a read-only view"):
        view["0"] = factor
    with pytest.raises(TypeError, match="read-only"):
        del view["0"]
    with pytest.raises(AttributeError):
        setattr(opt, attribute, {})
    assert view["0"] is factor


def test_module_names_rejects_writes() -> None:
    model = _model()
    opt = SINGD(model)
    with pytest.raises(TypeError, match=r"SINGD\.module_names is a read-only view"):
        opt.module_names[model[0]] = "x"
    with pytest.raises(TypeError, match="read-only"):
        del opt.module_names[model[0]]
    assert opt.module_names[model[0]] == "0"
    with pytest.raises(KeyError):
        opt.module_names[model[1]]  # the ReLU is not preconditioned


def test_views_follow_layers_of_an_added_param_group() -> None:
    model = _model()
    opt = SINGD(model, model[0].parameters())
    Ks = opt.Ks
    assert list(Ks) == ["0"]
    opt.add_param_group({"params": model[2].parameters(), "structures": ("diagonal", "diagonal")})
    assert list(Ks) == ["0", "2"] and isinstance(Ks["2"], DiagonalMatrix)
    assert list(opt.module_names.values()) == ["0", "2"]


def test_set_current_grad_scale_equals_the_unscaled_run_bitwise() -> None:
    plain_model, scaled_model = _model(), _model()
    plain = SINGD(plain_model, T=2, lr=0.05, lr_cov=0.1)
    scaled = SINGD(scaled_model, T=2, lr=0.05, lr_cov=0.1, init_grad_scale=SCALE)
    for step in range(5):
        _step(plain, plain_model, step)
        scaled.zero_grad()
        _backward(scaled_model, step, scale=SCALE)
        scaled.set_current_grad_scale(SCALE)
        scaled.step()
    for p, q in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for name in plain.layer_names():
        assert torch.equal(plain.Ks[name].to_dense(), scaled.Ks[name].to_dense())
        assert torch.equal(plain.Cs[name].to_dense(), scaled.Cs[name].to_dense())


def test_set_current_grad_scale_applies_to_one_step() -> None:
    plain_model, scaled_model = _model(), _model()
    plain = SINGD(plain_model, T=1, lr_cov=0.1)
    scaled = SINGD(scaled_model, T=1, lr_cov=0.1, init_grad_scale=SCALE)
    _step(plain, plain_model, 0)
    scaled.zero_grad()
    _backward(scaled_model, 0, scale=SCALE)
    scaled.set_current_grad_scale(SCALE)
    scaled.step()
    scaled.set_current_grad_scale(1.0)  # the next backward is unscaled: s_div is SCALE
    for opt, model in ((plain, plain_model), (scaled, scaled_model)):
        _step(opt, model, 1)
    for p, q in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "2", None])
def test_set_current_grad_scale_rejects_bad_values_and_keeps_the_declared_one(bad: object) -> None:
    models = [_model(), _model()]
    opts = [SINGD(model, T=1, lr_cov=0.1, init_grad_scale=SCALE) for model in models]
    for opt, model in zip(opts, models, strict=True):
        _backward(model, 0, scale=SCALE)
        opt.set_current_grad_scale(SCALE)
    with pytest.raises(ValueError, match="grad_scale must"):
        opts[0].set_current_grad_scale(bad)  # type: ignore[arg-type]
    for opt in opts:
        opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_set_current_grad_scale_disagreeing_with_a_scaler_raises_before_any_change() -> None:
    model = _model()
    opt = SINGD(model, T=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaler.scale(model(torch.randn(8, 5)).square().mean()).backward()
    opt.set_current_grad_scale(2.0)
    before = state_snapshot(opt, model)
    with pytest.raises(ValueError, match="disagrees with the GradScaler's scale"):
        scaler.step(opt)
    assert same_state(before, state_snapshot(opt, model))
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_set_current_grad_scale_after_unscale_gives_the_statistics_scale() -> None:
    """Public-package style clipping: declare the scale, ``unscale_``, clip, ``scaler.step``."""
    declared_model, attached_model = _model(), _model()
    declared = SINGD(declared_model, T=1, lr_cov=0.1, init_grad_scale=SCALE)
    attached = SINGD(attached_model, T=1, lr_cov=0.1, init_grad_scale=SCALE)
    scalers = [torch.amp.GradScaler("cpu", init_scale=SCALE) for _ in range(2)]
    attached.attach_grad_scaler(scalers[1])
    for step in range(3):
        for opt, model, scaler in zip(
            (declared, attached), (declared_model, attached_model), scalers, strict=True
        ):
            opt.zero_grad()
            x = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
            scaler.scale(model(x).square().mean()).backward()
            if opt is declared:
                opt.set_current_grad_scale(scaler.get_scale())
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
    for p, q in zip(declared_model.parameters(), attached_model.parameters(), strict=True):
        assert torch.equal(p, q)
