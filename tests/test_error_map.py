"""Errors live in one place (edge_pllm/errors.py), and the server maps every one of them,
by type, to an HTTP status other than 500 (which is kept for bugs)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the [server] extra")

from edge_pllm import errors
from edge_pllm.errors import EdgePLLMError, PassphraseError, StoreMismatchError
from edge_pllm.server import error_body, status_of

ROOT = Path(__file__).resolve().parents[1]


def subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


def test_every_error_class_has_a_status_that_is_not_500():
    found = sorted(set(subclasses(EdgePLLMError)), key=lambda c: c.__name__)
    assert {"LLMError", "ExportError", "PassphraseError"} <= {c.__name__ for c in found}
    unmapped = [c.__name__ for c in found if status_of(c.__new__(c))[0] == 500]
    assert unmapped == []
    assert status_of(RuntimeError("a bug")) == (500, "server_error")


def test_passphrase_and_store_mismatch_errors_are_not_server_errors():
    status, body = error_body(PassphraseError("/x/history.db", "wrong"))
    assert (status, body["error"]["type"]) == (403, "permission_error")
    assert "passphrase is wrong" in body["error"]["message"]
    status, body = error_body(StoreMismatchError("/x/history.db", 384, 768))
    assert (status, body["error"]["type"]) == (409, "model_error")


def test_every_error_class_is_defined_in_errors_py():
    """A class deriving from an error of errors.py anywhere else in the runtime or the
    export side would escape the map above (and the CLI's handling)."""
    names = {
        n.name
        for n in ast.walk(ast.parse(Path(errors.__file__).read_text()))
        if isinstance(n, ast.ClassDef)
    }
    offenders = []
    for path in [*(ROOT / "edge_pllm").rglob("*.py"), *(ROOT / "export").rglob("*.py")]:
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {
                    b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
                }
                if bases & names:
                    offenders.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert offenders == []
