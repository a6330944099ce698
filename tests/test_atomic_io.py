"""atomic_io.atomic_write: all of the file or none of it, with an ordinary file's mode."""

from __future__ import annotations

import os
import stat

import pytest

from adapprox_cli.atomic_io import atomic_write


def test_writes_the_file_with_the_umask_mode_and_leaves_no_temporary(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "sub" / "out.bin", lambda t: t.write_bytes(b"abc"))
    finally:
        os.umask(old)
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 & ~0027, not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def failing(temporary):
        temporary.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
