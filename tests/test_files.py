"""Files replaced in one step (`edge_pllm.files`): new content or old, never half, and no
temporary file left behind."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from edge_pllm.files import atomic_write, replacing


def test_atomic_write_creates_and_replaces(tmp_path: Path):
    target = tmp_path / "manifest.json"
    assert atomic_write(target, "first") == target
    assert target.read_text() == "first"
    atomic_write(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    atomic_write(str(target), "dritte Zeile: ä")
    assert target.read_text(encoding="utf-8") == "dritte Zeile: ä"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    if sys.platform != "win32":
        assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "stamp.json"
    target.write_text("old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["stamp.json"]


def test_a_failed_writer_leaves_the_destination_alone(tmp_path: Path):
    target = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError, match="converter died"), replacing(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.gguf.")
        tmp.write_bytes(b"half a mod")
        raise RuntimeError("converter died")
    assert list(tmp_path.iterdir()) == []
    with replacing(target) as tmp:
        tmp.write_bytes(b"whole model")
    assert target.read_bytes() == b"whole model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_replacing_folder_swaps_in_whole_or_leaves_the_old_one(tmp_path):
    from edge_pllm.files import replacing_folder

    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), replacing_folder(dest) as work:
        (work / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary left
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    with replacing_folder(dest) as work:
        (work / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
