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
import os
import sys
from collections.abc import Callable, Sequence

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
    return run_reporting_errors(f"torchslim {name}", func, rest)


def run_reporting_errors(prog: str, func: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Runs a subcommand; an error becomes one line on stderr and exit status 1, never a traceback.

    Ctrl-C exits 130. ``TORCHSLIM_TRACEBACK=1`` shows the traceback instead.

    Example:
        >>> run_reporting_errors('torchslim x', lambda argv: int(argv[0]), ['nan'])  # the line goes to stderr
        1
    """
    try:
        return int(func(argv) or 0)
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("TORCHSLIM_TRACEBACK"):
            raise
        message = " ".join(str(e).split()) or "(no message)"
        print(f"{prog}: error: {type(e).__name__}: {message} (TORCHSLIM_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
