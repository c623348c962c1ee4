"""Log files: a command's log copied to its output directory, and the records logged before that
directory exists (runfiles.OutputDir.active records the file in the directory's manifest)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Sequence


class LogBuffer(logging.Handler):
    """Keeps the records logged before the output directory (and its log file) exists, so that
    the checks of a command can be refused without writing anything and still be logged."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "LogBuffer":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)


@contextlib.contextmanager
def log_to_file(path: Path, extra_loggers: Sequence[str] = (),
                replay: Sequence[logging.LogRecord] = ()) -> Iterator[Path]:
    """Copy every INFO and higher record to ``path`` (appending) while the block runs.

    ``extra_loggers`` names loggers that do not propagate to the root (ultralytics'); ``replay``
    records (a :class:`LogBuffer`'s) are written first. An error that ends the command reaches
    the file too before ``main`` reports it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")  # open() applies the umask itself
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for record in replay:
        handler.handle(record)
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in extra_loggers]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield path
    except Exception as exc:
        handler.emit(logging.LogRecord("main", logging.ERROR, __file__, 0, "%s: %s",
                                       (type(exc).__name__, exc), None))
        raise
    except KeyboardInterrupt:
        handler.emit(logging.LogRecord("main", logging.ERROR, __file__, 0, "interrupted", (), None))
        raise
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()
