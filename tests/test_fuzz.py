"""Each fuzz target runs under atheris (coverage-guided) for a bounded number of inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_finds_no_crash(target: str) -> None:
    pytest.importorskip("atheris", reason="atheris is a dev dependency; install with make test")
    completed = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", target, "-runs=3000", "-seed=1", "-max_len=4096"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Done 3000 runs" in completed.stderr
