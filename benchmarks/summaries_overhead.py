"""Summary overhead: slim.learning.train with summaries every 10 steps against the same run without, in one run.

    python benchmarks/summaries_overhead.py [--steps 2000] [--rounds 7] [--every 10] [--device cpu|cuda]

The loop-overhead MLP (64->128->10, batch 32, SGD with momentum,
cross-entropy, in-memory data). With summaries: a histogram of every
parameter (added once at set-up, so each write reads the live weights) and a
scalar recorded every step inside total_loss; train() also writes its own
loss, learning rate and global_step/sec; summaries are written every
``--every`` steps (save_summaries_steps). Without: no summary at all
(save_summaries_secs=None). Both log every 100 steps and checkpoint only at
the end. The two are interleaved round by round; the medians give
steps/sec and the ratio with/without (target >= 0.95).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

import torchslim as slim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--every", type=int, default=10, help="save_summaries_steps")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.getLogger("torchslim").setLevel(logging.WARNING)
    device = torch.device(args.device)
    data = [(x.to(device), y.to(device)) for x, y in _common.batches()]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tmp = tempfile.mkdtemp()

    def run(with_summaries: bool) -> float:
        torch.manual_seed(0)
        slim.collections.reset()
        model = _common.mlp().to(device)
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

    try:
        run(False), run(True)  # warm-up
        medians = _common.interleaved({"without": lambda: run(False), "with": lambda: run(True)}, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    without_sps, with_sps = args.steps / medians["without"], args.steps / medians["with"]
    print(
        f"device={device} steps={args.steps} rounds={args.rounds} every={args.every} "
        f"threads={torch.get_num_threads()} cores={os.cpu_count()}"
    )
    print(f"without summaries : {without_sps:9.1f} steps/sec")
    print(f"with summaries    : {with_sps:9.1f} steps/sec")
    print(f"ratio with/without: {with_sps / without_sps:.3f}")


if __name__ == "__main__":
    main()
