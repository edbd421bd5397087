"""The ``torchslim`` command line (also ``python -m torchslim``).

    torchslim demo --logdir /tmp/torchslim-demo              # train, evaluate every checkpoint, analyze
    torchslim eval /tmp/torchslim-demo --once                # evaluate the newest checkpoint
    torchslim inspect /tmp/torchslim-demo/model.ckpt-1000.pt # step, tensors, integrity
    torchslim analyze torchslim.demo:DigitsNet --input-shape 1,1,8,8 --ops
    torchslim --version

Each command lives beside the module it drives and parses its own
arguments, so ``torchslim COMMAND --help`` explains it. Whatever goes wrong,
the command prints one line, ``torchslim COMMAND: error: ...``, and exits
with status 2 for bad arguments, 1 otherwise (set ``TORCHSLIM_TRACEBACK=1``
to see the traceback of an unexpected error). A closed pipe
(``torchslim --help | head -3``) ends it quietly.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["COMMANDS", "ArgumentParser", "main"]

# command -> (module, function taking argv and returning an exit status, one-line help)
COMMANDS = {
    "demo": ("torchslim.demo", "main", "train, evaluate and analyze a CNN on the shipped 8x8 digits"),
    "eval": ("torchslim.demo", "eval_main", "evaluate the demo model's checkpoints as they appear"),
    "inspect": ("torchslim.checkpoint", "inspect_main", "show a checkpoint's step and tensors and check its integrity"),
    "analyze": ("torchslim.model_analyzer", "main", "report a model's variables, ops and FLOPs"),
}


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors take one line: ``PROG: error: MESSAGE (see 'PROG --help')``, exit 2.

    Example:
        >>> parser = ArgumentParser(prog='torchslim demo')
        >>> _ = parser.add_argument('--steps', type=int)
        >>> try:
        ...     parser.parse_args(['--steps', 'x'])
        ... except SystemExit as e:
        ...     e.code
        2
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from importlib import metadata

    from torchslim import __version__

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"torchslim {__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="torchslim",
        description="TF-Slim's training layer for PyTorch, from the shell.",
        epilog="Run 'torchslim COMMAND --help' for a command's arguments.",
    )
    parser.add_argument("--version", action="version", version=_version(), help="print the versions and exit")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, (_, _, help_) in COMMANDS.items():
        # Each command's own parser reads the rest of the line (add_help=False: its --help is its own).
        commands.add_parser(name, help=help_, add_help=False)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, (ValueError, TypeError, OSError, LookupError)) and text:
        return text
    hint = "" if os.environ.get("TORCHSLIM_TRACEBACK") else " (set TORCHSLIM_TRACEBACK=1 for the traceback)"
    return f"{type(exc).__name__}: {text}{hint}" if text else f"{type(exc).__name__}{hint}"


def _silence_stdout() -> None:
    # The reader went away: point stdout at /dev/null so the interpreter's last flush cannot fail again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 failed, 2 bad arguments).

    Example:
        >>> main(['--help'])  # doctest: +ELLIPSIS
        usage: torchslim [-h] [--version] COMMAND ...
        ...
        0
        >>> main(['trian'])
        2
    """
    args = list(sys.argv[1:] if argv is None else argv)
    command = "torchslim"
    try:
        parser = _parser()
        if not args:
            parser.print_help(sys.stderr)
            return 2
        try:
            namespace, rest = parser.parse_known_args(args)
        except SystemExit as exit_:  # --help, --version, or an argument error already printed
            sys.stdout.flush()
            return 0 if exit_.code is None else int(exit_.code)
        if namespace.command is None:
            parser.error(f"unrecognized arguments: {' '.join(rest)}; give a COMMAND first")
        command = f"torchslim {namespace.command}"
        module_name, func_name, _ = COMMANDS[namespace.command]
        func = getattr(importlib.import_module(module_name), func_name)
        status = int(func(rest) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return status
    except SystemExit as exit_:
        code = exit_.code
        return 0 if code is None else code if isinstance(code, int) else 1
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("TORCHSLIM_TRACEBACK"):
            raise
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
