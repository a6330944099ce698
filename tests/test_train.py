"""The resume loop: exact resumption, Ctrl-C, the schedule, data sources, models and optimizers."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from adapprox_cli.errors import InputError
from adapprox_cli.optim import Adapprox
from adapprox_cli.plots import plot_loss_curves
from adapprox_cli.train.compare import compare_optimizers
from adapprox_cli.train.data import get_batch, write_nanogpt_dataset
from adapprox_cli.train.loop import TrainConfig, train
from adapprox_cli.train.model import GPT, GPTConfig, nanogpt_learning_rate, nanogpt_param_groups

TEXT = "the quick brown fox jumps over the lazy dog; a small cat sat on the old mat. " * 40
SCHEDULE = dict(learning_rate=2e-3, min_lr=2e-4, warmup_iters=4, lr_decay_iters=40, decay_lr=True)


def make_train_checkpoint(directory: Path, *, steps: int = 3, dropout: float = 0.1, n_embd: int = 32) -> Path:
    """A nanoGPT-layout ckpt.pt after a few AdamW steps, with train.bin/val.bin/meta.pkl beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_nanogpt_dataset(directory, TEXT)
    config = GPTConfig(
        block_size=16, vocab_size=vocab.vocab_size, n_layer=1, n_head=2, n_embd=n_embd, dropout=dropout
    )
    generator = torch.Generator().manual_seed(0)
    model = GPT(config, generator=generator)
    optimizer = torch.optim.AdamW(nanogpt_param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99))
    data = np.fromfile(directory / "train.bin", dtype=np.uint16)
    for _ in range(steps):
        x, y = get_batch(data, 16, 4, generator)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_config = {**SCHEDULE, "batch_size": 4, "block_size": 16, "grad_clip": 1.0, "weight_decay": 0.1}
    path = directory / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "model_args": config.model_args(),
            "iter_num": steps,
            "best_val_loss": torch.tensor(9.0),
            "config": train_config,
        },
        path,
    )
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return make_train_checkpoint(tmp_path / "source")


def _config(path: Path, **kw) -> TrainConfig:
    kw.setdefault("eval_iters", 2)
    kw.setdefault("out_dir", None)
    kw.setdefault("handle_signals", False)
    return TrainConfig(checkpoint=path, **kw)


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert first["iter_num"] == second["iter_num"]
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key
    for index, state in first["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, second["optimizer"]["state"][index][key]), (index, key)


@pytest.mark.parametrize("optimizer", ["adapprox", "adamw"])
def test_resume_is_bit_identical(checkpoint, tmp_path, optimizer):
    data = checkpoint.parent
    straight = train(
        _config(checkpoint, steps=6, optimizer=optimizer, out_dir=tmp_path / "straight", final_eval=False)
    )
    first = train(
        _config(checkpoint, steps=3, optimizer=optimizer, out_dir=tmp_path / "first", final_eval=False)
    )
    resumed = train(
        _config(
            tmp_path / "first" / "ckpt.pt",
            steps=3,
            optimizer=optimizer,
            data_dir=data,
            out_dir=tmp_path / "second",
            final_eval=False,
        )
    )
    assert resumed.start_iter == 6 and resumed.end_iter == straight.end_iter == 9
    assert resumed.source_optimizer == optimizer and resumed.conversion is None
    losses = [h["loss"] for h in first.history + resumed.history]
    assert losses == [h["loss"] for h in straight.history]
    assert [h["lr"] for h in first.history + resumed.history] == [h["lr"] for h in straight.history]
    _assert_same_checkpoint(tmp_path / "straight" / "ckpt.pt", tmp_path / "second" / "ckpt.pt")


def test_ctrl_c_saves_at_the_next_step_boundary(checkpoint, tmp_path):
    def interrupt(record):
        if record["event"] == "step" and record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    result = train(_config(checkpoint, steps=50, out_dir=tmp_path / "out", handle_signals=True), interrupt)
    assert signal.getsignal(signal.SIGINT) is previous
    assert result.interrupted and result.end_iter == 3 + 3
    saved = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] == 6 and saved["optimizer_kind"] == "adapprox"
    assert "exp_avg_sq_q" in saved["optimizer"]["state"][0]
    assert len(saved["sampler"]["generator_states"]) == 1


def test_schedule_continues_from_the_checkpoint(checkpoint):
    result = train(_config(checkpoint, steps=3, final_eval=False))
    expected = [nanogpt_learning_rate(i, 2e-3, 4, 40, 2e-4) for i in (3, 4, 5)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)
    overridden = train(_config(checkpoint, steps=1, learning_rate=1e-2, decay_lr=False, final_eval=False))
    assert overridden.history[0]["lr"] == 1e-2


def test_optimizers_state_memory_and_outputs(checkpoint, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    results = compare_optimizers(
        _config(checkpoint, steps=2, metrics_path=metrics, eval_interval=1), ["adamw", "adafactor"]
    )
    assert list(results) == ["adapprox", "adamw", "adafactor"]
    sizes = {name: r.state_bytes for name, r in results.items()}
    assert sizes["adafactor"] < sizes["adapprox"] < sizes["adamw"]
    assert results["adapprox"].conversion.bytes_before == sizes["adamw"]
    assert results["adapprox"].ranks and all(k >= 1 for k in results["adapprox"].ranks.values())
    for name, result in results.items():
        assert result.final_val_loss is not None and np.isfinite(result.final_val_loss)
        lines = [json.loads(line) for line in (tmp_path / f"metrics-{name}.jsonl").read_text().splitlines()]
        assert [r["event"] for r in lines].count("step") == 2 and lines[0]["event"] == "start"
    png = plot_loss_curves(results, tmp_path / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_text_input_and_grad_accum(checkpoint, tmp_path):
    text = tmp_path / "more.txt"
    text.write_text("the lazy dog sat on a quick cat. " * 30)
    result = train(_config(checkpoint, steps=2, text=text, grad_accum=2, final_eval=False))
    assert result.tokens_per_step == 2 * 4 * 16 and len(result.history) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("XYZ unknown characters")
    with pytest.raises(InputError, match="vocabulary"):
        train(_config(checkpoint, steps=1, text=bad))


def test_model_factory(checkpoint, tmp_path, monkeypatch):
    module = tmp_path / "my_models.py"
    module.write_text(
        "from adapprox_cli.train.model import GPT, GPTConfig\n"
        "import torch\n"
        f"def good():\n    return GPT(GPTConfig(**{torch.load(checkpoint, weights_only=True)['model_args']!r}))\n"
        "def wrong():\n    return GPT(GPTConfig(block_size=16, vocab_size=5, n_layer=1, n_head=2, n_embd=32))\n"
        "def not_a_module():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = train(_config(checkpoint, steps=1, model="my_models:good", final_eval=False))
    assert len(result.history) == 1
    with pytest.raises(InputError, match="do not fit"):
        train(_config(checkpoint, steps=1, model="my_models:wrong"))
    with pytest.raises(InputError, match=r"not a torch\.nn\.Module"):
        train(_config(checkpoint, steps=1, model="my_models:not_a_module"))
    with pytest.raises(InputError, match=r"package\.module:factory"):
        train(_config(checkpoint, steps=1, model="my_models"))
    with pytest.raises(InputError, match="cannot import"):
        train(_config(checkpoint, steps=1, model="no_such_module_here:make"))
    sys.modules.pop("my_models", None)


def test_clear_errors(checkpoint, tmp_path):
    with pytest.raises(InputError, match=r"train\.bin"):
        train(_config(checkpoint, steps=1, data_dir=tmp_path))
    with pytest.raises(InputError, match="unknown optimizer"):
        train(_config(checkpoint, steps=1, optimizer="sgd"))
    weights_only = tmp_path / "weights.pt"
    torch.save({"state": {}, "param_groups": []}, weights_only)
    with pytest.raises(InputError, match="no model weights"):
        train(_config(weights_only, steps=1))


def _ended_schedule_checkpoint(checkpoint: Path) -> Path:
    """The checkpoint moved past its lr_decay_iters (40), like the bundled sample at iteration 300."""
    container = torch.load(checkpoint, weights_only=True)
    container["iter_num"] = 50
    torch.save(container, checkpoint)
    return checkpoint


def test_lr_starts_a_fresh_schedule_when_the_checkpoints_has_ended(checkpoint, tmp_path, monkeypatch):
    _ended_schedule_checkpoint(checkpoint)
    used = []  # the lr each Adapprox.step actually ran with
    original_step = Adapprox.step

    def spying_step(self, closure=None):
        used.append(self.param_groups[0]["lr"])
        return original_step(self, closure)

    monkeypatch.setattr(Adapprox, "step", spying_step)
    stale = train(_config(checkpoint, steps=3, final_eval=False))
    assert used == [2e-4] * 3  # min_lr: the ended schedule...
    assert "ended at iteration 40" in stale.notes[0] and "--lr" in stale.notes[0]  # ...said aloud
    # --lr: warmup over a tenth of the steps, cosine to lr/10 at the last one, from iter_num 50.
    used.clear()
    fresh = train(
        _config(checkpoint, steps=20, learning_rate=1e-2, out_dir=tmp_path / "fresh", final_eval=False)
    )
    expected = [nanogpt_learning_rate(i, 1e-2, 2, 20, 1e-3) for i in range(20)]
    assert used == pytest.approx(expected) and [h["lr"] for h in fresh.history] == used
    assert (
        used[0] < used[1] < used[2] == pytest.approx(1e-2) and used[-1] < 1.1e-3
    )  # peak --lr, down to lr/10
    assert "starts a fresh one" in fresh.notes[0]
    saved = torch.load(tmp_path / "fresh" / "ckpt.pt", weights_only=True)
    assert saved["config"]["lr_schedule_start"] == 50 and saved["config"]["lr_decay_iters"] == 70
    # Its own checkpoint continues that schedule (ended: min_lr 1e-3), finding its data by itself.
    used.clear()
    train(_config(tmp_path / "fresh" / "ckpt.pt", steps=1, final_eval=False))
    assert used == pytest.approx([1e-3])


def test_schedule_still_running_keeps_its_shape_with_a_new_peak(checkpoint):
    result = train(_config(checkpoint, steps=2, learning_rate=1e-2, final_eval=False))
    assert [h["lr"] for h in result.history] == pytest.approx(
        [nanogpt_learning_rate(i, 1e-2, 4, 40, 2e-4) for i in (3, 4)]
    )
    assert result.notes == []


def test_comparison_checks_every_out_dir_before_training_and_resumes_each_run(checkpoint, tmp_path):
    config = _config(checkpoint, steps=1, out_dir=tmp_path / "cmp", final_eval=False)
    compare_optimizers(config, ["adamw"])
    (tmp_path / "cmp" / "adapprox" / "ckpt.pt").unlink()  # only AdamW's run is left in --out
    with pytest.raises(
        InputError, match=r"adamw.ckpt\.pt exists from an earlier run; pass resume to continue it, force"
    ):
        compare_optimizers(config, ["adamw"])
    assert not (tmp_path / "cmp" / "adapprox" / "ckpt.pt").exists()  # refused before Adapprox trained
    resumed = compare_optimizers(replace(config, resume=True), ["adamw"])
    assert resumed["adapprox"].start_iter == 3 and resumed["adamw"].start_iter == 4
