"""SAM / MobileSAM checkpoints: the official files (registry, verification) and reading one into a model.

``download_weights`` fetches the files of :data:`CHECKPOINTS`; :func:`resolve_checkpoint` turns
``--checkpoint`` into a checked path and :func:`load_checkpoint` loads it into a model built by
``model.build_model`` (position embeddings interpolated for other input sizes).

Where the values come from (checked against the sources, not from memory):

* SHA-256: micro-sam's model registry (``computational-cell-analytics/micro-sam``,
  ``micro_sam/util.py``, ``_CHECKSUMS``), which gives the full SHA-256 of all four files.
  Several unrelated projects pin the same values (e.g. download scripts that verify
  ``sam_vit_h_4b8939.pth`` against ``a7bf3b02...``).
* Sizes in bytes: many independent download manifests agree on each value (e.g. size tables
  listing ``sam_vit_h_4b8939.pth 2564550879``, a ``wget`` log of ``sam_vit_b_01ec64.pth``
  reporting ``Length: 375042383``, and a MobileSAM provenance record with
  ``upstream_checkpoint_size_bytes: 40_728_226`` at commit ``f706ad9``).

Beware: the six hex characters in SAM's file names (``sam_vit_b_01ec64.pth``) are the start
of the file's **MD5** (``01ec64d29a2fca3f0661936605ae66f8``), *not* of its SHA-256
(``ec2df627...``), so torch.hub's "file name carries the SHA-256 prefix" check would reject
the genuine files. ``sha256_prefix`` here is always the start of the real SHA-256.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samlora.core.errors import UserError

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20  # 1 MiB
PREFIX_LENGTH = 6
_HEX = re.compile(r"[0-9a-f]+")


class ChecksumError(ValueError):
    """A file's size or SHA-256 does not match what its :class:`CheckpointSpec` expects."""


@dataclass(frozen=True)
class CheckpointSpec:
    """One downloadable checkpoint and what a correct copy looks like.

    Args:
        model_type: registry key (``vit_t``, ``vit_b``, ...).
        url: where the official file is served.
        filename: the name it is stored under.
        sha256: full lowercase hex SHA-256, or None where no full value is published.
        sha256_prefix: leading hex characters of the SHA-256 (derived from ``sha256`` when
            that is given); the fallback check when ``sha256`` is None.
        size: expected size in bytes, or None when unknown (e.g. a mirror given by hash).
    """

    model_type: str
    url: str
    filename: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if self.sha256 is not None:
            if len(self.sha256) != 64 or not _HEX.fullmatch(self.sha256):
                raise ValueError(f"{self.model_type}: sha256 must be 64 lowercase hex characters")
            if self.sha256_prefix is None:
                object.__setattr__(self, "sha256_prefix", self.sha256[:PREFIX_LENGTH])
        if not self.sha256_prefix or not _HEX.fullmatch(self.sha256_prefix):
            raise ValueError(f"{self.model_type}: need a sha256 or a lowercase hex sha256_prefix")
        if self.sha256 is not None and not self.sha256.startswith(self.sha256_prefix):
            raise ValueError(f"{self.model_type}: sha256_prefix does not match sha256")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"{self.model_type}: size must be positive")


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

CHECKPOINTS: dict[str, CheckpointSpec] = {
    spec.model_type: spec
    for spec in (
        CheckpointSpec(
            "vit_t",  # MobileSAM (TinyViT encoder)
            "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            "mobile_sam.pt",
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            size=40_728_226,
        ),
        CheckpointSpec(
            "vit_b",
            _SAM_URL + "sam_vit_b_01ec64.pth",
            "sam_vit_b_01ec64.pth",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            size=375_042_383,
        ),
        CheckpointSpec(
            "vit_l",
            _SAM_URL + "sam_vit_l_0b3195.pth",
            "sam_vit_l_0b3195.pth",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            size=1_249_524_607,
        ),
        CheckpointSpec(
            "vit_h",
            _SAM_URL + "sam_vit_h_4b8939.pth",
            "sam_vit_h_4b8939.pth",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            size=2_564_550_879,
        ),
    )
}
MODEL_TYPES: tuple[str, ...] = tuple(CHECKPOINTS)
VIT_DEPTHS = {"vit_b": 12, "vit_l": 24, "vit_h": 32}  # encoder blocks: tells the SAM types apart


def get_spec(model_type: str) -> CheckpointSpec:
    """The registry entry for ``model_type``; ``ValueError`` naming the known types if absent."""
    try:
        return CHECKPOINTS[model_type]
    except KeyError:
        raise ValueError(
            f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}"
        ) from None


def default_checkpoint_path(model_type: str, weights_dir: str | Path = "weights") -> Path:
    """Where ``download`` puts the official checkpoint of ``model_type``."""
    return Path(weights_dir) / get_spec(model_type).filename


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (checkpoints are up to 2.4 GiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | Path, spec: CheckpointSpec) -> None:
    """Check ``path`` against ``spec``: size first (cheap), then the full SHA-256 or its prefix.

    Raises:
        ChecksumError: on a size or hash mismatch, saying what was expected and found.
    """
    path = Path(path)
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        raise ChecksumError(f"{path} has {size} bytes, expected {spec.size}")
    actual = sha256_file(path)
    expected = spec.sha256 or spec.sha256_prefix  # never None: see CheckpointSpec.__post_init__
    if expected is None or not actual.startswith(expected):
        raise ChecksumError(f"{path} has SHA-256 {actual}, expected {expected}")


# --------------------------------------------------------------------------------------------
# Reading a checkpoint into a model
# --------------------------------------------------------------------------------------------
def detect_model_type(state: dict[str, torch.Tensor]) -> str | None:
    """Guess which registry type a SAM state dict belongs to (``None`` if it is not SAM's)."""
    if any(k.startswith("image_encoder.layers.") for k in state):
        return "vit_t"
    blocks = {k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")}
    return {depth: name for name, depth in VIT_DEPTHS.items()}.get(len(blocks))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors with ``weights_only=True``; unwrap ``{"model": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        try:  # memory-mapped: checking a 2.5 GB file's keys costs no reading
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (non-zip) format cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}): re-download it with "
            "`python main.py download` or pass the right file with --checkpoint"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no model state dict (is it a LoRA adapter? pass it with --model_path)")
    return state


def _resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """1xHxWxC absolute position embedding -> 1xGxGxC (bicubic)."""
    resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos.dtype)


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(2L-1)xC relative position table -> length x C (linear), as SAM's ``get_rel_pos`` does."""
    resized = F.interpolate(table.float().T[None], size=length, mode="linear")
    return resized[0].T.to(table.dtype)


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Interpolate size-dependent tensors (position embedding, global rel-pos tables) to ``model``."""
    target = model.state_dict()
    adapted = dict(state)
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        if key.endswith("pos_embed") and value.ndim == 4:
            adapted[key] = _resize_pos_embed(value, target[key].shape[1])
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2:
            adapted[key] = _resize_rel_pos(value, target[key].shape[0])
    return adapted


def _file_stamp(path: str | Path) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a checkpoint, hashed once per (file, size, mtime): every fold builds the base
    model again, and hashing vit_h's 2.4 GiB each time would cost seconds per fold."""
    return sha256_file(path)


def check_model_type(state: dict[str, torch.Tensor], path: str | Path, model_type: str) -> None:
    """Refuse a state dict that is not SAM's, or that belongs to another model type."""
    found = detect_model_type(state)
    if found is None:
        raise UserError(f"{path} is not a SAM or MobileSAM checkpoint (no image_encoder weights found)")
    if found != model_type:
        raise UserError(
            f"{path} is a {found} checkpoint but --model_type is {model_type}: pass --model_type {found} "
            f"or the {model_type} weights (python main.py download --model_type {model_type})"
        )


def load_checkpoint(sam: nn.Module, path: str | Path, model_type: str) -> str:
    """Load SAM/MobileSAM weights from ``path`` into ``sam`` (built for ``model_type``); returns
    the file's SHA-256 (the base weights' identity in ``ModelInfo`` and adapter files).

    Refuses files of another model type and files missing any of the model's tensors;
    unexpected extra keys are reported as a warning.
    """
    state = read_state_dict(path)
    check_model_type(state, path, model_type)
    state = adapt_state_dict(state, sam)
    target = sam.state_dict()
    mismatched = [k for k, v in state.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        raise UserError(f"{path}: tensors of the wrong shape for {model_type}: {', '.join(mismatched[:5])}")
    missing, unexpected = sam.load_state_dict(state, strict=False)
    if missing:
        raise UserError(
            f"{path} lacks {len(missing)} tensors of {model_type} (e.g. {', '.join(missing[:3])}): "
            "the file is incomplete or not the official checkpoint"
        )
    if unexpected:
        log.warning("%s: ignored %d unexpected keys (e.g. %s)", path, len(unexpected), ", ".join(unexpected[:3]))
    sha256 = _cached_sha256(str(Path(path).resolve()), *_file_stamp(path))
    log.info("loaded %s weights from %s (sha256 %s...)", model_type, path, sha256[:12])
    return sha256


def resolve_checkpoint(model_type: str, checkpoint: str | None, weights_dir: str | Path = "weights",
                       announce: bool = True) -> Path | None:
    """``--checkpoint`` value -> a checked path, or None for random weights (``none``).

    The default (None) looks for the official file in ``weights_dir`` and stops with the
    download command when it is missing. The file's type is checked here (memory-mapped, so
    cheaply), before a command writes anything: a foreign file or another model type's weights
    is a UserError. ``announce`` logs the random-weights warning.
    """
    if checkpoint is not None and checkpoint.lower() == "none":
        if announce:
            log.warning("RANDOM WEIGHTS (--checkpoint none): outputs are meaningless, for tests and smoke runs only")
        return None
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise UserError(f"checkpoint {path} does not exist: give the .pth file, or `none` for random weights")
    else:
        path = default_checkpoint_path(model_type, weights_dir)
        if not path.is_file():
            raise UserError(
                f"no {model_type} weights at {path}: run `python main.py download --model_type {model_type}` "
                "(or pass --checkpoint PATH, or --checkpoint none for random weights)"
            )
    check_model_type(read_state_dict(path), path, model_type)
    return path
