"""Writing the converted state (``convert.output``): all of it or nothing at the target."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoint_factories import make_hf_trainer, make_nanogpt

from adapprox_cli.convert import output
from adapprox_cli.convert.checkpoint import convert_checkpoint


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, kind):
    truth = make_nanogpt(tmp_path) if kind == "file" else make_hf_trainer(tmp_path)
    out_dir = tmp_path / "dest"
    out_dir.mkdir()
    out = out_dir / ("ckpt.pt" if kind == "file" else "checkpoint-3")

    def failing_save(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(output, "_write_torch", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(truth.path, out)
    assert list(out_dir.iterdir()) == []
