"""Loop overhead: slim.learning.train against a hand-written PyTorch loop, in one run.

    python benchmarks/loop_overhead.py [--steps 2000] [--rounds 7] [--device cpu|cuda] [--model mlp|resnet18]
    python benchmarks/loop_overhead.py --clip-tensors 10,100,1000 [--steps 300]

MLP 64->128->10, batch 32, SGD with momentum, cross-entropy, in-memory data;
train() logs every 100 steps, writes no summaries and checkpoints only at the
end; and train() with TF-Slim's defaults (a log line due every step, nobody
printing it; summaries and checkpoints every 600 s). The runs interleave, the
order alternating round by round; prints steps/sec of each and the ratio
slim/raw paired by round, median and range (target >= 0.98). It also runs
the raw loop without torch's profiler regions in zero_grad and step (which
the train op skips while no profiler records; torchslim._optimizer_calls)
and prints each ratio against it too: what the train op and loop add.

``--clip-tensors``: for each count N, a stack of 16x16 linear layers with N
parameter tensors, ``clip_gradient_norm=1`` against a raw loop that clips
each tensor with ``torch._foreach_*`` (norms, then one scaled multiply).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

import torchslim as slim


def resnet18_cifar() -> torch.nn.Module:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from models_zoo import resnet18  # written in this repo, torchvision's architecture

    return resnet18(num_classes=10)


def _stack(n_tensors: int) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(max(1, n_tensors // 2))])


def _raw_clip_(params: list[torch.Tensor], max_norm: float) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    coef = torch._foreach_norm(grads)
    torch._foreach_reciprocal_(coef)
    torch._foreach_mul_(coef, max_norm)
    torch._foreach_clamp_max_(coef, 1.0)
    torch._foreach_mul_(grads, coef)


def _paired_ratio(raw: Callable[[], float], slim_run: Callable[[], float], rounds: int) -> tuple[float, tuple[float, float]]:
    """Speed ratio slim/raw per round (raw seconds / slim seconds), the order alternating; median and range."""
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            t_raw, t_slim = raw(), slim_run()
        else:
            t_slim, t_raw = slim_run(), raw()
        ratios.append(t_raw / t_slim)
    return statistics.median(ratios), (min(ratios), max(ratios))


def clip_case(n_tensors: int, args: argparse.Namespace, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 16, generator=g).to(device), torch.randn(32, 16, generator=g).to(device)) for _ in range(10)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def raw(unlabelled: bool = False) -> float:
        torch.manual_seed(0)
        model = _stack(n_tensors).to(device)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        unlabelled_step = type(opt).step.__wrapped__  # type: ignore[attr-defined]  # Optimizer's profiling wrapper

        def loop() -> None:
            for i in range(args.steps):
                x, y = data[i % len(data)]
                if unlabelled:  # without torch's profiler regions, as the train op's short path
                    for p in params:
                        p.grad = None
                else:
                    opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                _raw_clip_(params, 1.0)
                if unlabelled:
                    unlabelled_step(opt)
                else:
                    opt.step()
                if (i + 1) % 100 == 0:
                    loss.item()
            sync()

        return _common.timed(loop)

    def slim_train() -> float:
        torch.manual_seed(0)
        slim.collections.reset()
        model = _stack(n_tensors).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def total_loss(batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)

        train_op = slim.learning.create_train_op(total_loss, opt, clip_gradient_norm=1.0, check_numerics=args.check_numerics)

        def loop() -> None:
            slim.learning.train(train_op, None, data=slim.data.repeat(data), number_of_steps=train_op.step + args.steps,
                                log_every_n_steps=100)
            sync()

        return _common.timed(loop)

    raw(), raw(True), slim_train()  # warm-up
    medians, ranges = _paired_ratio(raw, slim_train, args.rounds)
    floor, floor_range = _paired_ratio(lambda: raw(True), slim_train, args.rounds)
    print(f"clip_gradient_norm tensors={n_tensors} device={device} steps={args.steps} rounds={args.rounds} "
          f"threads={torch.get_num_threads()} check_numerics={args.check_numerics}: "
          f"ratio slim/raw median {medians:.3f} (range {ranges[0]:.3f}-{ranges[1]:.3f}); against the raw loop "
          f"without profiler regions {floor:.3f} ({floor_range[0]:.3f}-{floor_range[1]:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["mlp", "resnet18"], default="mlp")
    parser.add_argument("--clip-tensors", default="",
                        help="comma-separated parameter-tensor counts: clip_gradient_norm against a raw foreach clip")
    parser.add_argument("--no-check-numerics", dest="check_numerics", action="store_false",
                        help="create the train op with check_numerics=False (default: True, the TF-Slim default)")
    args = parser.parse_args()
    logging.getLogger("torchslim").setLevel(logging.WARNING)
    device = torch.device(args.device)
    if args.clip_tensors:
        for n in (int(c) for c in args.clip_tensors.split(",")):
            clip_case(n, args, device)
        return
    if args.model == "mlp":
        make_model, data = _common.mlp, _common.batches()
    else:
        make_model = resnet18_cifar
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(10)]
    data = [(x.to(device), y.to(device)) for x, y in data]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def raw(steps: Callable[..., None] = _common.raw_steps) -> float:
        torch.manual_seed(0)
        model = make_model().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def loop() -> None:
            steps(model, opt, data, args.steps)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, os.path.join(tmp, "raw.pt"))
            sync()

        return _common.timed(loop)

    def slim_train() -> float:
        torch.manual_seed(0)
        slim.collections.reset()
        model = make_model().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def total_loss(batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y)

        train_op = slim.learning.create_train_op(total_loss, opt, check_numerics=args.check_numerics)
        logdir = tempfile.mkdtemp(dir=tmp)

        def loop() -> None:
            slim.learning.train(
                train_op, logdir, data=slim.data.repeat(data), number_of_steps=args.steps,
                log_every_n_steps=100, save_summaries_secs=None, save_interval_secs=None,
            )
            sync()

        return _common.timed(loop)

    def slim_defaults() -> float:
        """train() with TF-Slim's defaults: a log line due every step (nobody prints it: the logger is at
        WARNING), summaries and checkpoints every 600 s, check_numerics=True, progress='auto'."""
        torch.manual_seed(0)
        slim.collections.reset()
        model = make_model().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def total_loss(batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y)

        train_op = slim.learning.create_train_op(total_loss, opt)
        logdir = tempfile.mkdtemp(dir=tmp)

        def loop() -> None:
            slim.learning.train(train_op, logdir, data=slim.data.repeat(data), number_of_steps=args.steps)
            sync()

        return _common.timed(loop)

    tmp = tempfile.mkdtemp()
    runs = {"raw": raw, "unlabelled": lambda: raw(_common.raw_steps_unlabelled), "slim": slim_train, "defaults": slim_defaults}
    times: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for fn in runs.values():  # warm-up
            fn()
        for r in range(args.rounds):  # the order alternates round by round; each ratio pairs one round's runs
            for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
                times[name].append(runs[name]())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"model={args.model} device={device} steps={args.steps} rounds={args.rounds} "
          f"threads={torch.get_num_threads()} check_numerics={args.check_numerics}")
    print(f"raw PyTorch loop : {args.steps / statistics.median(times['raw']):9.1f} steps/sec (median)")
    print(f"raw loop without torch's profiler regions in zero_grad and step: "
          f"{args.steps / statistics.median(times['unlabelled']):9.1f} steps/sec (median)")
    for name, label in (("slim", "slim.learning (log every 100 steps, no summaries)"),
                        ("defaults", "train() with TF-Slim defaults")):
        ratios = [t_raw / t for t_raw, t in zip(times["raw"], times[name])]
        floor = [t_raw / t for t_raw, t in zip(times["unlabelled"], times[name])]
        print(f"{label}: {args.steps / statistics.median(times[name]):9.1f} steps/sec, ratio/raw median "
              f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); against the raw loop "
              f"without regions {statistics.median(floor):.3f} ({min(floor):.3f}-{max(floor):.3f})")


if __name__ == "__main__":
    main()
