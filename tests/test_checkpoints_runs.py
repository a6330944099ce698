"""Run directories: the checkpoints a training run leaves, found and sorted by training step."""

import pytest
from checkpoint_factories import make_hf_trainer, make_plain

from adapprox_cli.checkpoints.runs import find_stages, step_from_name
from adapprox_cli.errors import InputError


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("checkpoint-500", 500),
        ("epoch=3-step=1200.ckpt", 1200),
        ("global_step300", 300),
        ("ckpt_1000.pt", 1000),
        ("iter-42.pth", 42),
        ("model-v2-step_7.pt", 7),
        ("ckpt.pt", None),
        ("last.ckpt", None),
    ],
)
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_trainer_output_dir_is_sorted_by_step_not_by_name(tmp_path):
    for step in (10, 3, 6):
        make_hf_trainer(tmp_path, global_step=step)
    (tmp_path / "runs").mkdir()  # TensorBoard logs beside the checkpoints
    (tmp_path / "config.json").write_text("{}")
    found = find_stages([tmp_path])
    assert [(s.path.name, s.step) for s in found.stages] == [
        ("checkpoint-3", 3),
        ("checkpoint-6", 6),
        ("checkpoint-10", 10),
    ]
    assert found.skipped == []


def test_files_with_numbers_and_a_broken_one(tmp_path):
    for step in (200, 50):
        make_plain(tmp_path, name=f"ckpt_{step}.pt")
    make_plain(tmp_path, name="final.pt")
    (tmp_path / "ckpt_300.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "train.log").write_text("loss 1.0")
    found = find_stages([tmp_path])
    assert [(s.path.name, s.step) for s in found.stages] == [
        ("ckpt_50.pt", 50),
        ("ckpt_200.pt", 200),
        ("final.pt", None),
    ]
    assert [p.name for p, _ in found.skipped] == ["ckpt_300.pt"]


def test_several_paths_are_merged_and_sorted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    make_hf_trainer(b, global_step=2)
    make_hf_trainer(a, global_step=5)
    found = find_stages([a / "checkpoint-5", b / "checkpoint-2", a / "checkpoint-5"])
    assert [s.step for s in found.stages] == [2, 5]


def test_a_single_checkpoint_is_one_stage(tmp_path):
    make_hf_trainer(tmp_path, global_step=4)
    found = find_stages([tmp_path / "checkpoint-4"])
    assert [(s.path.name, s.step) for s in found.stages] == [("checkpoint-4", 4)]


def test_links_out_of_the_run_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    make_hf_trainer(outside, global_step=9)
    run = tmp_path / "run"
    run.mkdir()
    make_hf_trainer(run, global_step=1)
    (run / "checkpoint-9").symlink_to(outside / "checkpoint-9")
    found = find_stages([run])
    assert [s.step for s in found.stages] == [1]
    assert [p.name for p, _ in found.skipped] == ["checkpoint-9"]


def test_a_directory_without_checkpoints_is_refused_with_its_contents(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"neither a checkpoint nor a run directory .*notes\.txt"):
        find_stages([tmp_path])
    with pytest.raises(InputError, match="no such file"):
        find_stages([tmp_path / "missing"])
