"""Summary overhead: slim.learning.train with summaries every 10 steps, against the same run without
and against a hand-written loop that calls torch.utils.tensorboard.SummaryWriter for the same summaries.

    python benchmarks/summaries_overhead.py [--steps 2000] [--rounds 7] [--every 10] [--threads 1,2] [--device cpu|cuda] [--hidden 128]

The loop-overhead MLP (64->128->10, batch 32, SGD with momentum,
cross-entropy, in-memory data). With summaries: a histogram of every
parameter (added once at set-up, so each write reads the live weights) and a
scalar recorded every step inside total_loss; train() also writes its own
loss, learning rate and global_step/sec; summaries are written every
``--every`` steps (save_summaries_steps). Without: no summary at all
(save_summaries_secs=None). Both log every 100 steps and checkpoint only at
the end. The hand loop: the raw PyTorch loop, which every ``--every`` steps
calls torch's SummaryWriter.add_histogram (TF's bins) for each parameter and
add_scalar for the same four scalars. The three are interleaved round by
round, for each torch thread count; each ratio is paired by round: median
and range. Targets: with/without >= 0.95, with/hand >= 1.0. ``--hidden``
widens the MLP's hidden layer (64->H->10) to see how the cost grows with the
values histogrammed; the targets are for the default.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

import torchslim as slim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--every", type=int, default=10, help="save_summaries_steps")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128, help="the MLP's hidden width (the targets are for 128)")
    args = parser.parse_args()
    if args.hidden < 1:
        parser.error(f"argument --hidden: must be >= 1, got {args.hidden}")
    logging.getLogger("torchslim").setLevel(logging.WARNING)
    device = torch.device(args.device)
    data = [(x.to(device), y.to(device)) for x, y in _common.batches()]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tmp = tempfile.mkdtemp()

    def run_train(with_summaries: bool) -> float:
        torch.manual_seed(0)
        slim.collections.reset()
        model = _common.mlp(args.hidden).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if with_summaries:
            slim.summaries.add_histogram_summaries(model, prefix="weights")

        def total_loss(batch):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if with_summaries:
                slim.summaries.add_scalar_summary(loss, "cross_entropy", prefix="losses")
            return loss

        train_op = slim.learning.create_train_op(total_loss, opt)
        logdir = tempfile.mkdtemp(dir=tmp)
        summary_args = (
            {"save_summaries_secs": None, "save_summaries_steps": args.every}
            if with_summaries
            else {"save_summaries_secs": None}
        )

        def loop() -> None:
            slim.learning.train(
                train_op, logdir, data=slim.data.repeat(data), number_of_steps=args.steps,
                log_every_n_steps=100, save_interval_secs=None, **summary_args,
            )
            sync()

        seconds = _common.timed(loop)
        if with_summaries:  # the run wrote what it should have
            files = [f for f in os.listdir(logdir) if f.startswith("events.out.tfevents")]
            assert files, f"no event file in {logdir}"
        return seconds

    def run_hand() -> float:
        from torch.utils.tensorboard import SummaryWriter

        torch.manual_seed(0)
        model = _common.mlp(args.hidden).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        named = [(f"weights/{n}", p) for n, p in model.named_parameters()]

        def loop() -> None:
            writer = SummaryWriter(tempfile.mkdtemp(dir=tmp))
            last = (0, time.monotonic())
            for i in range(args.steps):
                x, y = data[i % len(data)]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                step = i + 1
                if step % args.every == 0:
                    for tag, p in named:
                        writer.add_histogram(tag, p.detach(), step, bins="tensorflow")
                    value = loss.item()
                    writer.add_scalar("losses/cross_entropy", value, step)
                    writer.add_scalar("losses/total_loss", value, step)
                    writer.add_scalar("learning_rate", opt.param_groups[0]["lr"], step)
                    now = time.monotonic()
                    writer.add_scalar("global_step/sec", (step - last[0]) / (now - last[1]), step)
                    last = (step, now)
                elif step % 100 == 0:
                    loss.item()
            writer.close()
            sync()

        return _common.timed(loop)

    runs = {"without": lambda: run_train(False), "with": lambda: run_train(True), "hand": run_hand}
    results = []
    try:
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for fn in runs.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(args.rounds):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))
                for name in order:
                    times[name].append(runs[name]())
            results.append((threads, times))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"device={device} steps={args.steps} rounds={args.rounds} every={args.every} hidden={args.hidden} cores={os.cpu_count()}")
    for threads, times in results:
        print(f"threads={threads}")
        for name in runs:
            print(f"  {name:8s}: {args.steps / statistics.median(times[name]):9.1f} steps/sec (median)")
        for num, den in (("with", "without"), ("with", "hand")):
            ratios = [d / n for n, d in zip(times[num], times[den])]  # speed ratio, paired by round
            print(
                f"  ratio {num}/{den}: median {statistics.median(ratios):.3f} "
                f"range {min(ratios):.3f}-{max(ratios):.3f}"
            )


if __name__ == "__main__":
    main()
