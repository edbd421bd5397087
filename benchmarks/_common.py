"""Shared pieces of the benchmarks: the loop-overhead MLP, its data, and interleaved timing."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def mlp(hidden: int = 128) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def batches(n: int = 100, batch_size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 64, generator=g), torch.randint(0, 10, (batch_size,), generator=g)) for _ in range(n)]


def interleaved(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Runs each timed function once per round, alternating; returns the median seconds of each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(runs[name]())
    return {name: statistics.median(ts) for name, ts in times.items()}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list, steps: int) -> None:
    """The hand-written baseline loop: cross-entropy, backward, step; reads the loss every 100 steps, as a log would."""
    for i in range(steps):
        x, y = data[i % len(data)]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if (i + 1) % 100 == 0:
            loss.item()


def raw_steps_unlabelled(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list, steps: int) -> None:
    """The same hand loop without torch's profiler regions in zero_grad and step (what the train op's
    short path skips while no profiler records): the floor for what the train op itself adds."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step = type(optimizer).step.__wrapped__  # type: ignore[attr-defined]  # Optimizer's profiling wrapper
    for i in range(steps):
        x, y = data[i % len(data)]
        for p in params:
            p.grad = None
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        step(optimizer)
        if (i + 1) % 100 == 0:
            loss.item()
