"""Schemathesis over HTTP against a real server process, every check on, stateful phase included:
the document and the server must agree (statuses, media types, headers, schemas, Allow, auth)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.mark.slow
def test_schemathesis_all_checks_over_http(make_server: Any, tmp_path: Path) -> None:
    srv = make_server(api_keys="fuzz:fuzz-key", lock_timeout_s=5)
    # The stateful phase runs on its own: after the other phases in the same run,
    # schemathesis infers further links from what it saw and then covered none of them.
    for phases in ("examples,coverage,fuzzing", "stateful"):
        proc = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG),
             "--no-color", "run", f"{srv.url}/openapi.json", "-H",
             "Authorization: Bearer fuzz-key", "--checks", "all", "--phases", phases,
             "--max-examples", "10", "--seed", "1", "--workers", "1",
             "--request-timeout", "30"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
    links = re.search(r"API Links:\s+(\d+) covered", out)
    assert links and int(links.group(1)) > 0, out[-3000:]
