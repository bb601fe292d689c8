"""The examples fail in one line, saying what to do, when a dependency or the service is
missing (instead of a traceback from every worker process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optserve.store.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["data_parallel", "federated"]


def run_example(name: str, *args: str, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_without_a_service_says_so_in_one_line(name: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_example(name, "--url", url)
    assert proc.returncode == 1
    assert proc.stderr == (f"{name}.py: is `optserve serve` running at {url}? Nothing answers "
                           "there.\n")
    assert proc.stdout == ""


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_without_scikit_learn_prints_the_install_command(name: str,
                                                                 tmp_path: Path) -> None:
    hidden = tmp_path / "sklearn"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('hidden by a test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = run_example(name, "--url", f"http://127.0.0.1:{free_port()}", env=env)
    assert proc.returncode == 1
    assert proc.stderr == (f"{name}.py needs scikit-learn, not installed here. Install with: "
                           'pip install "optserve[demo]"\n')
