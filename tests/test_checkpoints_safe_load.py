"""Safe loading: allowlisted globals load, anything else is refused without being run."""

from __future__ import annotations

import argparse
import pickle

import numpy as np
import pytest
import torch
from checkpoint_factories import (
    make_deepspeed,
    make_empty,
    make_garbage,
    make_malicious,
    make_nanogpt_meta,
    make_plain,
    make_truncated,
)

from adapprox_cli.checkpoints import load_checkpoint, restricted_unpickle, safe_torch_load
from adapprox_cli.checkpoints.formats.dcp import read_dcp_metadata
from adapprox_cli.checkpoints.formats.nanogpt import load_nanogpt_meta
from adapprox_cli.errors import InputError, UnsafeCheckpointError


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_malicious_torch_file_is_refused_and_never_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = make_malicious(tmp_path, marker, kind=kind)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_torch_load(path)
    message = str(info.value)
    assert "posix.system" in message or "os.system" in message
    assert "--trust-checkpoint" in message
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_malicious_meta_pkl_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = make_malicious(tmp_path, marker, kind="pickle")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        restricted_unpickle(path)
    assert not marker.exists()


def test_malicious_dcp_metadata_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = make_malicious(tmp_path, marker, kind="dcp")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        read_dcp_metadata(path)
    assert not marker.exists()


def test_meta_pkl_with_builtins_loads(tmp_path):
    meta = load_nanogpt_meta(make_nanogpt_meta(tmp_path))
    assert meta["vocab_size"] == len(meta["itos"]) == len(meta["stoi"])


def test_unknown_global_needs_trust(tmp_path):
    path = tmp_path / "namespace.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace"):
        safe_torch_load(path)
    loaded = safe_torch_load(path, trust_checkpoint=True)
    assert loaded["args"].lr == 0.1


def test_numpy_globals_load_under_both_numpy_spellings(tmp_path):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "rng.pt"
    torch.save({"numpy": array, "scalar": np.float64(2.5)}, path, _use_new_zipfile_serialization=False)
    loaded = safe_torch_load(path)
    assert np.array_equal(loaded["numpy"], array) and loaded["scalar"] == 2.5
    # A file written under numpy 1.x names numpy.core.multiarray, which numpy 2 does not match by itself.
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    old = tmp_path / "rng_numpy1.pt"
    old.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    loaded = safe_torch_load(old)
    assert np.array_equal(loaded["numpy"], array)


def test_deepspeed_globals_load_without_deepspeed(tmp_path):
    truth = make_deepspeed(tmp_path, stage=2)
    optim_file = next((truth.path / "global_step3").glob("*optim_states.pt"))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(
        optim_file
    )  # the file names DeepSpeed classes
    loaded = safe_torch_load(optim_file)
    assert int(loaded["optimizer_state_dict"]["zero_stage"]) == 2
    address = next(iter(loaded["optimizer_state_dict"]["param_slice_mappings"][0].values()))
    assert address.numel > 0 and address.start == 0


def test_zip_files_are_memory_mapped_and_legacy_files_are_not(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    safe_torch_load(make_plain(tmp_path, name="zip.pt").path)
    safe_torch_load(make_plain(tmp_path, name="legacy.pt", legacy=True).path)
    assert [c["mmap"] for c in calls] == [True, False]
    assert all(c["weights_only"] is True and c["map_location"] == "cpu" for c in calls)


@pytest.mark.parametrize(
    ("make", "expected"),
    [(make_empty, "empty"), (make_truncated, "truncated"), (make_garbage, "not a readable torch.save file")],
)
def test_broken_files_give_one_line_input_errors(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert expected in message and str(path) in message
    assert "\n" not in message
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_missing_path_and_non_pickle(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(InputError):
        load_checkpoint(plain_pickle)
