"""The ``torchslim`` command line (also ``python -m torchslim``).

    python -m torchslim demo --logdir /tmp/torchslim-demo
    python -m torchslim eval /tmp/torchslim-demo --logdir /tmp/torchslim-eval
    python -m torchslim inspect /tmp/torchslim-demo/model.ckpt-500.pt
    python -m torchslim analyze torchvision_like.models:resnet18 --input-shape 1,3,224,224 --ops

Each subcommand lives beside the module it drives and parses its own
arguments, so ``python -m torchslim SUBCOMMAND --help`` explains it.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, function taking argv and returning an exit status, one-line help)
COMMANDS = {
    "demo": ("torchslim.demo", "main", "train, evaluate and analyze a CNN on the shipped 8x8 digits"),
    "eval": ("torchslim.demo", "eval_main", "evaluate the demo model's checkpoints as they appear"),
    "inspect": ("torchslim.checkpoint", "inspect_main", "show a checkpoint's step and tensors and check its integrity"),
    "analyze": ("torchslim.model_analyzer", "main", "report a model's variables, ops and FLOPs"),
}


def _usage() -> str:
    lines = ["usage: torchslim COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'torchslim COMMAND --help' for a command's arguments."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    Example:
        >>> main(['--help'])  # doctest: +ELLIPSIS
        usage: torchslim COMMAND [ARGS...]
        ...
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"torchslim: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)
