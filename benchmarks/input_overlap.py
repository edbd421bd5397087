"""How well does slim.queues.prefetch_queue overlap input production with the training step?

    .venv/bin/python benchmarks/input_overlap.py            # ~25 s on 2 cores
    .venv/bin/python benchmarks/input_overlap.py --steps 300

A producer takes P ms per batch and a step takes C ms (both ``time.sleep``,
so this measures overlap, not CPU contention). With perfect overlap the loop
runs at 1 / max(P, C) steps per second; run serially it runs at
1 / (P + C). For (P, C) in (5, 5), (10, 2), (2, 10) the table prints
steps/sec and the ratio achieved / (1 / max(P, C)) for

* serial:       no prefetch (produce, then step);
* prefetch:     ``slim.queues.prefetch_queue(source, capacity=2)`` (1 thread);
* DataLoader:   ``torch.utils.data.DataLoader(num_workers=2)`` worker processes
                (two workers can produce faster than one producer, so its ratio
                may exceed 1).

The first ``--warmup`` steps of each run are not timed (thread / process start).
The script exits with status 1 if a prefetch ratio is below 0.9.

With a CUDA device it also times a ResNet-18-like step on 128x3x32x32 batches
fed from pinned host memory: a synchronous copy in the step versus
``prefetch_queue(device='cuda')`` (side-stream copy that overlaps the step).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from torchslim import queues

CONFIGS = [(5, 5), (10, 2), (2, 10)]


def _source(p_ms: float, n: int):
    for i in range(n):
        time.sleep(p_ms / 1000)
        yield i


class _SleepDataset(torch.utils.data.Dataset):
    def __init__(self, p_ms: float, n: int) -> None:
        self.p_ms, self.n = p_ms, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        time.sleep(self.p_ms / 1000)
        return i


def _timed_loop(batches, c_ms: float, warmup: int) -> float:
    """Runs the loop; returns steps/sec over the steps after `warmup`."""
    t0 = None
    timed = 0
    for i, _ in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        time.sleep(c_ms / 1000)
        if t0 is not None:
            timed += 1
    assert t0 is not None, "not enough steps for the warm-up"
    return timed / (time.perf_counter() - t0)


def run_serial(p_ms: float, c_ms: float, steps: int, warmup: int) -> float:
    return _timed_loop(_source(p_ms, steps + warmup), c_ms, warmup)


def run_prefetch(p_ms: float, c_ms: float, steps: int, warmup: int) -> float:
    batches = queues.prefetch_queue(_source(p_ms, steps + warmup), capacity=2, collection=None)
    return _timed_loop(batches, c_ms, warmup)


def run_dataloader(p_ms: float, c_ms: float, steps: int, warmup: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(_SleepDataset(p_ms, steps + warmup), batch_size=None, num_workers=workers)
    return _timed_loop(loader, c_ms, warmup)


# ---------------------------------------------------------------------------
# CUDA: ResNet-18-like step, synchronous copy vs side-stream prefetch
# ---------------------------------------------------------------------------


class _BasicBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18_like(num_classes: int = 10) -> torch.nn.Module:
    """ResNet-18 for 32x32 inputs: 3x3 stem, four stages of two basic blocks (64-128-256-512)."""
    layers: list[torch.nn.Module] = [
        torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False),
        torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, num_classes)]
    return torch.nn.Sequential(*layers)


def run_cuda(steps: int, warmup: int) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = resnet18_like().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    host = [
        (torch.randn(128, 3, 32, 32).pin_memory(), torch.randint(0, 10, (128,)).pin_memory())
        for _ in range(8)
    ]

    def source(n: int):
        for i in range(n):
            yield host[i % len(host)]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def timed(batches, copy_in_step: bool) -> float:
        t0 = None
        for i, (x, y) in enumerate(batches):
            if i == warmup:
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            if copy_in_step:
                x, y = x.to(device), y.to(device)  # synchronous copy on the step's stream
            step(x, y)
        torch.cuda.synchronize(device)
        assert t0 is not None
        return steps / (time.perf_counter() - t0)

    n = steps + warmup
    no_prefetch = timed(source(n), copy_in_step=True)
    prefetched = timed(queues.prefetch_queue(source(n), capacity=2, device=device, collection=None), copy_in_step=False)
    print()
    print(f"CUDA ({torch.cuda.get_device_name(device)}): ResNet-18-like step, batches 128x3x32x32 from pinned host memory")
    print(f"  {'mode':<44} {'steps/s':>9}")
    print(f"  {'synchronous copy in the step (no prefetch)':<44} {no_prefetch:9.1f}")
    print(f"  {'prefetch_queue(device=cuda), side-stream copy':<44} {prefetched:9.1f}")
    print(f"  speed-up: {prefetched / no_prefetch:.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="timed steps per run (default 150)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA measurement even if a GPU is present")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.warmup < 0 or args.workers <= 0:
        parser.error(f"--steps and --workers must be > 0 and --warmup >= 0, got {args.steps}, {args.workers}, {args.warmup}")

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.steps} timed steps per run (+{args.warmup} warm-up)")
    print("steps/sec, and in brackets the ratio to the ideal 1 / max(P, C)")
    header = f"{'P ms':>5} {'C ms':>5} {'ideal':>7} | {'serial':>15} | {'prefetch':>15} | {f'DataLoader w={args.workers}':>17}"
    print(header)
    print("-" * len(header))
    failed = []
    for p, c in CONFIGS:
        ideal = 1000 / max(p, c)
        serial = run_serial(p, c, args.steps, args.warmup)
        prefetch = run_prefetch(p, c, args.steps, args.warmup)
        loader = run_dataloader(p, c, args.steps, args.warmup, args.workers)
        print(
            f"{p:>5} {c:>5} {ideal:7.1f} | {serial:7.1f} ({serial / ideal:.3f}) | "
            f"{prefetch:7.1f} ({prefetch / ideal:.3f}) | {loader:9.1f} ({loader / ideal:.3f})"
        )
        if prefetch / ideal < 0.9:
            failed.append((p, c, prefetch / ideal))
    print()
    if failed:
        print("FAIL: prefetch ratio below 0.9 for " + ", ".join(f"(P={p}, C={c}): {r:.3f}" for p, c, r in failed))
    else:
        print("OK: prefetch_queue reaches >= 0.9 of 1 / max(P, C) in every configuration")

    if torch.cuda.is_available() and not args.no_cuda:
        run_cuda(max(args.steps, 50), max(args.warmup, 10))
    else:
        print("CUDA measurement skipped (no CUDA device)" if not args.no_cuda else "CUDA measurement skipped (--no-cuda)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
