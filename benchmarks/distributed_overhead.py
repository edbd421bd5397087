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


def fsdp_replica(rank: int, args: argparse.Namespace, port: int, tmp: str) -> None:
    """The FSDP2 case (--fsdp): slim.learning.train on a fully_shard model against a raw FSDP2 loop.

    Both shard each Linear and the root with fully_shard, step SGD with
    momentum and save once at the end with torch.distributed.checkpoint
    (slim: its sharded checkpoint, every rank writing its shard; raw: dcp.save).
    slim keeps its defaults (check_numerics: one flag all-reduced per step).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    logging.getLogger("torchslim").setLevel(logging.WARNING)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.replicas))
    slim.distributed.initialize(f"tcp://127.0.0.1:{port}", timeout=120)
    data = _common.batches(n=100, seed=rank)

    def sharded_model() -> torch.nn.Module:
        torch.manual_seed(0)
        model = make_model(args.width)
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        return model

    saves = iter(range(10**6))

    def raw() -> float:
        model = sharded_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def loop() -> None:
            _common.raw_steps(model, opt, data, args.steps)
            model_state, optim_state = get_state_dict(model, opt)
            dcp.save({"model": model_state, "optimizer": optim_state},
                     checkpoint_id=os.path.join(tmp, f"raw-{next(saves)}"))

        dist.barrier()
        return _common.timed(loop)

    def slim_train() -> float:
        slim.collections.reset()
        model = sharded_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def total_loss(batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y)

        train_op = slim.learning.create_train_op(total_loss, opt)
        logdir = os.path.join(tmp, f"slim-{next(saves)}")

        def loop() -> None:
            slim.learning.train(
                train_op, logdir, data=slim.data.repeat(data), number_of_steps=args.steps,
                log_every_n_steps=100, save_summaries_secs=None, save_interval_secs=None,
            )

        dist.barrier()
        return _common.timed(loop)

    raw(), slim_train()  # warm-up
    times = {"raw": [], "slim": []}

    def timer(name, fn):
        def run() -> float:
            t = fn()
            times[name].append(t)
            return t
        return run

    medians = _common.interleaved({"raw": timer("raw", raw), "slim": timer("slim", slim_train)}, args.rounds)
    if rank == 0:
        raw_sps, slim_sps = args.steps / medians["raw"], args.steps / medians["slim"]
        ratios = sorted(r / s for r, s in zip(times["raw"], times["slim"]))
        print(f"FSDP2 replicas={args.replicas} width={args.width} steps={args.steps} rounds={args.rounds} "
              "backend=gloo threads=1")
        print(f"raw FSDP2 loop          : {raw_sps:9.1f} steps/sec")
        print(f"slim + FSDP2            : {slim_sps:9.1f} steps/sec")
        print(f"ratio slim/raw          : {slim_sps / raw_sps:.3f} (per round {ratios[0]:.3f}..{ratios[-1]:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--fsdp", action="store_true", help="torchslim FSDP2 against a raw FSDP2 loop instead")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp()
    try:
        mp.spawn(fsdp_replica if args.fsdp else replica, args=(args, port, tmp), nprocs=args.replicas, join=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
