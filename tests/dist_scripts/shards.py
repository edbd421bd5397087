"""A replica that shuffles its own shard and draws its own dropout masks (tests/test_distributed.py runs it).

    torchrun --nproc-per-node 2 --max-restarts 1 shards.py --logdir D --out O [--kill-rank 1 --kill-at-step 12]
    RANK=r WORLD_SIZE=2 python shards.py --logdir D --out O --master file:///tmp/rdzv

Replica r trains on rows r::world of 64 rows, in an order its DataLoader
shuffles from r's torch RNG, for two epochs (slim.data.repeat); the model
has dropout (r's torch RNG) and the loss is scaled by a draw from numpy's
and Python's RNG, so all three of r's streams reach its weights. Every
stream is seeded with seed + rank. Each step appends the row indices of its
batch to O.rank<R>.batches (one JSON line: step, attempt, rows); the final
weights go to O.rank<R>.pt.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys

import numpy as np
import torch

import torchslim as slim


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--master", default="")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at-step", type=int, default=None)
    args = parser.parse_args(argv)

    rank, world = slim.distributed.get_rank(), slim.distributed.get_world_size()
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.tanh(x.sum(1, keepdim=True))
    rows = torch.arange(64)
    shard = torch.utils.data.TensorDataset(x[rank::world], y[rank::world], rows[rank::world])
    torch.manual_seed(100)  # the same initial weights on every replica (the chief's win anyway)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    seed = 1000 + rank + 7 * restarts  # a restarted replica's streams must come from the checkpoint, not from here
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    loader = torch.utils.data.DataLoader(shard, batch_size=4, shuffle=True)
    optimizer = slim.SyncReplicasOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    log = open(f"{args.out}.rank{rank}.batches", "a")

    def total_loss(batch: list[torch.Tensor]) -> torch.Tensor:
        bx, by, _ = batch
        scale = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        return torch.nn.functional.mse_loss(model(bx), by) * scale

    train_op = slim.learning.create_train_op(total_loss, optimizer, model=model)

    def train_step(op, batch, global_step, kwargs):
        step = op.step + 1
        if rank == args.kill_rank and restarts == 0 and step == args.kill_at_step:
            log.close()
            print(f"rank {rank}: killing myself before step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        log.write(json.dumps({"step": step, "attempt": restarts, "rows": batch[2].tolist()}) + "\n")
        log.flush()
        return slim.learning.train_step(op, batch, global_step, kwargs)

    slim.learning.train(
        train_op, args.logdir, data=slim.data.repeat(loader, num_epochs=args.epochs), train_step_fn=train_step,
        master=args.master, sync_optimizer=optimizer, log_every_n_steps=0,
        save_interval_secs=None, save_interval_steps=args.save_steps, save_summaries_secs=None,
    )
    log.close()
    torch.save({"params": model.state_dict(), "step": train_op.step, "restarts": restarts}, f"{args.out}.rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
