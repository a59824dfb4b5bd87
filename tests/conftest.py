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


MAX_WORKERS = 4  # each pytest-xdist worker holds its own torch and models: more would cost memory, not time


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject addopts): one worker per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


# The files that take a minute or more of one worker (`pytest --durations=0`, summed per file), longest first.
# pytest-xdist's `--dist loadfile` hands files to the workers in collection order (with `--no-loadscope-reorder`,
# pyproject's addopts: by default it reorders files by their number of tests, which put one-test files of a minute
# or more last); a long file collected last runs alone at the end while the other worker idles, so these are
# collected first.
LONGEST_FILES = ("tests/test_main_job.py", "tests/test_distributed.py", "tests/test_gguf_export.py",
                 "tests/test_resume.py", "tests/models/test_architectures.py",
                 "tests/models/test_fsdp2_architectures.py", "tests/test_docs.py", "tests/models/test_gguf.py",
                 "tests/inference/test_vllm_server.py", "tests/test_kd.py", "tests/test_gguf_export_families.py",
                 "tests/models/test_families_vllm.py", "tests/test_precision_curves.py",
                 "tests/test_distributed_bf16.py", "tests/test_gguf_export_own_families.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_configure(config):
    if not STORIES.is_dir():
        raise pytest.UsageError(f"shared assets not found at {ASSETS}: set AUTOMODEL_ASSETS")
    # The cores are shared by the xdist workers: more intra-op threads than that only thrash.
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    default = max(1, (os.cpu_count() or 1) // workers)
    threads = int(os.environ.get("AUTOMODEL_TEST_THREADS", str(default)))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for the runs tests start as subprocesses


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


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vLLM's CPU build in .venv-vllm, set up by the project's script when missing (a no-op when present). A file
    lock keeps two xdist workers from installing it at once."""
    import fcntl
    import subprocess

    with open(REPO_ROOT / ".setup_vllm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["bash", "scripts/setup_vllm.sh"], cwd=REPO_ROOT, check=True, timeout=3600)
    return REPO_ROOT / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="session")
def llamacpp_python() -> Path:
    """llama.cpp's Python binding in .venv-llamacpp, built by the project's script when missing (a no-op when
    present; the first build takes about 5 minutes). A file lock keeps two xdist workers from building it at once."""
    import fcntl
    import subprocess

    with open(REPO_ROOT / ".setup_llamacpp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["bash", "scripts/setup_llamacpp.sh"], cwd=REPO_ROOT, check=True, timeout=3600)
    return REPO_ROOT / ".venv-llamacpp" / "bin" / "python"
