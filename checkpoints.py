"""Registry of the official pretrained SAM / MobileSAM checkpoints, and file verification.

Low level: imports no command module. ``download_weights`` fetches these files; model loading
can use :func:`default_checkpoint_path` and :func:`verify_file` to find and check them.

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

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

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
