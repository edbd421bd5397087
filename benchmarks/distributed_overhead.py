"""Distributed overhead: 2-replica synchronous training with slim against a raw DDP loop, in one run.

    python benchmarks/distributed_overhead.py [--case small|large|both] [--rounds 5] [--replicas 2]

Two processes on this machine (gloo, CPU, one thread each), each running the
same rounds in the same order: a hand-written loop over a
DistributedDataParallel model, and slim.learning.train with a
SyncReplicasOptimizer (the plain model; gradients averaged by torchslim's
bucketed all-reduce hooks) that logs every 100 steps, writes no summaries and
checkpoints only at the end on the chief (the raw loop saves once too).
Two models: the small MLP 64->width->10 (batch 32 per replica, 2000 steps a
round) and a ~25M-parameter MLP 1024->4096->4096->1024 (25.2M parameters,
batch 8 per replica, 20 steps a round: the gradient all-reduce of 100 MB
dominates; no checkpoint in either loop). SGD with momentum. Prints steps/sec of each (rank 0's clock,
medians over rounds) and the ratio slim/raw per round: median and range
(target >= 0.95).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

import torchslim as slim

CASES = {
    # name: (layer widths, batch per replica, steps per round, checkpoint at the end)
    "small": ((64, 128, 10), 32, 2000, True),
    # The large case leaves the final checkpoint out of both (300 MB of weights and momentum would time
    # the disk, which benchmarks/checkpoint benchmarks measure): it times the gradient averaging.
    "large": ((1024, 4096, 4096, 1024), 8, 10, False),
}


def make_model(widths: tuple[int, ...]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(widths) - 2 else [])
    return torch.nn.Sequential(*layers)


def make_data(widths: tuple[int, ...], batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, widths[0], generator=g), torch.randint(0, widths[-1], (batch,), generator=g))
            for _ in range(20)]


def run_case(rank: int, name: str, args: argparse.Namespace, tmp: str) -> None:
    widths, batch, steps, saves = CASES[name]
    if name == "small" and args.width is not None:
        widths = (64, args.width, 10)
    steps = args.steps or steps
    data = _common.batches(n=100, seed=rank) if widths[0] == 64 and batch == 32 else make_data(widths, batch, rank)

    def raw() -> float:
        torch.manual_seed(0)
        plain = make_model(widths)

        def loop() -> None:
            # Wrapping is timed, as train()'s set-up is: both broadcast rank 0's weights and build buckets.
            model = torch.nn.parallel.DistributedDataParallel(plain)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            _common.raw_steps(model, opt, data, steps)
            if rank == 0 and saves:
                torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict()},
                           os.path.join(tmp, "raw.pt"))

        dist.barrier()
        return _common.timed(loop)

    def slim_train() -> float:
        torch.manual_seed(0)
        slim.collections.reset()
        model = make_model(widths)
        opt = slim.SyncReplicasOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

        def total_loss(batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y)

        train_op = slim.learning.create_train_op(total_loss, opt)
        logdir = tempfile.mkdtemp(dir=tmp) if saves else None

        def loop() -> None:
            slim.learning.train(
                train_op, logdir, data=slim.data.repeat(data), number_of_steps=steps, sync_optimizer=opt,
                log_every_n_steps=100, save_summaries_secs=None, save_interval_secs=None,
            )

        dist.barrier()
        seconds = _common.timed(loop)
        if logdir is not None:
            shutil.rmtree(logdir, ignore_errors=True)
        return seconds

    raw(), slim_train()  # warm-up
    times: dict[str, list[float]] = {"raw": [], "slim": []}
    for r in range(args.rounds):  # interleaved, the order alternating
        for label in (("raw", "slim") if r % 2 == 0 else ("slim", "raw")):
            times[label].append(raw() if label == "raw" else slim_train())
    if rank == 0:
        ratios = sorted(t_raw / t_slim for t_raw, t_slim in zip(times["raw"], times["slim"]))
        params = sum(p.numel() for p in make_model(widths).parameters())
        raw_sps, slim_sps = steps / statistics.median(times["raw"]), steps / statistics.median(times["slim"])
        print(f"[{name}] {params / 1e6:.2f}M parameters, batch {batch}/replica, replicas={args.replicas} "
              f"steps={steps} rounds={args.rounds} backend=gloo threads=1")
        print(f"  raw DDP loop            : {raw_sps:9.2f} steps/sec")
        print(f"  slim + SyncReplicasOpt. : {slim_sps:9.2f} steps/sec")
        print(f"  ratio slim/raw          : median {statistics.median(ratios):.3f} "
              f"(range {ratios[0]:.3f}-{ratios[-1]:.3f} over {len(ratios)} paired rounds)", flush=True)


def replica(rank: int, args: argparse.Namespace, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    logging.getLogger("torchslim").setLevel(logging.WARNING)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.replicas))
    slim.distributed.initialize(f"tcp://127.0.0.1:{port}", timeout=300)
    for name in (("small", "large") if args.case == "both" else (args.case,)):
        run_case(rank, name, args, tmp)


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
    width, steps = args.width or 128, args.steps or 2000

    def sharded_model() -> torch.nn.Module:
        torch.manual_seed(0)
        model = make_model((64, width, 10))
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        return model

    saves = iter(range(10**6))

    def raw() -> float:
        model = sharded_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def loop() -> None:
            _common.raw_steps(model, opt, data, steps)
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
                train_op, logdir, data=slim.data.repeat(data), number_of_steps=steps,
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
        raw_sps, slim_sps = steps / medians["raw"], steps / medians["slim"]
        ratios = sorted(r / s for r, s in zip(times["raw"], times["slim"]))
        print(f"FSDP2 replicas={args.replicas} width={width} steps={steps} rounds={args.rounds} "
              "backend=gloo threads=1")
        print(f"raw FSDP2 loop          : {raw_sps:9.1f} steps/sec")
        print(f"slim + FSDP2            : {slim_sps:9.1f} steps/sec")
        print(f"ratio slim/raw          : {slim_sps / raw_sps:.3f} (per round {ratios[0]:.3f}..{ratios[-1]:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["small", "large", "both"], default="both")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default: the case's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--width", type=int, default=None, help="hidden width of the small MLP (128)")
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
