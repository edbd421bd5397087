"""One replica of a small synchronous training run (tests/test_distributed.py launches it).

    python replica.py --logdir D --out O [--master tcp://127.0.0.1:PORT] ...   # RANK, WORLD_SIZE in env
    torchrun --nproc-per-node 2 replica.py --logdir D --out O ...

Step i trains on global batch i (world_size * batch rows); replica r takes rows
[r*batch, (r+1)*batch), so one process with --batch 32 sees the same data as
two replicas with --batch 16. Each replica starts from different random
weights (seed + rank): the chief's must win. Writes O.rank<R>.pt (outside the
logdir) with the final weights, loss, global step and restart count.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

import torchslim as slim


def make_data(steps: int, global_batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=g)
    data = []
    for _ in range(steps):
        x = torch.randn(global_batch, 8, generator=g)
        data.append((x, torch.tanh(x @ w) + 0.1 * torch.randn(global_batch, 1, generator=g)))
    return data


class Counter(torch.nn.Module):
    """Identity with a buffer each replica moves differently (rank + 1 per forward pass).

    With the chief's buffers broadcast every step, every replica ends with the
    chief's count, as one process would.
    """

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += self.rank + 1
        return x


def make_model(seed: int, rank: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1), Counter(rank))


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--master", default="")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp", action="store_true", help="the user's own DistributedDataParallel, no sync_optimizer")
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--save-steps", type=int, default=None)
    parser.add_argument("--save-secs", type=float, default=None, help="the chief's time trigger (the others follow)")
    parser.add_argument("--summary-steps", type=int, default=None)
    parser.add_argument("--kill-rank", type=int, default=None, help="this rank SIGKILLs itself ...")
    parser.add_argument("--kill-at-step", type=int, default=None, help="... before taking this step (first attempt)")
    parser.add_argument("--hang", action="store_true", help="sleep instead of dying (a stuck peer)")
    parser.add_argument("--kill-once-file", default=None,
                        help="kill only while this file does not exist, and create it (the restart count is per node)")
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    model = make_model(args.seed + rank, rank)
    data = [(x[rank * args.batch:(rank + 1) * args.batch], y[rank * args.batch:(rank + 1) * args.batch])
            for x, y in make_data(args.steps, world * args.batch)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = None if args.ddp else slim.SyncReplicasOptimizer(optimizer)
    net = model
    if args.ddp:
        slim.distributed.initialize(args.master)
        net = torch.nn.parallel.DistributedDataParallel(model)

    def total_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(net(x), y)

    train_op = slim.learning.create_train_op(total_loss, sync or optimizer, clip_gradient_norm=args.clip, model=model)

    def train_step(op, batch, global_step, kwargs):
        first_attempt = restarts == 0 if args.kill_once_file is None else not os.path.exists(args.kill_once_file)
        if rank == args.kill_rank and first_attempt and op.step + 1 == args.kill_at_step:
            if args.kill_once_file is not None:
                open(args.kill_once_file, "w").close()
            print(f"rank {rank}: {'hanging' if args.hang else 'killing myself'} before step {op.step + 1}", flush=True)
            if args.hang:
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)
        return slim.learning.train_step(op, batch, global_step, kwargs)

    loss = slim.learning.train(
        train_op, args.logdir, data=data, train_step_fn=train_step, number_of_steps=args.steps,
        master=args.master, sync_optimizer=sync, log_every_n_steps=0,
        save_interval_secs=args.save_secs, save_interval_steps=args.save_steps,
        save_summaries_secs=None, save_summaries_steps=args.summary_steps,
    )
    torch.save({"params": model.state_dict(), "loss": loss, "step": train_op.step, "restarts": restarts,
                "rank": rank, "world": world}, f"{args.out}.rank{rank}.pt")
    return loss


if __name__ == "__main__":
    main(sys.argv[1:])
