"""Command-line entry point: ``python main.py <subcommand> ...``.

Only argument assembly and dispatch live here; every subcommand is a module at the repository
root exposing ``add_parser(subparsers)`` (which ends with ``set_defaults(func=run)``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from samlora.core.errors import EXIT_INTERNAL, EXIT_USAGE, UserError

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = ("download_weights", "train", "parameter_search", "evaluate", "detect", "demo")

log = logging.getLogger("samlora")


def build_parser() -> argparse.ArgumentParser:
    """Assemble the top-level parser from every command module's ``add_parser``."""
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Fine-tune SAM / MobileSAM with LoRA for microscopy, evaluate, and segment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Log to stderr; ``--quiet`` keeps warnings only, ``--verbose`` adds debug messages.

    The root logger passes INFO on in any case, so the log files in output directories are
    complete whatever the console shows.
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = next((h for h in root.handlers if getattr(h, "_samlora", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._samlora = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if handler.stream is not sys.stderr:  # the current stderr (tests swap it between calls)
        if getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr  # setStream would flush the closed stream
        else:
            handler.setStream(sys.stderr)
    handler.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def torch_oom_errors() -> tuple[type[BaseException], ...]:
    """The out-of-memory exceptions: Python's, and torch's (GPU) once torch is imported."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (MemoryError, oom) if oom is not None else (MemoryError,)


def interrupted_hint(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C, per command."""
    if args.command == "train":
        return "the finished epochs are saved; rerun the same command with --resume to continue"
    if args.command == "parameter_search":
        return "the finished epochs are saved; rerun the same command to continue the search"
    if args.command == "download":
        return "rerun the same command to resume"
    if getattr(args, "detect_command", None) == "predict":
        if getattr(args, "seed_labels", None) is not None:
            return "carrying objects through a volume cannot be resumed; rerun the same command with --overwrite"
        return ("a volume's finished sections are kept: rerun the same command with --resume to continue (other "
                "inputs: rerun it with --overwrite)")
    return "rerun the same command (with --overwrite if it had already written outputs)"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit code.

    0 success, 2 bad input (usage errors and :class:`UserError`), 1 internal error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    setup_logging(args.quiet, args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except (torch_oom_errors()) as exc:
        log.error("out of memory (%s): lower --image_size (512, 256), use --model_type vit_t, --freeze_encoder, "
                  "--precision bf16, a smaller --batch_size / --max_objects / --batch_prompts", type(exc).__name__)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        log.error("interrupted: %s", interrupted_hint(args))
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        log.debug("internal error", exc_info=True)
        log.error("internal error: %s: %s (rerun with --verbose for details)", type(exc).__name__, exc)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
