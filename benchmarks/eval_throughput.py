"""evaluate_once's throughput against a hand-written torch.no_grad() loop.

    .venv/bin/python benchmarks/eval_throughput.py [--batches 2000] [--rounds 7]

The loop-overhead MLP (64 -> 128 -> 10) over 2000 in-memory batches of 32,
computing accuracy and mean squared error. Both sides update the same
torchmetrics objects: the raw loop calls their ``update`` directly with the
values it computes; evaluate_once goes through ``slim.metrics`` (argument
checks included), opens a step scope per batch, restores the checkpoint,
computes the final values and writes them for TensorBoard. The two run
interleaved, several rounds; the ratio is raw time / evaluate_once time
(throughput of evaluate_once relative to the raw loop), median over rounds.
Target: >= 0.95.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchslim as slim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    data = [(torch.randn(args.batch_size, 64), torch.randint(0, 10, (args.batch_size,))) for _ in range(args.batches)]
    workdir = tempfile.mkdtemp(prefix="torchslim-eval-bench-")
    path = os.path.join(workdir, "model.ckpt-1.pt")
    slim.checkpoint.save_checkpoint(path, {"global_step": 1, "model": model.state_dict()})

    names_to_values, names_to_updates = slim.metrics.aggregate_metric_map({
        "accuracy": slim.metrics.streaming_accuracy(),
        "mse": slim.metrics.streaming_mean_squared_error(),
    })
    update_accuracy, update_mse = names_to_updates["accuracy"], names_to_updates["mse"]
    tm_accuracy = names_to_values["accuracy"].__self__.metric   # the torchmetrics objects themselves
    tm_mse = names_to_values["mse"].__self__.metric

    def eval_op(batch):
        images, labels = batch
        logits = model(images)
        update_accuracy(logits.argmax(1), labels)
        update_mse(logits.softmax(1).max(1).values, torch.ones(len(labels)))

    def raw() -> dict[str, float]:
        tm_accuracy.reset()
        tm_mse.reset()
        model.eval()
        with torch.no_grad():
            for images, labels in data:
                logits = model(images)
                tm_accuracy.update((logits.argmax(1) == labels).float())
                tm_mse.update((logits.softmax(1).max(1).values - torch.ones(len(labels))).square())
        return {"accuracy": tm_accuracy.compute().item(), "mse": tm_mse.compute().item()}

    def slim_eval() -> dict[str, float]:
        return slim.evaluation.evaluate_once(path, os.path.join(workdir, "eval"), num_evals=None, eval_op=eval_op,
                                             final_op=names_to_values, data=data)

    raw(), slim_eval()   # warm-up
    raw_times, slim_times, ratios = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        expected = raw()
        t1 = time.perf_counter()
        got = slim_eval()
        t2 = time.perf_counter()
        if got != expected:
            raise SystemExit(f"the two loops disagree: raw {expected}, evaluate_once {got}")
        raw_times.append(t1 - t0)
        slim_times.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    n = args.batches
    raw_t, slim_t = statistics.median(raw_times), statistics.median(slim_times)
    print(f"batches: {n} x {args.batch_size}, rounds: {args.rounds}, torch threads: {args.threads}")
    print(f"raw no_grad loop : median {raw_t * 1e3:7.1f} ms  best {min(raw_times) * 1e3:7.1f} ms  ({n / raw_t:7.0f} batches/s)")
    print(f"evaluate_once    : median {slim_t * 1e3:7.1f} ms  best {min(slim_times) * 1e3:7.1f} ms  ({n / slim_t:7.0f} batches/s)")
    print(f"throughput ratio, median over rounds: {statistics.median(ratios):.3f}  (target >= 0.95)")
    print(f"throughput ratio, best against best : {min(raw_times) / min(slim_times):.3f}")
    print(f"per-batch overhead (best against best): {(min(slim_times) - min(raw_times)) / n * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
