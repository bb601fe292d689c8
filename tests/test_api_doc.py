"""docs/API.md is for pasting: every shell block in it runs, in order, against a real server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from optserve_client import spec

DOC = Path(__file__).resolve().parent.parent / "docs" / "API.md"


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("jq") is None,
                    reason="needs curl and jq (apt-get install curl jq)")
def test_every_curl_example_runs(live_server: str, tmp_path: Path) -> None:
    blocks = _blocks()
    assert len(blocks) >= 10
    script = "set -euo pipefail\n" + "\n".join(blocks)
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"URL": live_server, "PATH": _path()})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    # What the doc says the examples show, checked on their real output.
    first = json.JSONDecoder().raw_decode(text)[0]["tensors"]["w"]["data"]
    assert first == _torch_rmsprop_step() == _documented_step()
    assert re.search(r'(?im)^etag: "1"', text)
    assert re.search(r"(?im)^x-optserve-version: 2", text)
    assert '"code":"unknown_tensor"' in text
    assert "200 200" in text  # both sync contributions answered
    assert '200 200 200 \n{"contributions":null,"min_contributions":null,"timeout_s":30,' \
        '"target_weight":32,"min_weight":32}\nx-optserve-version: 2' in text  # target weight
    assert "204 204 204" in text
    assert text.rstrip().endswith("session_not_found")


def _torch_rmsprop_step() -> list[float]:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.RMSprop([w], lr=0.01)
    w.grad = torch.tensor([0.5, -0.5])
    opt.step()
    return w.detach().tolist()


def _documented_step() -> list[float]:
    m = re.search(r'The step answers `(\{.*?\})`', DOC.read_text(), flags=re.S)
    assert m is not None
    return json.loads(m.group(1).replace("\n", " "))["tensors"]["w"]["data"]


def _path() -> str:
    import os
    import sys

    return f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"


def test_every_problem_code_is_documented() -> None:
    text = DOC.read_text()
    missing = {code for code in spec.PROBLEMS if f"`{code}`" not in text}
    assert not missing, f"docs/API.md does not document {sorted(missing)}"
