"""The train op's short path calls the optimizer without torch's profiler labels.

``Optimizer.zero_grad`` and ``Optimizer.step`` each open a
``torch.autograd.profiler.record_function`` region, which dispatches two
operators even when no profiler records: 5.3 us a region in a tight loop on
these machines (zero_grad takes 7.0 us, the loop inside it 0.25 us), and far
more between the kernels of a step: on ``benchmarks/loop_overhead.py``'s MLP
(2-core VM, 3000 steps, 7 paired rounds) the hand loop ran 4,168 steps/s
with the regions and 5,433 without, so they were 23% of its step.
The train op takes its short path only while no profiler records (a traced
step takes the general path, which makes the usual calls and shows the usual
regions), so these calls do what the optimizer's own do, without the regions:

- ``zero_grad``: sets every gradient of the optimizer's parameters to None,
  as ``zero_grad(set_to_none=True)`` does, unless the optimizer's class or
  the instance defines its own ``zero_grad``;
- ``step``: runs the step's pre hooks, the class's step and its post hooks
  the way ``Optimizer.step``'s wrapper runs them, unless hooks are registered
  (checked at each call), the instance's ``step`` was replaced (an LR
  scheduler counts the calls so), or this torch's wrapper is not the one
  described here, in which case it calls ``optimizer.step()``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["unlabelled_step", "unlabelled_zero_grad"]


def unlabelled_zero_grad(optimizer: Any) -> Callable[[], None]:
    """``optimizer.zero_grad(set_to_none=True)`` without the profiler region, where that is all it does.

    Example:
        >>> net = torch.nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> net(torch.ones(1, 2)).sum().backward(); unlabelled_zero_grad(opt)(); net.weight.grad is None
        True
    """
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad or "zero_grad" in getattr(optimizer, "__dict__", {}):
        return lambda: optimizer.zero_grad(set_to_none=True)

    def zero_grad() -> None:
        for group in optimizer.param_groups:  # read at each call: load_state_dict replaces the list
            for p in group["params"]:
                p.grad = None

    return zero_grad


def unlabelled_step(optimizer: Any) -> Callable[[], Any]:
    """``optimizer.step()`` without the profiler region, where nothing else would differ.

    Example:
        >>> net = torch.nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> net(torch.ones(1, 2)).sum().backward(); before = net.bias.item()
        >>> unlabelled_step(opt)(); round(before - net.bias.item(), 6)
        0.1
    """
    from torch.optim import optimizer as optimizer_module

    wrapper = getattr(type(optimizer), "step", None)
    step = getattr(wrapper, "__wrapped__", None)
    global_pre = getattr(optimizer_module, "_global_optimizer_pre_hooks", None)
    global_post = getattr(optimizer_module, "_global_optimizer_post_hooks", None)
    if (
        not getattr(wrapper, "hooked", False) or step is None or global_pre is None or global_post is None
        or not isinstance(getattr(optimizer, "_optimizer_step_pre_hooks", None), dict)
        or not isinstance(getattr(optimizer, "_optimizer_step_post_hooks", None), dict)
        or not callable(getattr(optimizer, "_optimizer_step_code", None))
    ):
        return lambda: optimizer.step()

    def unlabelled() -> Any:
        if (
            global_pre or global_post or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or "step" in optimizer.__dict__
        ):
            return optimizer.step()
        out = step(optimizer)
        optimizer._optimizer_step_code()
        return out

    return unlabelled
