"""The train op's state: what a checkpoint holds of it, and its restore.

    state = train_op.state_dict()      # live references: model, optimizer, scheduler, global step, ...
    train_op.load_state_dict(state)    # and the extensions: loss scaling, moving averages

A mixin of :class:`torchslim.train_op.TrainOp`, kept apart from the step.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TrainOpState"]

logger = logging.getLogger("torchslim")


class TrainOpState:
    """``state_dict`` and ``load_state_dict`` of the train op (see :class:`torchslim.train_op.TrainOp`)."""

    model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    global_step: Any
    grad_scaler: Any
    overflow_steps: int
    _averages: list[Any]
    _flags: Any
    _checked_step: int

    step: Any  # the TrainOp's property
    check_pending_numerics: Any

    def state_dict(self) -> dict[str, Any]:
        """Model weights and buffers, optimizer, scheduler and global step (live references).

        With ``check_numerics``, first checks the numerics of the steps taken
        since the last check, so no checkpoint can hold non-finite state.

        Example:
            >>> import torchslim as slim
            >>> net = torch.nn.Linear(1, 1)
            >>> op = slim.learning.create_train_op(lambda: net(torch.ones(1, 1)).sum(),
            ...     torch.optim.SGD(net.parameters(), lr=0.1), global_step=slim.learning.GlobalStep(), model=net)
            >>> sorted(op.state_dict())
            ['global_step', 'model', 'optimizer']
        """
        if self.model is None:
            raise ValueError(
                "create_train_op found no nn.Module used by total_loss, so there is nothing to checkpoint; "
                "pass model=your_module to create_train_op"
            )
        self.check_pending_numerics()
        state: dict[str, Any] = {
            "global_step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        # -- train-op extensions: loss scaling and moving averages --------------------------------
        if self.grad_scaler is not None:
            state["grad_scaler"] = {**self.grad_scaler.state_dict(), "overflow_steps": self.overflow_steps}
        if self._averages:
            state["moving_averages"] = {ema.name: ema.state_dict() for ema in self._averages}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (weights, optimizer, scheduler, step, extensions).

        Example:
            >>> import torchslim as slim
            >>> net = torch.nn.Linear(1, 1)
            >>> op = slim.learning.create_train_op(lambda: net(torch.ones(1, 1)).sum(),
            ...     torch.optim.SGD(net.parameters(), lr=0.1), global_step=slim.learning.GlobalStep(), model=net)
            >>> state = {k: v for k, v in op.state_dict().items()}; _ = op()
            >>> op.load_state_dict(state); op.step
            0
        """
        if self.model is None:
            raise ValueError("cannot restore: create_train_op found no nn.Module; pass model= to create_train_op")
        from torchslim.checkpoint import load_model_state  # names the file and the first mismatching parameter

        load_model_state(self.model, state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.global_step is not None:
            self.global_step.value = int(state["global_step"])
        # -- train-op extensions: loss scaling, moving averages, the numerics check ---------------
        self._load_extensions(state)

    def _load_extensions(self, state: Mapping[str, Any]) -> None:
        if self.grad_scaler is not None and "grad_scaler" in state:
            scaler_state = dict(state["grad_scaler"])
            self.overflow_steps = int(scaler_state.pop("overflow_steps", 0))
            self.grad_scaler.load_state_dict(scaler_state)
        averages = state.get("moving_averages", {})
        for ema in self._averages:
            if ema.name in averages:
                ema.load_state_dict(averages[ema.name])
            else:
                logger.warning("the checkpoint holds no moving averages %r; they start from the restored weights", ema.name)
                ema.reset()
        self._flags.clear()
        self._checked_step = self.step
