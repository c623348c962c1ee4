"""The automatic modes of an evaluation: what each model runs (amg, ais, apg), its settings, its rows' names.

``amg`` is SAM's automatic mask generator (a point grid); ``ais`` the instance decoder a model
carries (``train --instance_decoder``; instance_decoder.attach), its maps turned into objects by
the seeded watershed; ``apg`` one click per seed region of those maps, drawn by SAM's mask decoder
(inference/automatic.py, built by its build_segmenter). ais / apg use the watershed thresholds the adapter records (its config's
``"watershed"``: WatershedOptions fields, chosen on validation data after training), micro-sam's
defaults otherwise. With several modes in one evaluation each model gets a row per mode, named
``NAME+MODE`` (:func:`mode_row_name`), so they set side by side as in micro-sam's tables.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from samlora.core.errors import OptionError, UserError
from samlora.inference import segmenter
from samlora.inference.instance_watershed import WatershedOptions
from samlora.inference.segmenter import DECODER_MODES
from samlora.training import ais
PROTOCOLS = {
    **segmenter.PROTOCOLS,
    "amg": segmenter.PROTOCOLS["auto"],
    "ais": "the instance decoder's foreground / centre / boundary distance maps -> seeded watershed "
           "(thresholds: the adapter's 'watershed', else micro-sam's defaults; no ground truth)",
    "apg": "one click per seed region of the instance decoder's maps, the best of SAM's three masks by "
           "predicted IoU, overlaps to the higher predicted IoU (no ground truth)",
}


def mode_row_name(name: str, mode: str, modes: Sequence[str]) -> str:
    """The rows of model ``name`` in ``mode``: its own name when the evaluation has one mode, else
    ``NAME+MODE`` (e.g. ``finetuned+ais``)."""
    return name if len(modes) == 1 else f"{name}+{mode}"


def protocol(modes: Sequence[str]) -> str:
    """The prompt protocol of the evaluation (summary.json ``prompt_protocol``)."""
    if len(modes) == 1:
        return PROTOCOLS[modes[0]]
    return "; ".join(f"{mode}: {PROTOCOLS[mode]}" for mode in modes)


def model_modes(requested: Sequence[str], has_decoder: bool, what: str) -> tuple[str, ...]:
    """The ``requested`` automatic modes a model runs: ais / apg only when it carries an instance
    decoder. A model left with none (``what`` names it) is an :class:`OptionError`."""
    modes = tuple(m for m in requested if has_decoder or m not in DECODER_MODES)
    if not modes:
        raise OptionError(f"{{prompt}} {','.join(requested)}: {what} has no instance decoder, which modes "
                          f"{' and '.join(DECODER_MODES)} need; give an adapter trained with `python main.py train "
                          "--instance_decoder` (or a --checkpoint holding a decoder_state), or add amg to "
                          "{prompt} to score this model with SAM's automatic mask generator")
    return modes


def watershed_of(config: Mapping[str, Any], where: Path | str) -> WatershedOptions:
    """The seeded watershed's thresholds an adapter's ``config`` records (training/ais.py's
    :func:`ais.watershed_of`: micro-sam's defaults when it records none); ``where`` names the
    file in the :class:`UserError` of a damaged record."""
    try:
        return ais.watershed_of(dict(config))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: its config's {ais.WATERSHED_KEY!r} thresholds are not usable ({exc}); retrain "
                        "the adapter or give another one") from None


def segment_options(mode: str, watershed: WatershedOptions, precision: str, batch_prompts: int | None,
                    points_per_side: int, pred_iou_thresh: float | None,
                    stability_score_thresh: float | None, chunk: int) -> segmenter.SegmentOptions:
    """The options of :class:`segmenter.Segmenter` for one automatic ``mode`` on whole images (no
    tiles: every image is scored as one, as the prompted modes score it). ``pred_iou_thresh`` /
    ``stability_score_thresh`` None: the mode's defaults (segmenter.MASK_FILTERS: amg 0.88 / 0.95,
    apg none); ``batch_prompts``: the generator's points per batch (None: 64); ``chunk``: APG's
    clicks per decoder call."""
    return segmenter.SegmentOptions(
        mode=mode, box_batch=chunk, tile_size=0, precision=precision, points_per_side=points_per_side,
        points_per_batch=batch_prompts or 64, pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh, watershed=watershed)
