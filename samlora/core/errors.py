"""The one exception type that means "the user gave us something we cannot use".

Command modules raise :class:`UserError` with a message that says what is wrong, which file,
and what to do; ``main.main`` turns it into one log line and exit code 2 (never a traceback).
Library functions called from Python raise ``ValueError`` subclasses, so ``UserError`` is one.
"""
from __future__ import annotations

import errno
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


EXIT_INTERNAL = 1
EXIT_USAGE = 2

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
PARAMETER = re.compile(r"\{([a-z][a-z0-9_]*)\}")  # a parameter in an OptionError's message


def write_error(path: Path, exc: BaseException, existed: bool, rerun: str = "rerun with --resume") -> UserError | None:
    """The one-line :class:`UserError` for a failed write the user can fix, else None.

    A full disk (or quota) and a folder that is not writable are the user's to fix; the
    message names the file, says what to do and whether an earlier version of it survived
    (``existed``: the file was there before this write, which atomic writes leave intact).
    """
    if not isinstance(exc, OSError) or exc.errno not in DISK_FULL + NOT_WRITABLE:
        return None
    kept = f"the previous {Path(path).name} is intact" if existed else "no partial file was left"
    if exc.errno in DISK_FULL:
        return UserError(f"no space left on device writing {path}: free some space and {rerun} ({kept})")
    return UserError(f"cannot write {path} ({exc.strerror}): make {Path(path).parent} writable or choose "
                     f"another --output_dir, then {rerun} ({kept})")


class OptionError(UserError):
    """A bad option: the message names the parameters it is about as ``{name}`` (a word in braces).

    ``str()`` names the parameters (a Python caller passed them); a command catches it in
    :func:`as_flags` and reports the same sentence with the flags the user typed.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        self.parameters = tuple(dict.fromkeys(PARAMETER.findall(template)))
        super().__init__(self.with_flags({name: name for name in self.parameters}))

    def with_flags(self, renames: Mapping[str, str] | None = None) -> str:
        """The message with ``--name`` (or ``renames[name]``) for each parameter."""
        renames = renames or {}
        return PARAMETER.sub(lambda m: renames.get(m.group(1), f"--{m.group(1)}"), self.template)


@contextmanager
def as_flags(renames: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turn an :class:`OptionError` of the code inside into a :class:`UserError` naming flags."""
    try:
        yield
    except OptionError as exc:
        raise UserError(exc.with_flags(renames)) from None
