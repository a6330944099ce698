"""``adapprox estimate --config``: plan a run from a Hugging Face config.json, before any checkpoint."""

from __future__ import annotations

import json
import math
import re

import pytest
from typer.testing import CliRunner

from adapprox_cli.cli import app
from adapprox_cli.model_shapes import config_named_shapes

runner = CliRunner()

GPT2_124M = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024}  # fmt: skip
QWEN3_GQA = {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 16, "intermediate_size": 96, "vocab_size": 300, "num_hidden_layers": 3,
             "tie_word_embeddings": False, "max_position_embeddings": 128}  # fmt: skip


def estimate(*args):
    result = runner.invoke(app, ["estimate", *[str(a) for a in args]])
    assert result.exit_code == 0, result.output
    return result


def test_a_gpt2_config_gives_the_paper_numbers_of_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2_124M))
    from_config = json.loads(estimate("--config", tmp_path, "--rank", "192", "--rank", "1", "--json").stdout)
    preset = json.loads(estimate("--shapes", "gpt2-124m", "--rank", "192", "--rank", "1", "--json").stdout)
    assert from_config["memory"] == preset["memory"]
    savings = {(r["optimizer"], r["setting"]): round(r["saving_percent"], 2) for r in from_config["memory"]}
    assert savings[("adapprox", "k=192")] == 34.50 and savings[("adapprox_no_m", "k=1")] == 99.87


def test_training_totals_add_weights_gradients_and_state(tmp_path):
    path = tmp_path / "qwen3.json"
    path.write_text(json.dumps(QWEN3_GQA))
    data = json.loads(estimate("--config", path, "--rank", "2", "--json").stdout)
    n = sum(math.prod(s) for _, s in config_named_shapes(QWEN3_GQA))
    assert data["parameters"] == n
    rows = {(r["optimizer"], r["setting"]): r for r in data["memory"]}
    for total in data["training_totals"]:
        row = rows[total["optimizer"], total["setting"]]
        assert total["bytes"]["fp32"] == 8 * n + row["bytes"]  # the state is counted at 4 bytes
        assert total["bytes"]["bf16 + fp32 master"] == (2 + 2 + 4) * n + row["bytes"]
        assert total["bytes"]["pure bf16"] == 4 * n + 2 * row["numbers"] + (row["bits"] + 7) // 8
    adamw = next(t for t in data["training_totals"] if t["optimizer"] == "adamw")
    assert adamw["bytes"]["fp32"] == 16 * n


def test_plan_text_names_the_totals_and_a_verdict(tmp_path):
    path = tmp_path / "qwen3.json"
    path.write_text(json.dumps(QWEN3_GQA))
    out = estimate("--config", path).stdout
    assert "Weights + gradients + optimizer state" in out and "pure bf16" in out
    assert "Verdict: AdamW keeps" in out and "SOAP" in out and "more" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "{tmp}/missing.json"], "no such file"),
        (["--config", "{tmp}/cfg.json", "--tol", "0.1"], "with --config use --rank"),
        (["--config", "{tmp}/cfg.json", "--shapes", "gpt2-124m"], "one of them"),
    ],
)
def test_config_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "cfg.json").write_text(json.dumps(QWEN3_GQA))
    result = runner.invoke(app, ["estimate", *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_ranks_of_a_measured_sibling_carry_over_per_kind_of_matrix(tmp_path):
    from pathlib import Path

    from adapprox_cli import lowrank, memory
    from adapprox_cli.analysis import estimate_memory, moments_from_checkpoint, ranks_from_sibling
    from adapprox_cli.checkpoints import load_checkpoint

    sample = Path(__file__).resolve().parent.parent / "sample_states/hf-trainer/checkpoint-200"
    sibling = estimate_memory(moments_from_checkpoint(load_checkpoint(sample)), tolerances=(0.1,))
    big = {**json.loads((sample / "config.json").read_text()), "n_layer": 4, "n_embd": 128, "n_head": 4}
    named = config_named_shapes(big)
    ranks = ranks_from_sibling(named, sibling, 0.1)
    for i, (name, shape) in enumerate(named):
        if i not in ranks:
            continue
        kind = [m for m in sibling.matrices if re.sub(r"\d+", "#", m.name) == re.sub(r"\d+", "#", name)]
        share = max(m.ranks[0.1] / m.rank_max for m in kind)
        k_max = lowrank.rank_cap(*lowrank.matrix_view_shape(shape))
        assert ranks[i] == max(1, min(k_max, math.ceil(share * k_max))), name
    path = tmp_path / "config.json"
    path.write_text(json.dumps(big))
    data = json.loads(estimate("--config", path, sample, "--tol", "0.1", "--json").stdout)
    row = next(
        r for r in data["memory"] if r["optimizer"] == "adapprox" and r["setting"].startswith("tol=0.1")
    )
    assert row["numbers"] == memory.adapprox_state_numbers([s for _, s in named], ranks)
    assert data["settings"]["sibling"] == str(sample)
    assert "warnings" not in data  # the same family: every kind of matrix was measured


def test_a_sibling_of_another_family_is_named_as_the_reason_for_k_max(tmp_path):
    from pathlib import Path

    from adapprox_cli import memory

    sample = Path(__file__).resolve().parent.parent / "sample_states/hf-trainer/checkpoint-200"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN3_GQA))  # Qwen3 names (model.layers.N...) against a GPT-2 sibling
    result = estimate("--config", path, sample, "--tol", "0.1", "--json")
    data = json.loads(result.stdout)
    (warning,) = data["warnings"]
    assert "measured 0 of the" in warning and "same family" in warning
    named = config_named_shapes(QWEN3_GQA)
    row = next(
        r for r in data["memory"] if r["optimizer"] == "adapprox" and r["setting"].startswith("tol=0.1")
    )
    assert row["numbers"] == memory.adapprox_state_numbers([s for _, s in named], None)  # all at k_max
    text = runner.invoke(app, ["estimate", "--config", str(path), str(sample), "--tol", "0.1"])
    assert text.exit_code == 0 and "same family" in text.output
