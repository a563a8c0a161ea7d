"""Writes a file all at once: through a temporary file in the same directory and ``os.replace``.

A reader (or a resumed study) sees either the old file or the new one, never
half of one; an interrupted write leaves no temporary file behind. Used for
the study's ``results.json`` and job files and for the MNIST-1D cache.

Example::

    >>> import json, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a" / "value.json"
    >>> write_json_atomically(path, {"x": 1})
    >>> json.loads(path.read_text())
    {'x': 1}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomically", "write_json_atomically"]


def _public_mode() -> int:
    """0666 minus the process umask: the mode ``open()`` would have given the file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_PUBLIC_MODE = _public_mode()


def write_atomically(path: Path, write: Callable[[IO[Any]], None], *, binary: bool = False) -> None:
    """Calls ``write(stream)`` on a temporary file beside ``path``, then renames it to ``path``.

    Args:
        path: the destination; missing parent directories are created.
        write: writes the whole content to the open stream.
        binary: open the stream in ``"wb"`` instead of ``"w"`` mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w") as stream:
            write(stream)
        os.chmod(temporary, _PUBLIC_MODE)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_json_atomically(path: Path, value: Any) -> None:
    """Writes ``value`` as indented JSON (no NaN or infinity) to ``path`` with :func:`write_atomically`."""

    def write(stream: IO[str]) -> None:
        json.dump(value, stream, indent=1, allow_nan=False)
        stream.write("\n")

    write_atomically(path, write)
