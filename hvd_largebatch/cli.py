"""The ``hvd-largebatch`` command line: a thin dispatcher over per-command modules.

How a command plugs in:

* Write a module (e.g. ``hvd_largebatch/schedule_command.py``) with a function
  ``register(subparsers) -> None``. It calls ``subparsers.add_parser(name, ...)``,
  adds its options and sets ``parser.set_defaults(handler=run)`` where
  ``run(args: argparse.Namespace) -> int`` returns the exit code.
* Append the module's dotted name to :data:`COMMAND_MODULES` below.
* Command modules are imported when the parser is built, so they must import
  frameworks (torch, TensorFlow, Horovod, matplotlib) only inside ``run``:
  ``import hvd_largebatch.cli`` and ``hvd-largebatch --help`` stay framework-free.

Error convention, shared by every command: bad arguments print ONE line
``hvd-largebatch <command>: error: <message>`` on stderr and exit with code 2.
That covers argparse's own errors (see :class:`OneLineErrorParser`) and every
``ValueError`` a handler raises (the library's validation errors name the
argument and its allowed values), so a handler simply lets them propagate.

Example (shell), Goyal et al.'s ImageNet recipe at a global batch of 8192::

    hvd-largebatch schedule --base-lr 0.1 --base-batch 256 --global-batch 8192 \\
        --epochs 90 --warmup-epochs 5 --decay step --dataset-size 1281167 --plot sched.png
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["PROG", "COMMAND_MODULES", "OneLineErrorParser", "build_parser", "main"]

#: The console script's name (setup.cfg: ``hvd-largebatch = hvd_largebatch.cli:main``).
PROG = "hvd-largebatch"

#: Dotted names of the modules that each register one sub-command.
COMMAND_MODULES: tuple[str, ...] = (
    "hvd_largebatch.schedule_command",
    "hvd_largebatch.bench.command",
    "hvd_largebatch.bench.noise_scale_command",
)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single stderr line and exit code 2.

    argparse normally prints the whole usage block before the message; a
    one-line error is easier to read in a ``horovodrun`` log where every rank
    prints. Sub-parsers inherit this class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def build_parser() -> OneLineErrorParser:
    """The top-level parser with every command of :data:`COMMAND_MODULES` registered."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Large-batch data-parallel training on Horovod: learning-rate schedules and benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``hvd-largebatch`` with ``argv`` (default: ``sys.argv[1:]``) and returns the exit code.

    Returns:
        The command's exit code; 2 for bad arguments (argparse errors and any
        ``ValueError`` from the command), after one line on stderr.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse: --help (0) or a usage error (2, already printed)
        return int(exit_request.code or 0)
    try:
        return int(args.handler(args))
    except ValueError as err:
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover - `python -m hvd_largebatch` is the supported form
    sys.exit(main())
