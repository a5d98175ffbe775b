"""A client written in the public singd 0.0.5 documentation's style trains unchanged on ours.

It follows the package's advanced example (synthetic data instead of MNIST,
CPU ``GradScaler``): public import paths, two param groups with different
structures, ``AdamW`` for the batch-norm parameters, ``GradScaler`` with a
matching ``init_grad_scale``, bf16 ``autocast``, gradient accumulation over
micro-batches, an ``ExponentialLR`` scheduler, then the documented
``Ks``/``module_names`` inspection.  Training must cut the loss clearly
(a margin, not a tolerance: the run is seeded and deterministic).
"""

from __future__ import annotations

import math

import torch
from torch import autocast, bfloat16, manual_seed, zeros_like
from torch.nn import BatchNorm1d, Conv2d, CrossEntropyLoss, Flatten, Linear, ReLU, Sequential
from torch.optim import AdamW
from torch.optim.lr_scheduler import ExponentialLR

from singd.optim.optimizer import SINGD
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix
from tests.tolerances import EPS

MICRO_BATCH_SIZE = 6
ITERS_TO_ACCUMULATE = 4
BATCH_SIZE = MICRO_BATCH_SIZE * ITERS_TO_ACCUMULATE
STEPS = 40
CLASSES = 4


def _data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four fixed batches, cycled, labelled by a fixed random teacher (so training can fit)."""
    teacher = torch.randn(CLASSES, 1 * 12 * 12, generator=torch.Generator().manual_seed(1))
    batches = []
    for index in range(4):
        inputs = torch.randn(BATCH_SIZE, 1, 12, 12, generator=torch.Generator().manual_seed(index))
        batches.append((inputs, (inputs.flatten(1) @ teacher.T).argmax(1)))
    return [batches[step % 4] for step in range(steps)]


def test_advanced_example_style_client_trains() -> None:
    manual_seed(0)
    model = Sequential(
        Conv2d(1, 3, kernel_size=5, stride=2),
        ReLU(),
        Flatten(),
        Linear(48, 32),
        BatchNorm1d(32),
        Linear(32, 16),
        ReLU(),
        Linear(16, CLASSES),
    )
    loss_func = CrossEntropyLoss()
    conv_params = [
        p
        for m in model.modules()
        if isinstance(m, Conv2d)
        for p in m.parameters()
        if p.requires_grad
    ]
    linear_params = [
        p
        for m in model.modules()
        if isinstance(m, Linear)
        for p in m.parameters()
        if p.requires_grad
    ]
    ptrs = [p.data_ptr() for p in conv_params + linear_params]
    other_params = [p for p in model.parameters() if p.data_ptr() not in ptrs and p.requires_grad]
    singd_hyperparams = {
        "lr": 2e-2,
        "damping": 1e-4,
        "momentum": 0.9,
        "weight_decay": 1e-2,
        "lr_cov": 1e-2,
        "loss_average": "batch",
        "T": 1,
        "alpha1": 0.5,
        "structures": ("dense", "dense"),
    }
    conv_group = {"params": conv_params, **singd_hyperparams}
    linear_group = {"params": linear_params, **singd_hyperparams}
    linear_group["structures"] = ("diagonal", "diagonal")
    init_grad_scale = 1024.0
    singd = SINGD(model, params=[conv_group, linear_group], init_grad_scale=init_grad_scale)
    adamw = AdamW(other_params, lr=2e-2, weight_decay=1e-2)
    scaler_singd = torch.amp.GradScaler("cpu", init_scale=init_grad_scale)
    scaler_adamw = torch.amp.GradScaler("cpu", init_scale=init_grad_scale)
    scheduler_singd = ExponentialLR(singd, gamma=0.99)
    scheduler_adamw = ExponentialLR(adamw, gamma=0.99)

    losses = []
    for inputs, target in _data(STEPS):
        singd.zero_grad()
        adamw.zero_grad()
        total = 0.0
        for inputs_micro, target_micro in zip(
            inputs.split(MICRO_BATCH_SIZE), target.split(MICRO_BATCH_SIZE), strict=True
        ):
            with autocast(device_type="cpu", dtype=bfloat16):
                loss = loss_func(model(inputs_micro), target_micro)
                loss *= MICRO_BATCH_SIZE / BATCH_SIZE
            total += loss.item()
            loss = scaler_singd.scale(loss)
            _ = scaler_adamw.scale(zeros_like(loss))
            loss.backward()
        losses.append(total)
        scaler_singd.step(singd)
        scaler_adamw.step(adamw)
        scaler_singd.update()
        scaler_adamw.update()
        scheduler_singd.step()
        scheduler_adamw.step()

    assert singd.steps == STEPS
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses
    # the scheduler multiplies by γ once per step: STEPS float64 roundings
    expected_lr = 2e-2 * 0.99**STEPS
    lr = singd.param_groups[1]["lr"]
    assert math.isclose(lr, expected_lr, rel_tol=STEPS * EPS[torch.float64])

    seen = []
    for name, module in model.named_modules():
        if name in singd.module_names.values():
            seen.append(name)
            assert singd.module_names[module] == name
            assert singd.Ks[name].to_dense().shape == (module.weight[0].numel() + 1,) * 2
            assert singd.Cs[name].to_dense().shape == (module.weight.shape[0],) * 2
            assert name in singd.m_Ks and name in singd.m_Cs
        if isinstance(module, Linear):
            assert isinstance(singd.Ks[name], DiagonalMatrix)
        elif isinstance(module, Conv2d):
            assert isinstance(singd.Ks[name], DenseMatrix)
    assert seen == ["0", "3", "5", "7"]
