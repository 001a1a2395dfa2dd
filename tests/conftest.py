"""Shared test fixtures: a tiny built-in ImageFolder and modest CPU use."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tests share two CPU cores with other jobs. One intra-op thread: with more, OpenMP threads spin and wait
# for each other on a busy machine (measured: a small CNN step ran 5x slower with 2 threads than with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """ImageFolder root with train/ (8 per class) and val/ (4 per class), 10 classes, 32 px, seed 0."""
    from iar2.data.builtin import make_builtin

    root = tmp_path_factory.mktemp("tiny_data") / "builtin"
    return make_builtin(root, num_classes=10, train_per_class=8, val_per_class=4, size=32, seed=0)


@pytest.fixture(scope="session")
def ci_workspace_root(tmp_path_factory) -> Path:
    """A committed git copy of the working tree in which the whole ci-scale DAG (`reproduce_all`) has run once;
    shared by the workflow and DVC tests (tests that change it work on their own copy)."""
    import os
    import shutil
    import subprocess

    reuse = os.environ.get("IAR2_CI_WORKSPACE")  # a finished workspace of an earlier session (debugging only)
    if reuse:
        return Path(reuse)
    repo = Path(__file__).resolve().parent.parent
    root = tmp_path_factory.mktemp("ci_workspace") / "workspace"
    root.mkdir()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (repo / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, root / rel)
    env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="test",
               GIT_AUTHOR_EMAIL="test@example.org", GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.org")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tree"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    r = subprocess.run(["snakemake", "--cores", "2", "reproduce_all", "--config", "scale=ci"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stderr[-5000:]
    return root
