"""A base model from any checkpoint, with the AIS decoder a combined checkpoint carries.

micro-sam's combined layout (``{"model_state": SAM, "decoder_state": decoder}``, read by
:func:`checkpoints.read_checkpoint`) holds SAM's weights and an AIS decoder. :func:`build_model`
is ``sam.build_model`` plus that decoder attached as ``sam.instance_decoder``, so that ``detect
--mode ais`` uses it and ``train --instance_decoder`` fine-tunes it. It lives here, not in
``sam.py``: ``instance_decoder`` imports ``sam``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from samlora.core.errors import UserError
from samlora.models import checkpoints, instance_decoder
from samlora.models import sam as sam_model
from samlora.models.model_info import LoadedModel

log = logging.getLogger(__name__)


def build_model(model_type: str, checkpoint: str | Path | None = None, image_size: int = 1024) -> LoadedModel:
    """:func:`sam.build_model`, and a combined checkpoint's ``decoder_state`` attached as
    ``sam.instance_decoder`` (built for ``image_size``). ``info.checkpoint_sha256`` is the whole
    file's SHA-256, combined or not.

    Raises:
        UserError: as ``sam.build_model``, or a ``decoder_state`` that is no AIS decoder.
    """
    loaded = sam_model.build_model(model_type, checkpoint, image_size)
    if checkpoint is None:
        return loaded
    _, state = checkpoints.read_checkpoint(checkpoint)  # memory-mapped: a second read costs little
    if state is not None:
        try:
            decoder = instance_decoder.decoder_from_state(state, image_size)
        except ValueError as exc:
            raise UserError(f"{checkpoint}: its decoder_state is damaged ({exc}): export or download the combined "
                            "file again, or pass the plain SAM checkpoint") from None
        instance_decoder.attach(loaded.sam, decoder.eval())  # in eval mode, as sam.build_model leaves the model
        log.info("%s carries an AIS decoder (%d tensors): attached as sam.%s", checkpoint, len(state),
                 instance_decoder.ATTRIBUTE)
    return loaded
