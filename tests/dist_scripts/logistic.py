"""TF-Slim's LogisticClassifier problem trained synchronously (2 replicas) or with Hogwild (2 workers).

    RANK=r WORLD_SIZE=2 python logistic.py --mode sync --master tcp://127.0.0.1:PORT --logdir D --out O
    python logistic.py --mode hogwild --workers 2 --logdir D --out O [--startup-delay 50] [--start-method fork]

The data is learning_test's: 16 points with 4 one-hot features, labels drawn
with numpy seed 0, the feature index 2*label + coin. The model is one linear
unit and a sigmoid, trained with log loss by gradient descent at lr 1.0.
Writes O (JSON): the final log loss over all 16 points, the chief's final
checkpoint step and, for Hogwild, each worker's step count and first step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

import torchslim as slim


def logistic_data() -> tuple[torch.Tensor, torch.Tensor]:
    np.random.seed(0)
    inputs = np.zeros((16, 4), dtype=np.float32)
    labels = np.random.randint(0, 2, size=(16, 1)).astype(np.float32)
    for i in range(16):
        j = int(2 * labels[i, 0] + np.random.randint(0, 2))
        inputs[i, j] = 1
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def log_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy(torch.sigmoid(model(x)), y)


def train_shard(rank: int, world: int, model: torch.nn.Module, args: argparse.Namespace, report: dict) -> None:
    x, y = logistic_data()
    shard = (x[rank::world], y[rank::world])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    sync = slim.SyncReplicasOptimizer(optimizer) if args.mode == "sync" else None
    # The train op steps the plain optimizer; train(sync_optimizer=...) still averages its gradients.
    train_op = slim.learning.create_train_op(lambda: log_loss(model, *shard), optimizer, model=model)

    def train_step(op, batch, global_step, kwargs):
        report.setdefault("first_step", op.step)
        report["steps"] = report.get("steps", 0) + 1
        return slim.learning.train_step(op, batch, global_step, kwargs)

    slim.learning.train(
        train_op, args.logdir, train_step_fn=train_step, number_of_steps=args.steps, master=args.master,
        sync_optimizer=sync, startup_delay_steps=args.startup_delay, log_every_n_steps=0,
        save_interval_secs=None, save_summaries_secs=None,
    )
    report["final_step"] = train_op.step


def hogwild_worker(rank: int, model: torch.nn.Module, args: argparse.Namespace) -> None:
    report: dict = {"rank": rank}
    train_shard(rank, args.workers, model, args, report)
    with open(f"{args.out}.worker{rank}.json", "w") as f:
        json.dump(report, f)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["sync", "hogwild"], required=True)
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--master", default="")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--startup-delay", type=int, default=0)
    parser.add_argument("--start-method", default="spawn")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    report: dict = {}
    if args.mode == "sync":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        train_shard(rank, world, model, args, report)
        if rank != 0:
            return
    else:
        model.share_memory()
        slim.distributed.run_hogwild(hogwild_worker, args.workers, args=(model, args), start_method=args.start_method)
        for r in range(args.workers):
            with open(f"{args.out}.worker{r}.json") as f:
                report.setdefault("workers", []).append(json.load(f))
    report["checkpoint_step"] = slim.checkpoint.checkpoint_step(slim.checkpoint.latest_checkpoint(args.logdir))
    with torch.no_grad():
        report["loss"] = float(log_loss(model, *logistic_data()))
    with open(args.out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1:])
