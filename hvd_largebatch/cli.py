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
The library names its arguments the Python way (``world_size=3``); a command
maps those names to its flags with ``parser.set_defaults(flag_names={...})``
and :func:`in_flag_terms` rewrites the message here, in one place
(``--workers 3``).

Output piped into a command that stops reading (``hvd-largebatch schedule ... | head``)
ends quietly with exit code 141 (128 + SIGPIPE, what the shell reports for a
command killed by SIGPIPE), as standard command-line tools do.

Example (shell), Goyal et al.'s ImageNet recipe at a global batch of 8192::

    hvd-largebatch schedule --base-lr 0.1 --base-batch 256 --global-batch 8192 \\
        --epochs 90 --warmup-epochs 5 --decay step --dataset-size 1281167 --plot sched.png
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

__all__ = ["PROG", "COMMAND_MODULES", "BROKEN_PIPE_EXIT", "OneLineErrorParser", "in_flag_terms", "build_parser", "main"]

#: The console script's name (setup.cfg: ``hvd-largebatch = hvd_largebatch.cli:main``).
PROG = "hvd-largebatch"

#: Dotted names of the modules that each register one sub-command.
COMMAND_MODULES: tuple[str, ...] = (
    "hvd_largebatch.schedule_command",
    "hvd_largebatch.bench.command",
    "hvd_largebatch.bench.noise_scale_command",
)

#: Exit code when stdout was closed by the reader (128 + SIGPIPE).
BROKEN_PIPE_EXIT = 141


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


def in_flag_terms(message: str, flag_names: Mapping[str, str]) -> str:
    """Rewrites the library's argument names in ``message`` as the command's flags.

    ``name=value`` becomes ``--flag value`` (quotes of a string value
    dropped), for every ``name`` of ``flag_names``; a bare ``name`` becomes
    ``--flag`` when it opens the message (the library's messages start with
    the argument at fault) or holds an underscore, so English words such as
    "the warmup" stay words. Text inside quotes (a value such as
    ``'peak/world_size'``) and names inside a longer word are left alone.

    Example:
        >>> in_flag_terms("end_lr must be <= peak for decay='poly', got end_lr=1.0 > peak=0.4",
        ...               {"end_lr": "--end-lr", "decay": "--decay"})
        '--end-lr must be <= peak for --decay poly, got --end-lr 1.0 > peak=0.4'
    """
    if not flag_names:
        return message
    names = "|".join(sorted(map(re.escape, flag_names), key=len, reverse=True))
    quoted = r"'[^']*'|\"[^\"]*\""
    pattern = re.compile(rf"({quoted})|(?<![\w/.-])({names})(?:=({quoted}|[^\s,;:)]+))?(?![\w/])")

    def rename(match: re.Match) -> str:
        if match.group(1) is not None:  # a quoted value: left as it is
            return match.group(1)
        flag, value = flag_names[match.group(2)], match.group(3)
        if value is None:
            return flag if match.start() == 0 or "_" in match.group(2) else match.group(2)
        if value[0] in "'\"":
            value = value[1:-1]
        return f"{flag} {value}"

    return pattern.sub(rename, message)


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
        ``ValueError`` from the command), after one line on stderr;
        :data:`BROKEN_PIPE_EXIT` when the reader of stdout went away.
    """
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_request:  # argparse: --help (0) or a usage error (2, already printed)
            sys.stdout.flush()
            return int(exit_request.code or 0)
        try:
            code = int(args.handler(args))
        except ValueError as err:
            message = in_flag_terms(_one_line(err), getattr(args, "flag_names", {}))
            print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
            return 2
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_EXIT


def _silence_stdout() -> None:
    """Points stdout at /dev/null so the interpreter's final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured): nothing to flush into a pipe
        pass


if __name__ == "__main__":  # pragma: no cover - `python -m hvd_largebatch` is the supported form
    sys.exit(main())
