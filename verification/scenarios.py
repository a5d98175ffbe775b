"""Scenarios as data: small models, their data, and the grids ``singd-verify`` runs.

A :class:`Scenario` is a model factory plus its data and statistics settings;
a :class:`Case` adds the optimizer variant, the structures of ``K`` and ``C``,
the dtype and the number of steps.  :data:`GRIDS` names tuples of cases:
``quick`` (a handful, for the command's own test), ``default`` (a
representative cut through structure × dtype × layer × mode, about a minute
on two cores) and ``full`` (the product).  :func:`run_and_replay` records a
case with :mod:`verification.recording` and replays it with
:mod:`verification.replay`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from reference.updates import SINGDHyperparameters, SINGDState
from singd import SINGD
from verification.recording import LossFunction, RecordedRun, record_run
from verification.replay import replay_singd
from verification.tolerances import EPS

#: Hyper-parameters shared by the torch optimizer and the oracle, per variant.
#: Small ``lr_cov`` keeps the factor maps near-contractive (verification.comparison).
BASE_HYPER = {
    "lr": 0.05,
    "momentum": 0.5,
    "damping": 1e-3,
    "alpha1": 0.5,
    "weight_decay": 0.0,
    "T": 1,
    "lr_cov": 0.02,
    "kfac_like": False,
    "normalize_lr_cov": False,
    "structures": ("dense", "dense"),
}


def beta1_schedule(steps: int) -> float:
    """A decaying ``β1`` schedule of the completed steps."""
    return 0.03 / (1 + 0.1 * steps)


#: The ``factor_guard`` of every recorded SINGD run: the optimizer's default.
FACTOR_GUARD = "compensated"

#: SPEC §1.3/§1.4 modes as overrides of :data:`BASE_HYPER`.
VARIANTS: dict[str, dict[str, object]] = {
    "singd": {},
    "ikfac": {"kfac_like": True, "alpha1": 0.0},
    "normalized": {"normalize_lr_cov": True, "lr_cov": 0.05},
    "ikfac-normalized": {"kfac_like": True, "alpha1": 0.0, "normalize_lr_cov": True},
    "schedule": {"lr_cov": beta1_schedule},
    "T3": {"T": 3},
    "weight-decay": {"weight_decay": 0.1},
    "alpha1-0": {"alpha1": 0.0},
}

#: ``(K, C)`` structure pairs: blocks and hierarchies that split the small layers,
#: Toeplitz, triangular and recursive forms.
STRUCTURE_PAIRS: tuple[tuple[str, str], ...] = (
    ("dense", "dense"),
    ("diagonal", "dense"),
    ("block2diagonal", "block3diagonal"),
    ("hierarchical2_3", "hierarchical1_1"),
    ("triltoeplitz", "triutoeplitz"),
    ("tril", "triu"),
    ("trilbottomrightdiagonal", "triutopleftdiagonal"),
    ("triltopleftdiagonal", "triubottomrightdiagonal"),
)

#: ``(K, C)`` pairs of the embedding scenarios: ``K`` is diagonal whatever the group names
#: (SPEC-layers, Embedding), so only pairs that name it compare like with like.
EMBEDDING_PAIRS: tuple[tuple[str, str], ...] = (
    ("diagonal", "dense"),
    ("diagonal", "triu"),
)


#: ``twin``'s extra pair: both factors diagonal, the batched step (:mod:`singd.optim.batched`).
TWIN_PAIRS: tuple[tuple[str, str], ...] = (("diagonal", "diagonal"),)


def any_structure(scenario: str) -> bool:
    """Whether every structure pair (and KFAC) applies to ``scenario`` (not an embedding's)."""
    return SCENARIOS[scenario].vocab is None


def structure_pairs(scenario: str) -> tuple[tuple[str, str], ...]:
    """The structure pairs a scenario is run with in the full grid."""
    if not any_structure(scenario):
        return EMBEDDING_PAIRS
    extra = {"wide": WIDE_PAIRS, "twin": TWIN_PAIRS}.get(scenario, ())
    return STRUCTURE_PAIRS + extra


#: The dtypes of model and factors, by name.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Scenario:
    """A model, its data and the statistics settings of one recorded run.

    Attributes:
        name: Identifier.
        description: What the layers see (for reports).
        make_model: Builds the float32 model (seeded by the caller).
        input_shape: Shape of one micro-batch of inputs; targets match the output.
        approx: KFAC flavour of the statistics.
        loss_average: Loss reduction (also used to scale the loss itself).
        micro_batches: Backward passes per step (gradient accumulation).
        vocab: Inputs are token indices in ``[0, vocab)`` (an embedding), not floats.
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    approx: str = "expand"
    loss_average: str | None = "batch"
    micro_batches: int = 1
    vocab: int | None = None


def mlp(bias: bool = True) -> nn.Module:
    """Linear(6→5) – tanh – Linear(5→3)."""
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias))


def conv_net() -> nn.Module:
    """Conv2d(4→4, 3×3, stride 2, pad 1, 2 groups) – tanh – flatten – Linear(36→3)."""
    return nn.Sequential(
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3, bias=False),
    )


def conv1d_net() -> nn.Module:
    """Conv1d(3→4, k 3, stride 2, pad 1, dilation 1) – tanh – Conv1d(4→2, k 2, dilation 2)."""
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Conv1d(4, 2, 2, dilation=2)
    )


def conv3d_net() -> nn.Module:
    """Conv3d(2→3, k 2, stride (1, 2, 1), pad 1, no bias) – tanh – flatten – Linear(→3)."""
    return nn.Sequential(
        nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 3 * 4, 3),
    )


def embedding_net() -> nn.Module:
    """Embedding(6, 4, padding_idx=0): one-hot inputs, repeated tokens and padding."""
    return nn.Sequential(nn.Embedding(6, 4, padding_idx=0))


class SelfAttention(nn.Module):
    """``MultiheadAttention(6, 2, batch_first=True)`` on ``(x, x, x)``, no weights returned."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def twin_mlp() -> nn.Module:
    """Linear(5→5) – tanh – Linear(5→5) – tanh – Linear(5→3): two layers of one shape."""
    return nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))


def wide_mlp() -> nn.Module:
    """Linear(64→64) – tanh – Linear(64→48): every factor has ``d >= 48`` (Toeplitz FFT path)."""
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 48))


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario("mlp", "MLP 6-5-3, x [4, 6]", mlp, (4, 6)),
        Scenario(
            "mlp-nobias-sum",
            "MLP without bias, sum loss",
            lambda: mlp(False),
            (4, 6),
            loss_average=None,
        ),
        Scenario(
            "seq-expand",
            "MLP on [B,S,d] = [3, 4, 6], KFAC-expand",
            mlp,
            (3, 4, 6),
            "expand",
            "batch+sequence",
        ),
        Scenario("seq-reduce", "MLP on [B,S,d] = [3, 4, 6], KFAC-reduce", mlp, (3, 4, 6), "reduce"),
        Scenario("conv", "Conv2d (stride, padding, groups) + Linear", conv_net, (2, 4, 5, 5)),
        Scenario("mlp-accumulate", "MLP, 2 micro-batches per step", mlp, (3, 6), micro_batches=2),
        Scenario(
            "twin",
            "MLP 5-5-5-3, x [4, 5]: two same-shaped layers (diagonal: one batched step)",
            twin_mlp,
            (4, 5),
        ),
        Scenario("wide", "MLP 64-64-48, x [256, 64] (Toeplitz FFT path)", wide_mlp, (256, 64)),
        Scenario(
            "conv1d", "Conv1d (stride, padding, dilation) ×2, x [2, 3, 9]", conv1d_net, (2, 3, 9)
        ),
        Scenario(
            "conv3d",
            "Conv3d (stride, padding) + Linear, x [2, 2, 3, 5, 3]",
            conv3d_net,
            (2, 2, 3, 5, 3),
        ),
        Scenario(
            "attention",
            "MultiheadAttention(6, 2) self-attention on [3, 4, 6]: q, k, v, out_proj",
            SelfAttention,
            (3, 4, 6),
        ),
        Scenario(
            "embedding",
            "Embedding(6, 4, padding_idx=0) on tokens [3, 5]",
            embedding_net,
            (3, 5),
            vocab=6,
        ),
        Scenario(
            "embedding-reduce",
            "Embedding(6, 4, padding_idx=0) on tokens [3, 5], KFAC-reduce",
            embedding_net,
            (3, 5),
            "reduce",
            vocab=6,
        ),
    )
}


def loss_terms(shape: tuple[int, ...], loss_average: str | None, tokens: bool = False) -> int:
    """Number of terms the loss is averaged over (matches SPEC §1.1's ``N``).

    ``tokens``: ``shape`` is that of token indices (no feature dim).
    """
    if loss_average == "batch":
        return shape[0]
    if loss_average == "batch+sequence":
        return int(np.prod(shape if tokens else shape[:-1]))
    return 1


def loss_function(scenario: Scenario, dtype: torch.dtype) -> LossFunction:
    """Squared error on fresh seeded data per call, averaged like ``scenario.loss_average``."""
    generator = torch.Generator().manual_seed(1)
    vocab = scenario.vocab
    terms = loss_terms(scenario.input_shape, scenario.loss_average, vocab is not None)

    def loss_fn(module: nn.Module, index: int) -> Tensor:
        if vocab is None:
            inputs = torch.randn(scenario.input_shape, generator=generator).to(dtype)
        else:  # tokens: repeats (more positions than tokens) and the padding index 0
            inputs = torch.randint(0, vocab, scenario.input_shape, generator=generator)
        outputs = module(inputs)
        targets = torch.randn(outputs.shape, generator=generator).to(dtype)
        return 0.5 * ((outputs - targets) ** 2).sum() / terms

    return loss_fn


def make_singd(
    model: nn.Module,
    scenario: Scenario,
    hyper: SINGDHyperparameters,
    preconditioner_dtype: torch.dtype | None = None,
    factor_guard: str | None = FACTOR_GUARD,
) -> SINGD:
    """SINGD on ``model`` with the oracle's ``hyper`` and ``scenario``'s statistics settings.

    ``factor_guard``: by default :data:`FACTOR_GUARD`, SINGD's own default (the
    compensated factor step for bf16/fp16 factors, which
    :mod:`verification.bounds` models).
    """
    return SINGD(
        model,
        lr=hyper.lr,
        momentum=hyper.momentum,
        damping=hyper.damping,
        alpha1=hyper.alpha1,
        weight_decay=hyper.weight_decay,
        T=hyper.T,
        lr_cov=hyper.lr_cov,
        kfac_like=hyper.kfac_like,
        normalize_lr_cov=hyper.normalize_lr_cov,
        structures=hyper.structures,
        loss_average=scenario.loss_average,
        kfac_approx=scenario.approx,
        preconditioner_dtype=(preconditioner_dtype, preconditioner_dtype),
        factor_guard=factor_guard,
    )


def record(
    scenario: Scenario,
    hyper_overrides: dict[str, object],
    dtype: torch.dtype = torch.float64,
    preconditioner_dtype: torch.dtype | None = None,
    steps: int = 20,
    factor_guard: str | None = FACTOR_GUARD,
) -> tuple[RecordedRun, SINGDHyperparameters]:
    """Record ``steps`` steps of SINGD on ``scenario`` (the torch side of :func:`run_and_replay`).

    Returns:
        The recording and the hyper-parameters.
    """
    torch.manual_seed(0)
    model = scenario.make_model().to(dtype)
    hyper = SINGDHyperparameters(**{**BASE_HYPER, **hyper_overrides})
    optimizer = make_singd(model, scenario, hyper, preconditioner_dtype, factor_guard)
    loss_fn = loss_function(scenario, dtype)
    return record_run(model, optimizer, loss_fn, steps, scenario.micro_batches), hyper


def run_and_replay(
    scenario: Scenario,
    hyper_overrides: dict[str, object],
    dtype: torch.dtype = torch.float64,
    preconditioner_dtype: torch.dtype | None = None,
    steps: int = 20,
    factor_guard: str | None = FACTOR_GUARD,
) -> tuple[RecordedRun, dict[str, list[SINGDState]], SINGDHyperparameters]:
    """Record ``steps`` steps of SINGD on ``scenario`` and replay them through the oracle.

    Returns:
        The recording, the oracle trajectory of every layer, the hyper-parameters.
    """
    run, hyper = record(scenario, hyper_overrides, dtype, preconditioner_dtype, steps, factor_guard)
    oracle = replay_singd(run, hyper, scenario.approx, scenario.loss_average)
    return run, oracle, hyper


# ------------------------------------------------------------------- grids
@dataclass(frozen=True)
class Case:
    """One comparison of the torch optimizer with the oracle.

    Attributes:
        scenario: Key of :data:`SCENARIOS`.
        variant: Key of :data:`VARIANTS`.
        structures: ``(K, C)`` structure names.
        dtype: Model dtype (key of :data:`DTYPES`).
        factor_dtype: Dtype of ``K``, ``C`` when it differs from the model's.
        steps: Optimizer steps.
    """

    scenario: str
    variant: str
    structures: tuple[str, str] = ("dense", "dense")
    dtype: str = "float64"
    factor_dtype: str | None = None
    steps: int = 20

    @property
    def name(self) -> str:
        """``scenario/variant/K-C``, the case's identifier within its precision."""
        return f"{self.scenario}/{self.variant}/{'-'.join(self.structures)}"

    @property
    def precision(self) -> str:
        """``dtype``, or ``dtype+factor_dtype factors`` for mixed precision."""
        if self.factor_dtype is None:
            return self.dtype
        return f"{self.dtype}+{self.factor_dtype} factors"

    @property
    def bound_dtype(self) -> torch.dtype:
        """The coarsest dtype of model and factors: the ``eps`` of the bound."""
        names = [self.dtype] if self.factor_dtype is None else [self.dtype, self.factor_dtype]
        return max((DTYPES[name] for name in names), key=EPS.__getitem__)


#: Layers (Linear, Linear on [B,S,d] expand / reduce, Conv2d) and modes of the default grid.
DEFAULT_LAYERS = ("mlp", "seq-expand", "seq-reduce", "conv")
DEFAULT_MODES = ("singd", "ikfac", "normalized", "T3")


#: Structure pairs of the wide layers (d >= 64: Toeplitz on the FFT path, blocks, hierarchies).
WIDE_PAIRS: tuple[tuple[str, str], ...] = (
    ("dense", "dense"),
    ("triltoeplitz", "triutoeplitz"),
    ("block30diagonal", "hierarchical15_15"),
    ("tril", "triltopleftdiagonal"),
)


def default_grid() -> tuple[Case, ...]:
    """Layers × modes × structure pairs × dtypes, plus float32 with bfloat16 factors.

    Plus the layer kinds of SPEC-layers (Conv1d, Conv3d, Embedding expand /
    reduce, MultiheadAttention) in two modes and three (embedding: two) structure pairs, eight
    steps each, in every dtype.

    Plus the ``wide`` layers (widths 64 and 48 on 256 rows: reductions of 256,
    the Toeplitz FFT path) in two modes, six steps each, in every precision.

    Plus ``twin`` (two 5 × 5 layers) with diagonal factors in every default
    mode and dtype, eight steps: the batched factor step of
    :mod:`singd.optim.batched` on a batch of two (float32/float64 factors).
    """
    cases = [
        Case(scenario, variant, structures, dtype)
        for dtype, scenario, variant, structures in itertools.product(
            DTYPES, DEFAULT_LAYERS, DEFAULT_MODES, STRUCTURE_PAIRS
        )
    ]
    cases += [
        Case("mlp", variant, structures, "float32", "bfloat16")
        for variant, structures in itertools.product(("singd", "ikfac"), STRUCTURE_PAIRS)
    ]
    cases += [
        Case("wide", variant, structures, dtype, factor_dtype, steps=6)
        for (dtype, factor_dtype), variant, structures in itertools.product(
            [(name, None) for name in DTYPES] + [("float32", "bfloat16")],
            ("singd", "ikfac"),
            WIDE_PAIRS,
        )
    ]
    cases += [
        Case(scenario, variant, structures, dtype, steps=8)
        for dtype, scenario, variant in itertools.product(DTYPES, KIND_LAYERS, ("singd", "ikfac"))
        for structures in (EMBEDDING_PAIRS if SCENARIOS[scenario].vocab is not None else KIND_PAIRS)
    ]
    cases += [
        Case("twin", variant, structures, dtype, steps=8)
        for dtype, variant, structures in itertools.product(DTYPES, DEFAULT_MODES, TWIN_PAIRS)
    ]
    return tuple(cases)


#: The layer-kind scenarios of the default grid and their structure pairs (SPEC-layers).
KIND_LAYERS = ("conv1d", "conv3d", "embedding", "embedding-reduce", "attention")
KIND_PAIRS: tuple[tuple[str, str], ...] = (
    ("dense", "dense"),
    ("block2diagonal", "block3diagonal"),
    ("tril", "triu"),
)


def quick_grid() -> tuple[Case, ...]:
    """One case per dtype (for the command's test): dense MLP, block/hierarchical conv."""
    return (
        Case("mlp", "singd", dtype="float64", steps=6),
        Case("conv", "ikfac", ("hierarchical2_3", "block3diagonal"), "float32", steps=6),
        Case("seq-reduce", "T3", ("tril", "triu"), "bfloat16", steps=6),
        Case("mlp", "normalized", ("triltoeplitz", "diagonal"), "float16", steps=6),
        Case("wide", "singd", ("triltoeplitz", "triutoeplitz"), "bfloat16", steps=3),
    )


def full_grid() -> tuple[Case, ...]:
    """The product scenario × variant × structure pair × dtype (``wide`` also with its pairs)."""
    return tuple(
        Case(scenario, variant, structures, dtype)
        for dtype, scenario, variant in itertools.product(DTYPES, SCENARIOS, VARIANTS)
        for structures in dict.fromkeys(structure_pairs(scenario))
    )


#: The grids ``singd-verify --grid`` can run.
GRIDS: dict[str, Callable[[], tuple[Case, ...]]] = {
    "quick": quick_grid,
    "default": default_grid,
    "full": full_grid,
}
