"""Shared fixtures: paths to the real assets in ../shared/assets (override with AUTOMODEL_ASSETS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", REPO_ROOT.parent / "shared" / "assets")).resolve()
STORIES = ASSETS / "models" / "stories260K"
SQUAD_TRAIN = ASSETS / "squad_v1.1" / "train-v1.1.subset.json"
SQUAD_DEV = ASSETS / "squad_v1.1" / "dev-v1.1.part_a.json"


def pytest_configure(config):
    if not STORIES.is_dir():
        raise pytest.UsageError(f"shared assets not found at {ASSETS}: set AUTOMODEL_ASSETS")
    # Two cores here: one intra-op thread per test process keeps parallel runs from thrashing.
    import torch

    torch.set_num_threads(int(os.environ.get("AUTOMODEL_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return STORIES


@pytest.fixture(scope="session")
def stories_tokenizer():
    from automodel.models import load_tokenizer

    return load_tokenizer(str(STORIES))
