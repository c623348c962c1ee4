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
        xxh128: full hex XXH128 digest, the only checksum micro-sam's registry publishes for its
            fine-tuned models (checked instead of the SHA-256 when given; needs ``xxhash``).
    """

    model_type: str
    url: str
    filename: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None
    xxh128: str | None = None

    def __post_init__(self) -> None:
        if self.xxh128 is not None:
            if len(self.xxh128) != 32 or not _HEX.fullmatch(self.xxh128):
                raise ValueError(f"{self.model_type}: xxh128 must be 32 lowercase hex characters")
            if self.sha256 is None and self.sha256_prefix is None:
                return
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


@dataclass(frozen=True)
class MicroSamModel:
    """One of micro-sam's published fine-tuned models with an AIS decoder: two files (SAM's
    weights, the decoder's state), checked by micro-sam's XXH128 digests, that ``download``
    combines into ``<name>.pt`` in micro-sam's combined layout for ``--checkpoint``.

    Args:
        name: micro-sam's model name (``vit_b_lm``), also ``download --model_type``'s value.
        model_type: the backbone (``vit_b``): pass it as ``--model_type`` with the file.
        encoder, decoder: the two files (stored under ``<output_dir>/micro_sam/``).
    """

    name: str
    model_type: str
    encoder: CheckpointSpec
    decoder: CheckpointSpec

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"


_BIOIMAGE_IO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/"


def _microsam(name: str, folder: str, encoder_xxh128: str, decoder_xxh128: str) -> MicroSamModel:
    """Registry entry; URLs and digests exactly as micro-sam 1.8.14's ``micro_sam/util.py`` ``models()``."""
    backbone = name[:5]
    return MicroSamModel(
        name, backbone,
        CheckpointSpec(backbone, f"{_BIOIMAGE_IO}{folder}/files/{backbone}.pt", f"{name}.pt", xxh128=encoder_xxh128),
        CheckpointSpec(backbone, f"{_BIOIMAGE_IO}{folder}/files/{backbone}_decoder.pt", f"{name}_decoder.pt",
                       xxh128=decoder_xxh128))


MICROSAM_MODELS: dict[str, MicroSamModel] = {
    model.name: model
    for model in (
        _microsam("vit_l_lm", "idealistic-rat/1.2", "017f20677997d628426dec80a8018f9d",
                  "2faeafa03819dfe03e7c46a44aaac64a"),
        _microsam("vit_b_lm", "diplomatic-bug/1.2", "fe9252a29f3f4ea53c15a06de471e186",
                  "708b15ac620e235f90bb38612c4929ba"),
        _microsam("vit_t_lm", "faithful-chicken/1.1", "72ec5074774761a6e5c05a08942f981e",
                  "3e914a5f397b0312cdd36813031f8823"),
        _microsam("vit_l_em_organelles", "humorous-crab/1.2", "810b084b6e51acdbf760a993d8619f2d",
                  "334877640bfdaaabce533e3252a17294"),
        _microsam("vit_b_em_organelles", "noisy-ox/1.2", "f3bf2ed83d691456bae2c3f9a05fb438",
                  "bb6398956a6b0132c26b631c14f95ce2"),
        _microsam("vit_t_em_organelles", "greedy-whale/1", "253474720c497cce605e57c9b1d18fd9",
                  "8f897c7bb93174a4d1638827c4dd6f44"),
    )
}
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


def xxh128_file(path: str | Path) -> str:
    """Hex XXH128 of a file (micro-sam's checksum), read in 1 MiB chunks."""
    try:
        import xxhash
    except ImportError:
        raise UserError("checking micro-sam's models needs the xxhash package (their only published "
                        "checksum is XXH128): pip install xxhash") from None
    digest = xxhash.xxh128()
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
    if spec.xxh128 is not None:
        actual = xxh128_file(path)
        if actual != spec.xxh128:
            raise ChecksumError(f"{path} has XXH128 {actual}, expected {spec.xxh128}")
        return
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


#: Keys of micro-sam's combined checkpoint (``export_custom_sam_model(..., with_segmentation_decoder=True)``,
#: our ``train --export_merged`` with an AIS decoder): SAM's state dict and the decoder's.
MODEL_STATE, DECODER_STATE = "model_state", "decoder_state"
_TORCH_EM_PREFIX = "sam."  # torch_em training checkpoints name SAM's tensors sam.*; micro-sam strips it
#: ``instance_decoder.PREFIX`` (that module imports sam, which imports this one: spelled out here,
#: and a test holds the two equal).
DECODER_PREFIX = "instance_decoder."


def _load(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``, memory-mapped where the format allows."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        try:  # memory-mapped: checking a 2.5 GB file's keys costs no reading
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (non-zip) format cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}): re-download it with "
            "`python main.py download` or pass the right file with --checkpoint"
        ) from None


def _is_tensor_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """A checkpoint's SAM tensors and, for a combined file, its AIS ``decoder_state`` (else None).

    Reads SAM's plain state dicts, ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and
    micro-sam's combined layout ``{"model_state": ..., "decoder_state": ...}`` (other keys, e.g.
    an optimizer's, are ignored; a ``sam.`` key prefix is stripped as micro-sam's loader does).
    ``instance_decoder.*`` tensors in a state dict are taken as the decoder's.

    Raises:
        UserError: no file, not a torch file, no SAM state dict, or a damaged ``decoder_state``.
    """
    path = Path(path)
    state = _load(path)
    decoder: object = None
    if isinstance(state, dict) and isinstance(state.get(MODEL_STATE), dict):
        decoder = state.get(DECODER_STATE)
        state = {k[len(_TORCH_EM_PREFIX):] if k.startswith(_TORCH_EM_PREFIX) else k: v
                 for k, v in state[MODEL_STATE].items()}
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not _is_tensor_dict(state):
        raise UserError(f"{path} holds no model state dict (is it a LoRA adapter? pass it with --model_path)")
    carried = {k[len(DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIX)}
    if decoder is None and carried:
        decoder = carried
    if decoder is not None and (not _is_tensor_dict(decoder) or not decoder):
        raise UserError(f"{path}: its '{DECODER_STATE}' is damaged (not a dict of tensors): export or download "
                        "the combined file again, or pass the plain SAM checkpoint")
    return state, decoder


def plain_sam_path(combined: str | Path) -> Path:
    """Where ``train --export_merged PATH`` puts the plain SAM state dict beside a combined file:
    ``<stem>_sam<suffix>`` (``model.pt`` -> ``model_sam.pt``), for segment_anything / mobile_sam's
    ``sam_model_registry[model_type](checkpoint=...)``, which cannot read the combined layout."""
    combined = Path(combined)
    return combined.with_name(f"{combined.stem}_sam{combined.suffix or '.pt'}")


def combined_state(sam_state: dict[str, torch.Tensor], decoder_state: dict[str, torch.Tensor]) -> dict:
    """micro-sam's combined checkpoint: what ``get_sam_model`` (``model_state``) and
    ``get_predictor_and_decoder`` (``decoder_state``) read. ``sam_state`` must hold no decoder keys."""
    if any(k.startswith(_TORCH_EM_PREFIX) or k.startswith(DECODER_PREFIX) for k in sam_state):
        raise ValueError("sam_state must be SAM's own keys (no sam. prefix, no instance_decoder.* tensors)")
    if not decoder_state:
        raise ValueError("decoder_state is empty")
    return {MODEL_STATE: dict(sam_state), DECODER_STATE: dict(decoder_state)}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's SAM tensors (``weights_only=True``), unwrapping ``{"model": ...}``,
    ``{"state_dict": ...}`` and micro-sam's ``{"model_state": ...}``; see :func:`read_checkpoint`."""
    return read_checkpoint(path)[0]


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


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_checkpoint` read: the file's SHA-256 and, for a combined file, the AIS
    decoder's ``decoder_state`` (micro-sam's keys) or None."""

    sha256: str
    decoder_state: dict[str, torch.Tensor] | None = None


def load_checkpoint(sam: nn.Module, path: str | Path, model_type: str) -> LoadedWeights:
    """Load SAM/MobileSAM weights from ``path`` into ``sam`` (built for ``model_type``); returns
    the file's SHA-256 (the base weights' identity in ``ModelInfo`` and adapter files, computed on
    the whole file, combined or not) and the decoder state a combined file carries.

    Refuses files of another model type and files missing any of the model's tensors;
    unexpected extra keys are reported as a warning.
    """
    state, decoder = read_checkpoint(path)
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
    log.info("loaded %s weights from %s (sha256 %s...)", model_type, path, sha256[:12])  # combined.py logs a decoder
    return LoadedWeights(sha256, decoder)


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
