"""Distributed overhead: 2-replica synchronous training with slim against a raw DDP loop, in one run.

    python benchmarks/distributed_overhead.py [--steps 2000] [--rounds 5] [--replicas 2] [--width 128]

Two processes on this machine (gloo, CPU, one thread each), each running the
same rounds in the same order: a hand-written loop over a
DistributedDataParallel model, and slim.learning.train with a
SyncReplicasOptimizer (the plain model; gradients averaged by torchslim's
bucketed all-reduce hooks) that logs every 100 steps, writes no summaries and
checkpoints only at the end on the chief (the raw loop saves once too).
MLP 64->width->10, batch 32 per replica, SGD with momentum. Prints steps/sec
of each (rank 0's clock, medians over rounds) and the ratio slim/raw
(target >= 0.95).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

import torchslim as slim


def make_model(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))


def replica(rank: int, args: argparse.Namespace, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    logging.getLogger("torchslim").setLevel(logging.WARNING)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.replicas))
    slim.distributed.initialize(f"tcp://127.0.0.1:{port}", timeout=120)
    data = _common.batches(n=100, seed=rank)

    def raw() -> float:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(make_model(args.width))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def loop() -> None:
            _common.raw_steps(model, opt, data, args.steps)
            if rank == 0:
                torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict()},
                           os.path.join(tmp, "raw.pt"))

        dist.barrier()
        return _common.timed(loop)

    def slim_train() -> float:
        torch.manual_seed(0)
        slim.collections.reset()
        model = make_model(args.width)
        opt = slim.SyncReplicasOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

        def total_loss(batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y)

        train_op = slim.learning.create_train_op(total_loss, opt)
        logdir = tempfile.mkdtemp(dir=tmp)

        def loop() -> None:
            slim.learning.train(
                train_op, logdir, data=slim.data.repeat(data), number_of_steps=args.steps, sync_optimizer=opt,
                log_every_n_steps=100, save_summaries_secs=None, save_interval_secs=None,
            )

        dist.barrier()
        return _common.timed(loop)

    raw(), slim_train()  # warm-up
    medians = _common.interleaved({"raw": raw, "slim": slim_train}, args.rounds)
    if rank == 0:
        raw_sps, slim_sps = args.steps / medians["raw"], args.steps / medians["slim"]
        print(f"replicas={args.replicas} width={args.width} steps={args.steps} rounds={args.rounds} backend=gloo threads=1")
        print(f"raw DDP loop            : {raw_sps:9.1f} steps/sec")
        print(f"slim + SyncReplicasOpt. : {slim_sps:9.1f} steps/sec")
        print(f"ratio slim/raw          : {slim_sps / raw_sps:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp()
    try:
        mp.spawn(replica, args=(args, port, tmp), nprocs=args.replicas, join=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
