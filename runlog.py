"""A log file in every output directory, for the duration of one command."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[Path]:
    """Copy every log record to ``path`` (appending) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield path
    except Exception as exc:  # the one-line error reaches the file too, then main reports it
        handler.emit(logging.LogRecord("main", logging.ERROR, __file__, 0, "%s: %s",
                                       (type(exc).__name__, exc), None))
        raise
    except KeyboardInterrupt:
        handler.emit(logging.LogRecord("main", logging.ERROR, __file__, 0, "interrupted", (), None))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
