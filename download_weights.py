"""``python main.py download``: fetch the pretrained SAM / MobileSAM checkpoints and verify them.

The file is written to ``<name>.part`` (resumed with an HTTP Range request if a previous try
was cut off), checked against the registry's SHA-256 and size, and only then renamed to its
final name, so a checkpoint under its final name is always a verified one.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from samlora.core.errors import UserError
from samlora.models import checkpoints
from samlora.models.checkpoints import (
    CHECKPOINTS,
    CHUNK_SIZE,
    MICROSAM_MODELS,
    MODEL_TYPES,
    CheckpointSpec,
    ChecksumError,
    MicroSamModel,
    get_spec,
    verify_file,
)

log = logging.getLogger(__name__)

USER_AGENT = "samlora-download/1.0 (python urllib)"
DEFAULT_TIMEOUT = 60.0
_NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException, ValueError)
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")  # Content-Range of a 416 answer


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (``URLError`` wraps the real reason)."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return " ".join(str(reason).split()) or type(reason).__name__


def _manual_hint(target: Path) -> str:
    return f"check the network, or download the file by hand and place it at {target.absolute()}"


def _range_total(value: str | None) -> int | None:
    """The file size a 416 answer reports in its ``Content-Range: bytes */SIZE`` header."""
    match = _UNSATISFIED_RANGE.fullmatch((value or "").strip())
    return int(match.group(1)) if match else None


def _fetch(url: str, part: Path, target: Path, timeout: float) -> None:
    """Download ``url`` into ``part``, resuming from ``part``'s length with a Range request.

    A server that ignores the Range (200 instead of 206) or refuses it (416) makes us start
    again from zero, unless the 416 says ``part`` is already complete.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
            log.info("resuming %s at byte %d", part, offset)
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            if _range_total(exc.headers.get("Content-Range")) == offset:
                return  # the .part already holds the whole file
            log.warning("server refused to resume %s (HTTP 416); starting again", part)
            part.unlink()
            return _fetch(url, part, target, timeout)
        raise UserError(
            f"{url} answered HTTP {exc.code} {exc.reason}; {_manual_hint(target)}"
        ) from None
    except _NETWORK_ERRORS as exc:
        raise UserError(
            f"cannot download {url} ({_one_line(exc)}); {_manual_hint(target)}"
        ) from None

    with response:
        if offset and response.status != 206:
            log.warning("server ignored the Range request; downloading %s from the start",
                        target.name)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=target.name, disable=None,
        ) as bar:
            try:
                while chunk := response.read(CHUNK_SIZE):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise UserError(
                    f"download of {url} was interrupted ({_one_line(exc)}); "
                    f"rerun the same command to resume from {part}"
                ) from None


def download(
    spec: CheckpointSpec,
    output_dir: str | Path,
    url: str | None = None,
    overwrite: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Make sure ``output_dir/spec.filename`` exists and matches ``spec``; return its path.

    A present file that verifies is kept (no network access); one that does not is left alone
    and reported, unless ``overwrite``. ``url`` replaces ``spec.url`` (a mirror); the file is
    still checked against ``spec``.

    Raises:
        UserError: no network, an HTTP error, a corrupted download (nothing is left behind),
            or a present file that fails verification without ``overwrite``.
    """
    target = Path(output_dir) / spec.filename
    part = target.with_name(target.name + ".part")
    url = url or spec.url
    if target.exists() and not overwrite:
        try:
            verify_file(target, spec)
        except ChecksumError as exc:
            raise UserError(
                f"present file fails verification: {exc}; it was left untouched: "
                "rerun with --overwrite to replace it"
            ) from None
        log.info("%s is already present and verified; skipping", target)
        return target

    if part.exists() and (overwrite or (spec.size is not None and part.stat().st_size > spec.size)):
        part.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not (part.exists() and part.stat().st_size == spec.size):
        log.info("downloading %s to %s", url, target)
        _fetch(url, part, target, timeout)
    try:
        verify_file(part, spec)
    except ChecksumError as exc:
        part.unlink()
        raise UserError(f"download from {url} is corrupted and was deleted: {exc}") from None
    os.replace(part, target)
    log.info("%s verified (%s)", target, f"xxh128 {spec.xxh128}" if spec.xxh128 else f"sha256 {spec.sha256_prefix}...")
    return target


def download_microsam(model: MicroSamModel, output_dir: str | Path, overwrite: bool = False,
                      timeout: float = DEFAULT_TIMEOUT) -> Path:
    """One of micro-sam's fine-tuned models: both files fetched and checked (XXH128) under
    ``output_dir/micro_sam/``, then ``output_dir/<name>.pt`` written in micro-sam's combined
    layout (``model_state`` + ``decoder_state``) for ``--checkpoint`` (with ``--model_type``
    ``model.model_type``). A present combined file is kept unless ``overwrite``."""
    target = Path(output_dir) / model.filename
    if target.exists() and not overwrite:
        log.info("%s is already present; skipping (--overwrite rebuilds it)", target)
        return target
    folder = Path(output_dir) / "micro_sam"
    encoder = download(model.encoder, folder, overwrite=overwrite, timeout=timeout)
    decoder_file = download(model.decoder, folder, overwrite=overwrite, timeout=timeout)
    sam_state = checkpoints.read_state_dict(encoder)
    checkpoints.check_model_type(sam_state, encoder, model.model_type)
    try:
        decoder = torch.load(decoder_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for an unreadable file
        raise UserError(f"{decoder_file} is not a readable decoder state ({type(exc).__name__}): "
                        "rerun with --overwrite") from None
    if not isinstance(decoder, dict) or not decoder or not all(isinstance(v, torch.Tensor) for v in decoder.values()):
        raise UserError(f"{decoder_file} holds no decoder state dict: rerun with --overwrite")
    part = target.with_name(target.name + ".part")
    torch.save(checkpoints.combined_state(sam_state, decoder), part)
    os.replace(part, target)
    log.info("%s: micro-sam's %s with its AIS decoder, combined; use it with --checkpoint %s --model_type %s",
             target, model.name, target, model.model_type)
    return target


def _sha256_arg(value: str) -> str:
    value = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise argparse.ArgumentTypeError("expected 64 hex characters (a full SHA-256)")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the epilog's one-line-per-checkpoint layout."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``download`` on the top-level parser."""
    manual = "\n".join(
        f"  {s.model_type}: {s.url}\n         -> <output_dir>/{s.filename}"
        for s in CHECKPOINTS.values()
    ) + "\nmicro-sam's models with an AIS decoder (two files each, combined into <output_dir>/<name>.pt):\n" + "\n".join(
        f"  {m.name}: {m.encoder.url}\n         {m.decoder.url}" for m in MICROSAM_MODELS.values())
    parser = subparsers.add_parser(
        "download",
        help="download and verify pretrained SAM / MobileSAM checkpoints",
        description="Download the official pretrained checkpoints and verify their SHA-256. "
        "An interrupted download resumes from its .part file; a file is renamed to its final "
        "name only once verified, and a present, verified file is not downloaded again.",
        epilog="Without network, copy the files by hand:\n" + manual,
        formatter_class=_HelpFormatter,
    )
    what = parser.add_argument_group("what to download")
    what.add_argument("--model_type", choices=(*MODEL_TYPES, "all", *MICROSAM_MODELS), default="vit_t",
                      help="checkpoint to fetch: vit_t is MobileSAM, vit_b/vit_l/vit_h are SAM ('all': these "
                           "four); vit_*_lm / vit_*_em_organelles are micro-sam's fine-tuned models with their "
                           "AIS decoder, written as <output_dir>/<name>.pt (use with --checkpoint and the "
                           "backbone as --model_type)")
    what.add_argument("--output_dir", type=Path, default=Path("weights"),
                      help="folder the checkpoints are written to")
    what.add_argument("--overwrite", action="store_true",
                      help="download again even if the file is present (it is replaced only once "
                           "the new copy is verified) and discard any partial .part file")
    mirror = parser.add_argument_group("mirrors (only with a single --model_type)")
    mirror.add_argument("--url", default=None,
                        help="download from this URL instead of the official one; the file is "
                             "still checked against the official SHA-256 unless --sha256 is given")
    mirror.add_argument("--sha256", type=_sha256_arg, default=None,
                        help="expected full SHA-256 of the file, replacing the official hash and "
                             "size (for a mirror that serves a different file)")
    network = parser.add_argument_group("network")
    network.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                         help="seconds to wait for the server to answer or to send more data")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Download every requested checkpoint; raises :class:`UserError` on the first failure."""
    if args.model_type == "all" and (args.url or args.sha256):
        raise UserError("--url and --sha256 describe one file: use them with a single "
                        "--model_type, not 'all'")
    if args.model_type in MICROSAM_MODELS:
        if args.url or args.sha256:
            raise UserError("--url and --sha256 are for the SAM / MobileSAM checkpoints, not micro-sam's models")
        model = MICROSAM_MODELS[args.model_type]
        path = download_microsam(model, args.output_dir, overwrite=args.overwrite, timeout=args.timeout)
        log.info("%s ready: %s (--checkpoint %s --model_type %s)", model.name, path, path, model.model_type)
        return 0
    model_types = MODEL_TYPES if args.model_type == "all" else (args.model_type,)
    for model_type in model_types:
        spec = get_spec(model_type)
        if args.sha256:
            spec = dataclasses.replace(spec, sha256=args.sha256, sha256_prefix=None, size=None)
        path = download(spec, args.output_dir, url=args.url, overwrite=args.overwrite,
                        timeout=args.timeout)
        log.info("%s checkpoint ready: %s", model_type, path)
    return 0
