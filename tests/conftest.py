"""Shared fixtures: paths to the real sample data and the repository root on sys.path."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: real microscopy samples made by others (see its README)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny inputs: intra-op threads only slow a busy 2-core machine down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def main():
    """``main.main``; afterwards its console handler never keeps a closed capture stream."""
    import main as main_module

    yield main_module.main
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_samlora", False) and getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr
