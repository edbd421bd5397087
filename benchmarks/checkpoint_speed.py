"""Checkpoint speed: torchslim's save, restore and background save against torch.save / torch.load, in one run.

    python benchmarks/checkpoint_speed.py [--size-mib 768] [--rounds 3] [--dir /tmp]

The train state of an MLP of 12 square Linear layers sized so that weights
plus SGD momentum take --size-mib (768 MiB: about 100M parameters). Each
round, interleaved: torch.save of the state and a synchronous Saver.save
(fsync of file and directory included) into the same directory;
torch.load(weights_only=True) and load_checkpoint (integrity check
included) of those files (os.sync() between timed saves, untimed, so none
pays for the write-back another left behind); then a background save (Saver.save_async of the
live state) in the middle of training steps. Prints the medians, ranges and
the three ratios of the issue:

    save        Saver.save / torch.save                        target <= 1.2
    restore     load_checkpoint / torch.load                   target <= 1.3
    blocked     training thread blocked by save_async / torch.save   target <= 0.1

"blocked" is the time save_async takes plus the time optimizer steps wait
for its copy of the state; the steps' total slow-down while the file is
written (the writer competes for the cores) is printed beside it. Peak
resident memory above the live state during each save is printed in units
of the state's size (target <= 1).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchslim import _checkpoint_format, checkpoint


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the resident set every 5 ms while active."""

    def __enter__(self) -> _PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _model(size_mib: float) -> tuple[torch.nn.Module, torch.optim.Optimizer, tuple[torch.Tensor, torch.Tensor]]:
    layers = 12
    width = max(8, int(math.sqrt(size_mib * 2**20 / 2 / 4 / layers)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(32, width, generator=g), torch.randn(32, width, generator=g))
    return model, optimizer, batch


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
    optimizer.step()
    return time.perf_counter() - start


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f}  range {min(xs):.3f}-{max(xs):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=768.0, help="weights + momentum, MiB (default 768)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the files go (default: the temp directory)")
    args = parser.parse_args()
    if not args.size_mib > 0 or args.rounds < 1:
        parser.error(f"--size-mib must be > 0 and --rounds >= 1, got {args.size_mib} and {args.rounds}")
    torch.manual_seed(0)
    model, optimizer, batch = _model(args.size_mib)
    _step(model, optimizer, batch)  # creates the momentum buffers
    step = 1

    def state() -> dict:
        return {"global_step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}

    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(s["momentum_buffer"].numel() * 4 for s in optimizer.state.values())
    root = tempfile.mkdtemp(prefix="ckpt-speed-", dir=args.dir)
    torch_path = os.path.join(root, "torch.pt")
    slim_dir = os.path.join(root, "slim")
    sync_saver = checkpoint.Saver(max_to_keep=1, asynchronous=False)
    bg_saver = checkpoint.Saver(max_to_keep=1, prefix="bg.ckpt")
    times: dict[str, list[float]] = {k: [] for k in (
        "torch.save", "torch.save+fsync", "Saver.save", "torch.load", "load_checkpoint", "blocked", "slowdown")}
    memory: dict[str, list[float]] = {"Saver.save": [], "save_async": []}
    print(f"state: {nbytes / 2**20:.0f} MiB in {len(state()['model']) * 3 // 2} tensors; files in {root}; "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    try:
        for r in range(args.rounds):
            def torch_save() -> None:
                torch.save(state(), torch_path)

            def torch_save_fsync() -> None:
                with open(torch_path, "wb") as f:
                    torch.save(state(), f)
                    f.flush()
                    os.fsync(f.fileno())

            def slim_save(step: int = step) -> None:
                with _PeakRSS() as rss:
                    sync_saver.save(slim_dir, state(), step)
                memory["Saver.save"].append((rss.peak - rss.base) / nbytes)

            saves = [("torch.save", torch_save), ("Saver.save", slim_save), ("torch.save+fsync", torch_save_fsync)]
            for name, fn in saves if r % 2 == 0 else reversed(saves):
                os.sync()  # untimed: no save pays for the write-back another one left behind
                times[name].append(_timed(fn))
            torch_save()
            latest = checkpoint.latest_checkpoint(slim_dir)
            loads = [("torch.load", lambda: torch.load(torch_path, weights_only=True)),
                     ("load_checkpoint", lambda latest=latest: checkpoint.load_checkpoint(latest))]
            for name, fn in loads if r % 2 == 0 else reversed(loads):
                times[name].append(_timed(fn))
                gc.collect()
            # A background save between training steps.
            plain = statistics.median(_step(model, optimizer, batch) for _ in range(3))
            step += 1
            waited = _checkpoint_format.staging_wait_seconds
            with _PeakRSS() as rss:
                call = _timed(lambda: bg_saver.save_async(slim_dir, state(), step))  # noqa: B023 (called at once)
                during = []
                while bg_saver._jobs.unfinished_tasks:
                    during.append(_step(model, optimizer, batch))
                    step += 1
                bg_saver.wait()
            memory["save_async"].append((rss.peak - rss.base) / nbytes)
            times["blocked"].append(call + _checkpoint_format.staging_wait_seconds - waited)
            times["slowdown"].append(sum(during) - plain * len(during))
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.3f}" for k, v in times.items())
                  + f"  ({len(during)} steps during the background save, a plain step {plain:.3f} s)", flush=True)
    finally:
        bg_saver.close()
        sync_saver.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nseconds over {args.rounds} interleaved rounds:")
    for name, xs in times.items():
        print(f"  {name:18s} {_spread(xs)}")

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b])]

    print("ratios, paired by round:")
    print(f"  save     Saver.save / torch.save           {_spread(ratio('Saver.save', 'torch.save'))}   (target <= 1.2)")
    print(f"           Saver.save / torch.save+fsync     {_spread(ratio('Saver.save', 'torch.save+fsync'))}")
    print(f"  restore  load_checkpoint / torch.load      {_spread(ratio('load_checkpoint', 'torch.load'))}   (target <= 1.3)")
    print(f"  blocked  save_async blocking / torch.save  {_spread(ratio('blocked', 'torch.save'))}   (target <= 0.1)")
    for name, xs in memory.items():
        print(f"  peak memory above the live state during {name}: {_spread(xs)} x the state   (target <= 1)")


if __name__ == "__main__":
    main()
