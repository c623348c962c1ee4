"""The one exception type that means "the user gave us something we cannot use".

Command modules raise :class:`UserError` with a message that says what is wrong, which file,
and what to do; ``main.main`` turns it into one log line and exit code 2 (never a traceback).
Library functions called from Python raise ``ValueError`` subclasses, so ``UserError`` is one.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
