"""torchslim: TF-Slim's training layer for PyTorch.

    import torchslim as slim

    train_op = slim.learning.create_train_op(total_loss, optimizer)
    slim.learning.train(train_op, '/tmp/logdir', data=loader, number_of_steps=1000)

Submodules are imported on first use, so ``import torchslim`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = (
    "checkpoint",
    "cli",
    "collections",
    "data",
    "demo",
    "distributed",
    "evaluation",
    "layers",
    "learning",
    "losses",
    "metrics",
    "model_analyzer",
    "progress",
    "queues",
    "summaries",
    "supervisor",
    "triggers",
    "variables",
)

# Names re-exported at the top level, as TF-Slim exposes them on `slim`.
_ATTRIBUTES = {
    "SyncReplicasOptimizer": "distributed",
    "GraphKeys": "collections",
    "batch_norm": "layers",
    "l1_regularizer": "layers",
    "l2_regularizer": "layers",
    "l1_l2_regularizer": "layers",
    "get_variables_to_restore": "variables",
    "get_model_variables": "variables",
    "assign_from_checkpoint_fn": "variables",
    "create_train_op": "learning",
}


if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports each on first use
    from . import (  # noqa: F401  (re-exports: the "from . import" form in __init__)
        checkpoint,
        cli,
        collections,
        data,
        demo,
        distributed,
        evaluation,
        layers,
        learning,
        losses,
        metrics,
        model_analyzer,
        progress,
        queues,
        summaries,
        supervisor,
        triggers,
        variables,
    )
    from .collections import GraphKeys as GraphKeys
    from .distributed import SyncReplicasOptimizer as SyncReplicasOptimizer
    from .layers import batch_norm as batch_norm
    from .layers import l1_l2_regularizer as l1_l2_regularizer
    from .layers import l1_regularizer as l1_regularizer
    from .layers import l2_regularizer as l2_regularizer
    from .learning import create_train_op as create_train_op
    from .variables import assign_from_checkpoint_fn as assign_from_checkpoint_fn
    from .variables import get_model_variables as get_model_variables
    from .variables import get_variables_to_restore as get_variables_to_restore


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(f"{__name__}.{_ATTRIBUTES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SUBMODULES) + list(_ATTRIBUTES))
