"""``adapprox spectrum|compare|estimate`` end to end on a small nanoGPT-style checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip(
    "adapprox_cli.checkpoints", reason="the checkpoint loader (adapprox_cli.checkpoints) is missing"
)

from typer.testing import CliRunner

from adapprox_cli.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def nanogpt(tmp_path_factory):
    """A nanoGPT ckpt.pt: tied embeddings, decay/no-decay groups, a few real AdamW steps."""
    from checkpoint_factories import TinyNanoGPT

    torch.manual_seed(0)
    model = TinyNanoGPT(vocab=48, block=16, embd=16, layers=2)
    named = dict(model.named_parameters())
    decay = [p for p in named.values() if p.dim() >= 2]
    nodecay = [p for p in named.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    data = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).backward()
        opt.step()
    path = tmp_path_factory.mktemp("nanogpt") / "ckpt.pt"
    model_args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=48, dropout=0.0)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": model_args, "iter_num": 6,
         "best_val_loss": torch.tensor(3.0), "config": {"learning_rate": 1e-3}},
        path,
    )  # fmt: skip
    names = [n for n, p in named.items() if p.dim() >= 2]
    second = {n: opt.state[named[n]]["exp_avg_sq"].clone() for n in names}
    return path, names, second


def as_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_spectrum_json_matches_an_exact_svd(nanogpt):
    path, names, second = nanogpt
    data = as_json(invoke("spectrum", path, "--json", "--dtype", "float64"))
    assert [m["name"] for m in data["matrices"]] == names
    assert len(data["skipped"]) == 18
    for m in data["matrices"]:
        v = second[m["name"]].double()
        s = torch.linalg.svdvals(v)
        assert m["matrix_shape"] == list(v.shape)
        assert m["singular_values"] == pytest.approx(s[:60].tolist(), rel=1e-9)
        assert m["stable_rank"] == pytest.approx(float(v.square().sum() / s[0] ** 2), rel=1e-9)
        tail = [math.sqrt(float(s[r:].square().sum() / v.square().sum())) for r in range(len(s) + 1)]
        assert m["rank_for_error"]["0.05"] == next(r for r in range(1, len(tail)) if tail[r] <= 0.05)


def test_spectrum_params_and_first_moment(nanogpt):
    path, *_ = nanogpt
    data = as_json(
        invoke("spectrum", path, "--json", "--params", r"h\.1\.mlp", "--moment", "exp_avg", "--top", "5")
    )
    assert [m["name"] for m in data["matrices"]] == [
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
    ]
    assert all(len(m["singular_values"]) == 5 for m in data["matrices"])
    assert data["settings"]["moment"] == "exp_avg"


def test_spectrum_table(nanogpt):
    path, *_ = nanogpt
    result = invoke("spectrum", path)
    assert result.exit_code == 0, result.output
    assert "Spectrum of the second moment" in result.stdout and "h.0.mlp.c_fc.weight" in result.stdout
    assert "10 matrices; 18 vectors/scalars skipped" in result.stdout


def test_compare_json(nanogpt):
    path, names, second = nanogpt
    data = as_json(invoke("compare", path, "--json", "--rank", "3", "--dtype", "float64"))
    assert data["settings"]["num_heads"] == 2  # from model_args
    rows = data["rows"]
    assert len(rows) == len(names) * 7
    for row in rows:
        assert row["vs_optimum"] >= 1 - 1e-9
    for name in names:
        svd = next(r for r in rows if r["name"] == name and r["method"] == "svd")
        v = second[name].double()
        s2 = torch.linalg.svdvals(v).square()
        assert svd["relative_error"] == pytest.approx(math.sqrt(float(s2[3:].sum() / s2.sum())), rel=1e-9)
    assert [s["method"] for s in data["summary"]] == [
        "svd",
        "srsi",
        "svd_lowrank",
        "adafactor",
        "smmf",
        "adam_mini",
        "sm3",
    ]


def test_compare_tables(nanogpt):
    path, *_ = nanogpt
    result = invoke("compare", path, "--methods", "svd,srsi,adafactor", "--rank", "2")
    assert result.exit_code == 0, result.output
    assert "Relative error" in result.stdout and "means weighted by size" in result.stdout
    result = invoke("compare", path, "--methods", "svd,adafactor", "--long", "--params", "wte")
    assert result.exit_code == 0, result.output
    assert "/ rank-1 opt." in result.stdout and result.stdout.count("transformer.wte.weight") == 2


def test_estimate_checkpoint_json(nanogpt):
    path, names, _ = nanogpt
    data = as_json(invoke("estimate", path, "--json", "--tol", "0.1", "--tol", "0.02", "--rank", "2"))
    assert data["bytes_per_number"] == 4 and data["rule"] == "exact"
    assert [m["name"] for m in data["matrices"]] == names
    settings = {(r["optimizer"], r["setting"]) for r in data["memory"]}
    assert {
        ("adapprox", "tol=0.1"),
        ("adapprox_no_m", "tol=0.02"),
        ("adapprox", "k=2"),
        ("galore", "r=128"),
    } <= settings
    assert {r["optimizer"] for r in data["memory"]} >= {
        "adamw",
        "adafactor",
        "adafactor_m",
        "came",
        "adam_mini",
        "smmf",
    }
    adamw = next(r for r in data["memory"] if r["optimizer"] == "adamw")
    assert adamw["bytes"] == 8 * data["parameters"]


def test_estimate_presets_reproduce_the_paper():
    data = as_json(invoke("estimate", "--shapes", "gpt2-124m", "--rank", "192", "--rank", "1", "--json"))
    savings = {(r["optimizer"], r["setting"]): round(r["saving_percent"], 2) for r in data["memory"]}
    assert savings[("adapprox", "k=192")] == 34.50 and savings[("adapprox_no_m", "k=192")] == 84.50
    assert savings[("adapprox", "k=1")] == 49.87 and savings[("adapprox_no_m", "k=1")] == 99.87
    result = invoke("estimate", "--shapes", "gpt2-355m")
    assert result.exit_code == 0, result.output
    assert "33.85%" in result.stdout and "83.85%" in result.stdout
    assert "49.89%" in result.stdout and "99.89%" in result.stdout


@pytest.mark.parametrize("command", ["spectrum", "compare", "estimate"])
def test_plot_writes_a_png(nanogpt, tmp_path, command):
    path, *_ = nanogpt
    figure = tmp_path / f"{command}.png"
    result = invoke(command, path, "--plot", figure, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the plot message goes to stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["spectrum", "{path}", "--params", "h.(0"], "not a valid regular expression"),
        (["compare", "{path}", "--params", "lm_head"], "matches none of the 28 parameters"),
        (["compare", "{path}", "--methods", "svd,magic"], "unknown magic"),
        (["spectrum", "{path}", "--params", r"ln_f"], "nothing to analyse"),
        (["spectrum", "{path}", "--dtype", "float16"], "--dtype must be float32 or float64"),
        (["spectrum", "{path}", "--plot", "out.bmp"], "unknown image format"),
        (["estimate"], "give a checkpoint PATH or --shapes PRESET"),
        (["estimate", "--shapes", "gpt5"], "--shapes must be one of"),
        (["estimate", "{path}", "--tol", "1.5"], "--tol values must be in [0, 1)"),
        (["spectrum", "{missing}"], "missing.pt"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(nanogpt, tmp_path, args, message):
    path, *_ = nanogpt
    result = invoke(*[a.format(path=path, missing=tmp_path / "missing.pt") for a in args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["spectrum", "compare", "estimate"])
def test_cuda_requested_without_a_gpu(nanogpt, command):
    path, *_ = nanogpt
    result = invoke(command, path, "--device", "cuda")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "--device cpu" in lines[0]


def _cells(text: str) -> set[str]:
    return {cell.strip() for line in text.splitlines() for cell in line.split("│")[1:-1]}


def test_tables_at_80_columns_keep_every_number_whole(nanogpt, monkeypatch):
    """Into a pipe at 80 columns, tables split or fold names but print each number as JSON has it."""
    from adapprox_cli.cli.analysis import _num

    monkeypatch.setenv("COLUMNS", "80")
    path, *_ = nanogpt
    for args in ([], ["--long"]):
        text = invoke("compare", path, *args).stdout
        assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
        data = as_json(invoke("compare", path, "--json"))
        digits = 4 if args else 3
        assert {_num(r["relative_error"], digits) for r in data["rows"]} <= _cells(text)
        assert {f"{s['numbers_stored']:,}" for s in data["summary"]} <= _cells(text)
    text = invoke("spectrum", path).stdout
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    data = as_json(invoke("spectrum", path, "--json"))
    assert {_num(m["singular_values"][0]) for m in data["matrices"]} <= _cells(text)
    assert {_num(m["stable_rank"], 4) for m in data["matrices"]} <= _cells(text)
    text = invoke("estimate", "--shapes", "gpt2-124m").stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    data = as_json(invoke("estimate", "--shapes", "gpt2-124m", "--json"))
    assert {f"{r['bytes']:,}" for r in data["memory"]} <= _cells(text)


def test_csv_writes_the_tables(nanogpt, tmp_path):
    import csv

    path, *_ = nanogpt
    target = tmp_path / "compare.csv"
    result = invoke("compare", path, "--methods", "svd,adafactor", "--csv", target)
    assert result.exit_code == 0, result.output
    errors = list(csv.reader((tmp_path / "compare-errors.csv").open()))
    summary = list(csv.reader((tmp_path / "compare-summary.csv").open()))
    assert errors[0] == ["parameter", "shape", "svd", "adafactor"] and len(errors) == 1 + 10
    assert [row[0] for row in summary[1:]] == ["svd", "adafactor"]
    data = as_json(invoke("compare", path, "--methods", "svd,adafactor", "--json"))
    assert summary[1][1] == f"{data['summary'][0]['weighted_error']:.4g}"
    plan = tmp_path / "plan.csv"
    assert invoke("estimate", "--shapes", "gpt2-124m", "--csv", plan).exit_code == 0
    rows = list(csv.reader((tmp_path / "plan-memory.csv").open()))
    assert next(csv.reader((tmp_path / "plan-totals.csv").open()))[2] == "fp32"
    assert rows[0][:3] == ["optimizer", "setting", "state"] and rows[1][0] == "AdamW"


def test_compare_warns_when_the_factors_outgrow_the_dense_state(nanogpt):
    path, *_ = nanogpt
    result = invoke("compare", path, "--rank", "16", "--methods", "svd", "--params", "wte")
    assert result.exit_code == 0, result.output
    # wte is 48 x 16: 16 x (48 + 16) = 1024 numbers against 768 dense ones.
    assert "store more numbers as factors" in result.stderr and "16 x (48 + 16) > 768" in result.stderr
    quiet = invoke("compare", path, "--rank", "2", "--methods", "svd", "--params", "wte")
    assert "store more numbers" not in quiet.stderr


def test_help_shows_flags_and_the_path_argument_plainly():
    for command in ("spectrum", "compare", "estimate"):
        text = invoke(command, "--help").stdout
        assert "{path}" not in text.lower() and "PATH..." in text
        flags = [line for line in text.splitlines() if "--json" in line or "--trust-checkpoint" in line]
        assert flags and not any("<bool>" in line for line in flags), command
    assert "sm3." in " ".join(invoke("compare", "--help").stdout.split())  # the --methods list, whole
