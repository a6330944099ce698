"""The analysis package as a whole: its public names, JSON-ready reports and the figures drawn from them."""

from __future__ import annotations

import pytest
import torch
from moment_factories import sample_moments

from adapprox_cli import analysis
from adapprox_cli.errors import InputError


@pytest.fixture(scope="module")
def moments() -> list[tuple[str, torch.Tensor]]:
    return sample_moments()


@pytest.fixture(scope="module")
def comparison(moments):
    return analysis.compare_methods(moments, rank=4, dtype="float64", num_heads=4, seed=3)


def test_every_public_name_imports_from_the_package():
    import importlib

    for name in analysis.__all__:
        assert getattr(analysis, name) is not None, name
    # numerics stays pure: no report dataclasses, no checkpoints
    numerics = importlib.import_module("adapprox_cli.analysis.numerics")
    assert not any(hasattr(numerics, n) for n in ("Moment", "SpectrumReport", "load_checkpoint"))


def test_reports_serialize(moments, comparison):
    import json

    spectrum = analysis.spectrum_report(moments)
    estimate = analysis.estimate_memory(moments, tolerances=[0.1, 0.05])
    for report in (spectrum, comparison, estimate, analysis.estimate_preset("gpt2-124m")):
        text = json.dumps(report.to_dict(), default=str)
        assert json.loads(text)
    data = spectrum.to_dict()["matrices"][0]
    assert set(data["energy_share"]) == {"top1", "top5", "top20"}
    assert set(data["rank_for_error"]) == {"0.1", "0.05", "0.01"}


# --------------------------------------------------------------------------- plots


def test_plots_write_png_files(tmp_path, moments, comparison):
    from adapprox_cli import plots

    spectrum = analysis.spectrum_report(moments)
    estimate = analysis.estimate_memory(moments, tolerances=[0.2, 0.1, 0.05])
    for kind, report in [
        ("spectrum", spectrum),
        ("compare", comparison),
        ("estimate", estimate),
        ("estimate", analysis.estimate_preset("gpt2-355m")),
    ]:
        path = tmp_path / f"{kind}-{id(report)}.png"
        assert getattr(plots, f"plot_{kind}")(report, path) == path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".png"] * 4  # no temporary files left
    with pytest.raises(InputError, match="unknown image format"):
        plots.plot_spectrum(spectrum, tmp_path / "figure.bmp")
    with pytest.raises(InputError, match="does not exist"):
        plots.plot_spectrum(spectrum, tmp_path / "missing" / "figure.png")


def test_representative_names_pick_one_per_kind():
    from adapprox_cli.plots import representative_names

    names = ["wte", "wpe"] + [f"h.{i}.{k}" for i in range(12) for k in ("attn", "mlp")]
    assert representative_names(names, 8) == ["wte", "wpe", "h.0.attn", "h.0.mlp"]
    assert representative_names(names[:3], 8) == names[:3]
