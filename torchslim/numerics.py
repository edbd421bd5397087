"""The train op's numerics check: device-side flags the host reads only when it reads anyway.

    flags = NumericsFlags()
    flags.update([loss, *grads])     # one fused kernel per device, no host read
    ...
    if flags.read():                 # one host read: how many checks ran since the first bad one
        ...

Each step one fused kernel (the one ``GradScaler`` uses) sets a flag when the
loss or a gradient holds NaN or Inf, and one ``add_`` counts the steps since
the flag was set, so the host reads nothing until it asks; the count gives
the step where the NaN first appeared. :class:`NumericsChecks` is the train
op's half: reading the flag, checking the weights, naming the tensor.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from torchslim._modules import callable_name
from torchslim.gradients import coalesced, values_of

__all__ = ["NumericsChecks", "NumericsError", "NumericsFlags"]


class NumericsError(FloatingPointError):
    """A NaN or Inf in the loss, a gradient, a parameter or a buffer; the message names the tensor and the step."""


class _Group:
    """The flag, the constant 1 and the counter of one device."""

    __slots__ = ("count", "found", "one")

    def __init__(self, device: torch.device) -> None:
        self.found = torch.zeros(1, device=device)
        self.one = torch.ones(1, device=device)
        self.count = torch.zeros(1, device=device)


class NumericsFlags:
    """Sticky device flags: set when a checked tensor holds NaN or Inf, read by the host only in :meth:`read`.

    ``update(tensors)`` runs one fused kernel per device (no host read);
    ``read()`` returns how many checks have run since the flag was first
    set (0: all finite). The flag of the first device doubles as the
    ``found_inf`` that fused optimizers use to skip a step on the device.

    Example:
        >>> flags = NumericsFlags(); flags.update([torch.ones(2)]); flags.read()
        0
        >>> flags.update([torch.tensor([float('nan')])]); flags.update([torch.ones(2)]); flags.read()
        2
    """

    def __init__(self) -> None:
        self._groups: dict[torch.device, _Group] = {}
        self._main: _Group | None = None
        self._probe: _Group | None = None  # all_finite's scratch flag
        self._fused = True
        self._sharded: bool | None = None  # DTensor (FSDP2) gradients: decided at the first update

    @property
    def found_inf(self) -> torch.Tensor | None:
        """The first device's flag (a 1-element float tensor), None before the first update."""
        return self._main.found if self._main is not None else None

    def _group(self, device: torch.device) -> _Group:
        group = self._groups.get(device)
        if group is None:
            group = self._groups[device] = _Group(device)
            if self._main is None:
                self._main = group
        return group

    def update(self, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        if self._sharded is None:
            self._sharded = any(hasattr(t, "to_local") for t in tensors)
        if self._sharded:  # check the shards this rank holds (torchslim.fsdp combines the ranks' flags)
            tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        if self._fused:
            group = self._main or self._group(tensors[0].device)
            try:
                # Multiplies by the constant 1 in place (exact) and sets the flag on any NaN or Inf.
                torch._amp_foreach_non_finite_check_and_unscale_(tensors, group.found, group.one)
            except RuntimeError:  # tensors on several devices, or a dtype the kernel does not take
                self._fused = False
            else:
                group.count.add_(group.found)
                return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        for device, ts in by_device.items():
            group = self._group(device)
            bad = torch.stack([torch.logical_not(torch.isfinite(t).all()) for t in ts]).any()
            group.found.logical_or_(bad).clamp_(max=1)
            group.count.add_(group.found)

    def all_finite(self, tensors: list[torch.Tensor]) -> bool:
        """True when no tensor holds NaN or Inf, read at once; the sticky flags are left as they are.

        One fused kernel into a scratch flag and one host read, where
        ``update`` then ``read`` take four calls and two reads.

        Example:
            >>> NumericsFlags().all_finite([torch.ones(2), torch.tensor([float('inf')])])
            False
        """
        if not tensors:
            return True
        if self._fused:
            probe = self._probe
            if probe is None or probe.found.device != tensors[0].device:
                probe = self._probe = _Group(tensors[0].device)
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(tensors, probe.found, probe.one)
            except RuntimeError:  # tensors on several devices, or a dtype the kernel does not take
                self._fused = False
            else:
                if probe.found.item() == 0:
                    return True
                probe.found.zero_()
                return False
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def read(self) -> int:
        """One host read per device: the number of checks run since the first bad one (0: none)."""
        counts = [int(g.count.item()) for g in self._groups.values() if g.found.item() != 0]
        return max(counts, default=0)

    def clear(self) -> None:
        for g in self._groups.values():
            g.found.zero_()
            g.count.zero_()


def non_finite_kinds(t: torch.Tensor) -> str:
    """'NaN', 'Inf' or 'NaN and Inf' for a tensor holding non-finite values, '' for a finite one."""
    t = values_of(coalesced(t)) if t.is_sparse else t
    if not t.is_floating_point() and not t.is_complex():
        return ""
    kinds = [k for k, bad in (("NaN", torch.isnan(t).any()), ("Inf", torch.isinf(t).any())) if bool(bad)]
    return " and ".join(kinds)


def first_non_finite(named: list[tuple[Any, torch.Tensor]]) -> tuple[Any, str] | None:
    """The first (name, kinds) whose tensor holds NaN or Inf, with one host read for the finite case."""
    floats = [(n, t) for n, t in named if t.is_floating_point()]
    if not floats:
        return None
    norms = torch._foreach_norm([t.detach() for _, t in floats])
    try:
        stacked = torch.stack(norms)
    except RuntimeError:  # norms of several dtypes or devices
        stacked = torch.stack([n.float().to(norms[0].device) for n in norms])
    if bool(stacked.isfinite().all()):
        return None
    for name, t in floats:
        kinds = non_finite_kinds(t.detach())
        if kinds:
            return name, kinds
    return None


class NumericsChecks:
    """The train op's reading of its :class:`NumericsFlags` (mixed into :class:`torchslim.train_op.TrainOp`)."""

    check_numerics: bool
    total_loss: Callable[..., torch.Tensor]
    grad_scaler: Any
    model: torch.nn.Module | None
    _flags: NumericsFlags
    _checked_step: int
    _last_loss: torch.Tensor | None
    _params: list[torch.Tensor]
    _device_skip: bool
    _device: torch.device
    _loss_on_host: bool | None
    after_backward: list[Callable[[list[torch.Tensor]], Any]]
    before_numerics_read: list[Callable[[], Any]]

    @property
    def step(self) -> int:
        raise NotImplementedError

    def _name(self, param: torch.Tensor) -> str:
        raise NotImplementedError

    def _loss_read_on_host(self) -> bool:
        """True where the loss costs nothing to read at once: on the CPU, in one process, with an
        optimizer that does not skip bad steps on the device. The gradients are then checked through
        the weights they update (NaN or Inf in a gradient makes the weight NaN or Inf under torch's
        optimizers; Rprop, which steps by the sign, turns an Inf into a finite step), at every read
        of :meth:`check_pending_numerics` and whenever the loss is not finite; on 4 gradient tensors
        that is 0.3% of a step instead of 2.7%, which the flag kernel takes on a CPU, where it runs
        tensor by tensor (instructions counted by callgrind, benchmarks/loop_overhead.py's MLP).
        Several processes keep the flags: their averaged gradients agree across ranks, a loss read
        alone does not."""
        import torch.distributed as dist

        decided = (
            self._device.type == "cpu" and not self._device_skip and not self.after_backward
            and not (dist.is_available() and dist.is_initialized())
        )
        self._loss_on_host = decided
        return decided

    def _check_loss_now(self, loss: torch.Tensor) -> None:
        """The loss read at once (CPU): a NaN or Inf stops before the update, naming a weight already bad."""
        value = loss.item()
        if math.isfinite(value):
            return
        step = self.step + 1
        bad = self._first_bad_state()
        if bad is not None:
            raise NumericsError(
                f"step {step}: the loss {callable_name(self.total_loss)!r} is {value} because {bad[0]} holds {bad[1]} "
                f"values, put there by an update {self._since()} (a gradient with NaN or Inf, or an optimizer step "
                "that overflowed); no checkpoint holds it: restart from the last checkpoint"
            )
        raise NumericsError(
            f"step {step}: the loss {callable_name(self.total_loss)!r} is {value} (weights left as they were before this step)"
        )

    def _since(self, one_step: str = "at") -> str:
        """The steps whose updates may have made a weight bad: ``at step N`` (or ``one_step``), or a range."""
        if self._checked_step == self.step - 1:
            return f"{one_step} step {self.step}"
        return f"between steps {self._checked_step + 1} and {self.step}"

    def _check_now(self, loss: torch.Tensor, grads: list[torch.Tensor]) -> bool:
        """The check read at once, before the update; True: an fp16 overflow, skip the update."""
        if self._loss_on_host and self.grad_scaler is None:
            # Here only this check sets the flags, and a set flag raises: none is pending, so one fused
            # kernel and one read do (2 torch calls where the general path takes 7: 22 -> 12 us on a
            # summary step of the summaries benchmark).
            for hook in self.before_numerics_read:
                hook()
            if self._flags.all_finite([loss, *grads]):
                return False
            self._check_loss_now(loss)  # a bad loss is named first, as below
            raise self._gradient_error(self.step + 1, "weights left as they were before this step")
        self._read_pending_flags()  # the weights wait for the next read: this is not one (summary steps)
        self._check_loss_now(loss)
        step = self.step + 1
        self._flags.update(grads)
        if not self._flags.read():
            return False
        self._flags.clear()
        scaler = self.grad_scaler
        if scaler is not None and scaler.get_scale() > 1.0:
            return True  # an overflow of the scaled gradients: the scaler skips the step and lowers the scale
        raise self._gradient_error(step, "weights left as they were before this step")

    def _bad_gradient(self) -> tuple[str, str] | None:
        for p in self._params:
            if p.grad is not None:
                kinds = non_finite_kinds(p.grad)
                if kinds:
                    return self._name(p), kinds
        return None

    def _gradient_error(self, step: int, weights: str) -> NumericsError:
        bad = self._bad_gradient()
        if bad is not None:
            return NumericsError(f"step {step}: the gradient of parameter {bad[0]} has {bad[1]} values ({weights})")
        return NumericsError(f"step {step}: a gradient has NaN or Inf values ({weights})")

    def check_pending_numerics(self) -> None:
        """Reads the device-side numerics flag (one host sync); raises :class:`NumericsError` if it was set.

        Also checks that every parameter and buffer is finite, which catches
        an optimizer step that overflowed the weights. The loop calls this
        before every checkpoint (through :meth:`state_dict`), when it logs,
        and at the end; call it yourself in a loop of your own before reading
        results. A no-op when no step ran since the last check.

        Example:
            >>> import torchslim as slim
            >>> net = torch.nn.Linear(1, 1)
            >>> op = slim.learning.create_train_op(lambda: net(torch.ones(1, 1)).sum(),
            ...     torch.optim.SGD(net.parameters(), lr=0.1), global_step=slim.learning.GlobalStep(), model=net)
            >>> _ = op(); op.check_pending_numerics()
        """
        if not self.check_numerics:
            return
        if self._read_pending_flags():
            self._check_weights()
            self._checked_step = self.step

    def _read_pending_flags(self) -> bool:
        """Raises for a flag set since the last check; False when no step ran since."""
        for hook in self.before_numerics_read:
            hook()
        if self._checked_step == self.step:
            return False
        count = self._flags.read()
        if count:
            first = self.step - count + 1
            if first == self.step:
                loss = self._last_loss
                if loss is not None and not math.isfinite(loss.item()):
                    raise NumericsError(
                        f"step {first}: the loss {callable_name(self.total_loss)!r} is {loss.item()} ({self._weights_note()})"
                    )
                raise self._gradient_error(first, self._weights_note())
            raise NumericsError(
                f"step {first}: the loss or a gradient first held NaN or Inf (read at step {self.step}, "
                f"when {self._what_is_bad_now()}; {self._weights_note()})"
            )
        return True

    def _what_is_bad_now(self) -> str:
        loss = self._last_loss
        if loss is not None and not math.isfinite(loss.item()):
            return f"the loss {callable_name(self.total_loss)!r} is {loss.item()}"
        error = str(self._gradient_error(self.step, ""))
        return error[error.index(": ") + 2:].removesuffix(" ()")

    def _weights_note(self) -> str:
        if self._device_skip:
            return "weights left as they were before that step: the fused optimizer skipped it on the device"
        return "that update was applied; no checkpoint holds it: restart from the last checkpoint"

    def _first_bad_state(self) -> tuple[str, str] | None:
        """The first parameter or buffer holding NaN or Inf: (its name, the kinds)."""
        if self.model is None:
            named: list[tuple[Any, torch.Tensor]] = [(p, p) for p in self._params]  # named only when bad
        else:
            named = [(repr(n), t) for n, t in self.model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)]
        bad = first_non_finite(named)
        if bad is None:
            return None
        return (bad[0] if isinstance(bad[0], str) else self._name(bad[0])), bad[1]

    def _check_weights(self) -> None:
        bad = self._first_bad_state()
        if bad is None:
            return
        if self._loss_on_host:  # the gradients were not checked step by step: the last step's are still here
            grad = self._bad_gradient()
            if grad is not None and self._checked_step == self.step - 1:
                raise NumericsError(
                    f"step {self.step}: the gradient of parameter {grad[0]} has {grad[1]} values ({self._weights_note()})"
                )
            cause = (
                f"the gradient of parameter {grad[0]} at step {self.step} has {grad[1]} values" if grad is not None
                else "the loss was finite; a gradient with NaN or Inf, or an optimizer step that overflowed"
            )
            raise NumericsError(
                f"step {self.step}: {bad[0]} holds {bad[1]} values, put there by an update {self._since()} ({cause}); "
                "no checkpoint holds it: restart from the last checkpoint"
            )
        raise NumericsError(
            f"step {self.step}: {bad[0]} holds {bad[1]} values {self._since('after')} "
            "(loss and gradients were finite: the optimizer step overflowed it); no checkpoint holds it: lower the "
            "learning rate and restart from the last checkpoint"
        )

