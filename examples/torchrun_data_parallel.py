"""SINGD on several CPU processes (gloo), one batch shared out between them.

Run: ``torchrun --nproc_per_node 2 examples/torchrun_data_parallel.py [--mode ddp]``.

Each rank trains the same MLP on its half of every batch of a synthetic
regression task.  ``--mode`` picks how the model is distributed:

* ``ddp`` (default): ``DistributedDataParallel`` averages the gradients; SINGD
  all-reduces the curvature statistics on factor steps.
* ``unwrapped``: the plain model; SINGD averages the gradients itself (one
  all-reduce per step, together with the statistics).
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` shards every layer's rows;
  SINGD gathers each gradient to precondition it and keeps its own rows.

``--shard-factor-work`` lets each rank compute the factor steps of half of the
layers and broadcast them; ``--drift-check-every N`` checks every ``N`` steps
that all ranks hold the same factors and parameters.  Rank 0 prints the loss
and, at the end, saves and reloads the optimizer with
``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

from singd import SINGD
from singd.optim.dcp import dcp_state_dict


def build(mode: str) -> nn.Module:
    """The model to train (identical on every rank: same seed), distributed per ``mode``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if mode == "fsdp2":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ddp", "unwrapped", "fsdp2"), default="ddp")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shard-factor-work", action="store_true")
    parser.add_argument("--drift-check-every", type=int, default=10)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(args.mode)
    opt = SINGD(model, lr=0.05, momentum=0.9, T=5, lr_cov=0.05, structures=("dense", "diagonal"))
    opt.configure_distributed(
        shard_factor_work=args.shard_factor_work, drift_check_every=args.drift_check_every
    )
    teacher = 0.25 * torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for step in range(args.steps):
        inputs = torch.randn(64, 16, generator=torch.Generator().manual_seed(100 + step))
        targets = torch.sin(inputs @ teacher)
        mine = slice(rank * 64 // world, (rank + 1) * 64 // world)  # this rank's rows
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(inputs[mine]), targets[mine])
        loss.backward()
        opt.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss (rank 0's half) {loss.item():.4f}")
    with tempfile.TemporaryDirectory() as folder:
        path = [folder]
        dist.broadcast_object_list(path)  # one folder for every rank (same machine)
        dcp.save({"optim": dcp_state_dict(opt)}, checkpoint_id=path[0])
        state = {"optim": dcp_state_dict(opt)}
        dcp.load(state, checkpoint_id=path[0])
        opt.load_state_dict(state["optim"])
        dist.barrier()  # rank 0 removes the folder only after every rank has loaded
    if rank == 0:
        print(f"done: {opt.steps} steps on {world} ranks ({args.mode}); checkpoint round trip ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
