"""The server's layering, checked on its source with `ast`: HTTP lives in `api/` only.

Outside `api/` and the ASGI/CLI entry points no module imports fastapi or starlette, names
the HTTP `Problem`, or knows a status number; domain errors carry a problem code from
`optserve_client.spec`, and `api/problems.py` alone turns it into a status.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import optserve
from optserve.errors import DomainError, SessionBusy
from optserve.session import SessionMeta
from optserve_client.spec import PROBLEMS

ROOT = Path(optserve.__file__).resolve().parent
EDGE = {"app.py", "cli.py", "local.py"}
HTTP_PACKAGES = {"fastapi", "starlette"}
STATUS_NAMES = {"status", "status_code"}


def _below_api() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("api/") or rel in EDGE:
            continue
        out.append((rel, ast.parse(path.read_text(), filename=rel)))
    return out


def _is_status(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int \
        and 100 <= node.value <= 599


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _http_knowledge(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in HTTP_PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in HTTP_PACKAGES:
                found.append(f"{where}: from {node.module} import ...")
            found += [f"{where}: imports Problem" for a in node.names if a.name == "Problem"]
        elif _name(node) == "Problem":
            found.append(f"{where}: uses Problem")
        elif isinstance(node, ast.keyword) and node.arg in STATUS_NAMES and _is_status(node.value):
            found.append(f"{where}: {node.arg}={node.value.value}")  # type: ignore[attr-defined]
        elif isinstance(node, ast.Dict):
            found += [f"{where}: {{{k.value!r}: {v.value}}}" for k, v in  # type: ignore
                      zip(node.keys, node.values, strict=True)
                      if isinstance(k, ast.Constant) and k.value in STATUS_NAMES
                      and _is_status(v)]
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_name(s) in STATUS_NAMES for s in sides) and any(map(_is_status, sides)):
                found.append(f"{where}: compares a status")
        elif isinstance(node, ast.Call) and (_name(node.func) or "").endswith(
                ("Error", "Exception", "Problem", "Busy", "Conflict")):
            found += [f"{where}: {_name(node.func)}({a.value}, ...)"  # type: ignore
                      for a in node.args if _is_status(a)]
    return found


def test_no_http_below_the_api() -> None:
    modules = _below_api()
    assert {"engine.py", "rounds.py", "store/redis_store.py", "checks.py"} <= {
        rel for rel, _ in modules}
    offenders = {rel: hits for rel, tree in modules if (hits := _http_knowledge(tree))}
    assert offenders == {}


def test_the_check_sees_http() -> None:
    """The checker itself finds each kind of HTTP knowledge (so a pass means something)."""
    src = ("from fastapi import Request\nimport starlette.responses\n"
           "from .api.problems import Problem\nraise Problem(409, 'no_params', 'x')\n"
           "r = {'status': 200}\nf(status_code=503)\nif exc.status == 404: pass\n")
    hits = _http_knowledge(ast.parse(src))
    assert len(hits) == 8, hits


def test_raised_codes_are_in_the_spec() -> None:
    """Every literal code given to DomainError below the API is a contract code."""
    codes = set()
    for _, tree in _below_api():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) == "DomainError" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                codes.add(node.args[0].value)
    assert len(codes) > 20 and codes <= set(PROBLEMS), codes - set(PROBLEMS)


def test_unknown_code_fails_loudly() -> None:
    with pytest.raises(ValueError, match="no_such_code"):
        DomainError("no_such_code", "never sent")
    busy = SessionBusy("session s stayed locked")
    assert (busy.code, busy.retry_after) == ("session_busy", 1)
    assert busy.detail == "session s stayed locked; nothing was applied, retry"


def test_session_document_round_trips_byte_for_byte() -> None:
    """A document as earlier servers wrote it (json.dumps of a dict, this key order) reads,
    and writes back as the same bytes."""
    old = {"id": "abc", "tenant": "default", "name": None, "optimizer": "rmsprop",
           "hyperparams": {"lr": 0.001, "alpha": 0.99, "centered": False},
           "mode": "sync", "max_staleness": 3,
           "sync": {"contributions": 2, "min_contributions": 1, "timeout_s": 5.0},
           "tensors": {"w": {"dtype": "float32", "shape": [2, 3]},
                       "b": {"dtype": "float64", "shape": []}},
           "created_at": 1700000000.123456}
    raw = json.dumps(old)
    meta = SessionMeta.from_json(raw)
    assert meta.tensors["w"].shape == (2, 3) and meta.sync is not None
    assert meta.sync.min_contributions == 1 and meta.is_sync
    assert meta.to_json() == raw
    changed = meta.replace(name="n")
    assert json.loads(changed.to_json()) == {**old, "name": "n"} and meta.name is None
