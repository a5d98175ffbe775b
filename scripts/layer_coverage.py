"""Which parameters of two transformer models SINGD preconditions how, and its iteration time.

Usage: ``python scripts/layer_coverage.py [--repeats 30] [--json PATH]``.

Models: ``nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)`` on tokens
from an ``nn.Embedding(100, 64)`` with a ``Linear(64, 10)`` head, and a small
ViT (``Conv2d(3, 64, 4, stride 4)`` patch embedding of 32×32 images, a class
token and position embedding, two pre-norm encoder layers, ``LayerNorm``,
``Linear(64, 10)`` head).  Each parameter is *Kronecker* (a layer kind with
dense factors), *Kronecker, diagonal K* (an embedding: its input factor is
diagonal whatever the structures), *elementwise k²* (LayerNorm scale and
shift: the diagonal inverse-free rule of SPEC-layers) or *fallback* (momentum
SGD), as the optimizer's layer table has them.  Time: the mean of ``--repeats`` training
iterations (forward, backward, ``step``; batch 16; one CPU thread) after two
warm-up iterations, SINGD with ``T = 1`` (statistics every step) and ``T = 10``
against ``torch.optim.AdamW``; ``--json`` writes
``{"repeats", "models": {name: {"parameters": {name: role}, "seconds": {...}}}}``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from singd import SINGD

BATCH = 16


class TokenEncoder(nn.Module):
    """Embedding → one TransformerEncoderLayer → Linear head (mean over positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 64)
        self.encoder = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embedding(tokens)).mean(dim=1))


class TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, two pre-norm layers, head."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 64, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 64))
        self.position = nn.Parameter(torch.zeros(1, 65, 64))
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.patches(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(images), -1, -1), tokens], dim=1)
        return self.head(self.norm(self.encoder(tokens + self.position))[:, 0])


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tensor]]] = {
    "TransformerEncoderLayer": (
        TokenEncoder,
        lambda gen: torch.randint(0, 100, (BATCH, 32), generator=gen),
    ),
    "ViT (2 layers)": (TinyViT, lambda gen: torch.randn(BATCH, 3, 32, 32, generator=gen)),
}


def roles(model: nn.Module) -> dict[str, str]:
    """Parameter name → how SINGD preconditions it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = SINGD(model)
    role_of = {
        id(param): "elementwise k²"
        for layer in optimizer._table.elementwise.values()
        for param in layer.params
    }
    for name in optimizer.layer_names():
        diagonal = optimizer.layer_state(name)["K"].name == "diagonal"
        for param in optimizer._table.layers[name].params():
            role_of[id(param)] = "Kronecker, diagonal K" if diagonal else "Kronecker"
    return {name: role_of.get(id(p), "fallback") for name, p in model.named_parameters()}


def iteration_seconds(
    make_model: Callable[[], nn.Module],
    inputs: Callable[[torch.Generator], Tensor],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    repeats: int,
) -> float:
    """Mean seconds of one forward + backward + step after two warm-up iterations."""
    torch.manual_seed(0)
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = make_optimizer(model)
    gen = torch.Generator().manual_seed(0)
    batches = [(inputs(gen), torch.randint(0, 10, (BATCH,), generator=gen)) for _ in range(4)]

    def iteration(index: int) -> None:
        x, y = batches[index % len(batches)]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for index in range(2):
        iteration(index)
    start = time.perf_counter()
    for index in range(repeats):
        iteration(index)
    return (time.perf_counter() - start) / repeats


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "AdamW": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
    "SINGD T=1": lambda model: SINGD(model, lr=1e-3, T=1),
    "SINGD T=10": lambda model: SINGD(model, lr=1e-3, T=10),
}


def main(argv: list[str] | None = None) -> None:
    """Print the roles and times; optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for model_name, (make_model, inputs) in MODELS.items():
        torch.manual_seed(0)
        seconds = {
            name: iteration_seconds(make_model, inputs, make, args.repeats)
            for name, make in OPTIMIZERS.items()
        }
        results[model_name] = {"parameters": roles(make_model()), "seconds": seconds}
        print(model_name)
        for name, role in results[model_name]["parameters"].items():
            print(f"  {name:>45}: {role}")
        for name, value in seconds.items():
            ratio = value / seconds["AdamW"]
            print(f"  {name:>12}: {1e3 * value:.1f} ms per iteration ({ratio:.2f}× AdamW)")
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump({"repeats": args.repeats, "models": results}, handle, indent=2)


if __name__ == "__main__":
    main()
