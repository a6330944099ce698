"""Where ``convert`` may write, and what is left behind when writing goes wrong.

Outputs never land inside the input, never replace something that is not a regular file or
directory, never carry bytes from outside the checkpoint through a symlink, honour the umask,
keep an old ``--force`` target until the new one is complete, and leave no temporary files.
Faults (disk full, read-only directory, a failed verification) end with one line naming the
target and nothing half-written there.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch
from checkpoint_factories import make_hf_trainer, make_nanogpt
from typer.testing import CliRunner

from adapprox_cli.cli import app
from adapprox_cli.convert import checkpoint as convert_module
from adapprox_cli.convert import convert_checkpoint
from adapprox_cli.convert import output as convert_output
from adapprox_cli.errors import AdapproxError, InputError

runner = CliRunner()


def invoke(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def temporaries(root) -> list[str]:
    marks = (".tmp", "adapprox-tmp", "adapprox-old", ".old-")
    return [str(p) for p in root.rglob("*") if any(m in p.name for m in marks)]


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def test_output_inside_the_input_directory_is_refused(tmp_path):
    ckpt = make_hf_trainer(tmp_path).path
    before = sorted(p.name for p in ckpt.iterdir())
    code, output = invoke("convert", ckpt, "-o", ckpt / "converted")
    assert code == 2 and len(errors(output)) == 1 and "inside" in output, output
    assert sorted(p.name for p in ckpt.iterdir()) == before and not temporaries(tmp_path)


def test_a_non_regular_target_is_never_replaced(tmp_path):
    truth = make_nanogpt(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, output = invoke("convert", truth.path, "-o", fifo, "--force")
    assert code == 2 and "pipe" in output and "not a regular file" in output, output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not temporaries(tmp_path)


def test_directory_copy_does_not_follow_symlinks(tmp_path):
    ckpt = make_hf_trainer(tmp_path).path
    secret = tmp_path / "secret.txt"
    secret.write_text("private bytes")
    (ckpt / "notes.txt").symlink_to(secret)
    out = tmp_path / "out"
    code, output = invoke("convert", ckpt, "-o", out)
    assert code == 0, output
    copied = out / "notes.txt"
    assert not (copied.is_file() and not copied.is_symlink()), "a link target's bytes were copied"
    assert not (copied.exists() and not copied.is_symlink() and "private" in copied.read_text())
    assert (out / "optimizer.pt").is_file() and not temporaries(tmp_path)


def test_a_self_referencing_link_gives_a_short_answer(tmp_path):
    ckpt = make_hf_trainer(tmp_path).path
    (ckpt / "loop").symlink_to(".")
    code, output = invoke("convert", ckpt, "-o", tmp_path / "out")
    assert code in (0, 2) and "Traceback" not in output, output
    if code == 2:
        assert len(errors(output)) == 1 and len(errors(output)[0]) < 300, output
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_directory_force_keeps_the_old_target_until_the_new_one_is_in_place(tmp_path, monkeypatch, exchange):
    from adapprox_cli import atomic_io

    ckpt = make_hf_trainer(tmp_path).path
    out = tmp_path / "out"
    assert invoke("convert", ckpt, "-o", out)[0] == 0
    marker = out / "marker"
    marker.write_text("old")
    real = {"replace": os.replace, "rename": os.rename}

    interrupts = [KeyboardInterrupt]

    def install(fn, src, dst, *args, **kwargs):
        # Ctrl-C at the moment a directory is first moved onto the target (moving the old one
        # away works, and so does putting it back).
        if os.fspath(dst) == os.fspath(out) and interrupts:
            raise interrupts.pop()
        return real[fn](src, dst, *args, **kwargs)

    if not exchange:
        monkeypatch.setattr(atomic_io, "_exchange", lambda a, b: False)
    for fn in real:
        monkeypatch.setattr(os, fn, lambda s, d, *a, _fn=fn, **kw: install(_fn, s, d, *a, **kw))
    try:
        convert_checkpoint(ckpt, out, to="adapprox", force=True)
        installed = True
    except KeyboardInterrupt:
        installed = False
    monkeypatch.undo()
    assert installed == exchange  # the exchange needs no rename onto the target
    if installed:
        assert not marker.exists() and (out / "optimizer.pt").is_file()
    else:
        assert marker.read_text() == "old", "the old target was lost before the new one was in place"
    assert not temporaries(tmp_path)


def test_stale_temporaries_are_recognisable_and_removed(tmp_path):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "o.pt"
    stale = tmp_path / f".{out.name}.adapprox-tmp-999999999-x"
    stale.write_bytes(b"half a checkpoint")
    assert invoke("convert", truth.path, "-o", out)[0] == 0
    assert not stale.exists() and out.is_file() and not temporaries(tmp_path)


@pytest.mark.parametrize("fmt", ["auto", "plain", "safetensors"])
def test_outputs_honour_the_umask(tmp_path, fmt):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / f"o.{fmt}"
    previous = os.umask(0o022)
    try:
        assert invoke("convert", truth.path, "-o", out, "--format", fmt)[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_directory_outputs_honour_the_umask(tmp_path):
    ckpt = make_hf_trainer(tmp_path).path
    previous = os.umask(0o022)
    try:
        assert invoke("convert", ckpt, "-o", tmp_path / "out")[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "optimizer.pt").stat().st_mode) == 0o644


def test_disk_full_says_so_and_names_the_target(tmp_path, monkeypatch):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "o.pt"

    def full(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(convert_output, "_write_torch", full)
    with pytest.raises(InputError, match=r"no space left on") as info:
        convert_checkpoint(truth.path, out)
    assert str(out) in str(info.value) and not out.exists() and not temporaries(tmp_path)


def test_a_read_only_directory_names_the_target(tmp_path, monkeypatch):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "ro" / "o.pt"
    out.parent.mkdir()

    def denied(obj, path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(convert_output, "_write_torch", denied)
    with pytest.raises(InputError) as info:
        convert_checkpoint(truth.path, out)
    message = str(info.value)
    assert str(out) in message and "tmp" not in message.replace(str(tmp_path), ""), message
    assert not temporaries(tmp_path)


def test_writers_fsync_the_directory_after_the_rename(tmp_path, monkeypatch):
    truth = make_nanogpt(tmp_path)
    synced: list[str] = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    for fmt in ("plain", "safetensors"):
        synced.clear()
        out = tmp_path / f"o-{fmt}"
        convert_checkpoint(truth.path, out, output_format=fmt)
        assert str(tmp_path) in synced, (fmt, synced)


def test_a_failed_verification_leaves_no_file_at_the_target(tmp_path, monkeypatch):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "o.pt"

    def broken(*args, **kwargs):
        raise AdapproxError("verification failed: injected")

    monkeypatch.setattr(convert_module, "verify_output", broken)
    with pytest.raises(AdapproxError):
        convert_checkpoint(truth.path, out, verify=True)
    assert not out.exists() and not temporaries(tmp_path)


def test_verify_checks_finiteness_of_what_was_written(tmp_path, monkeypatch):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "o.pt"
    real = convert_module.adamw_to_adapprox

    def poisoned(*args, **kwargs):
        state, report = real(*args, **kwargs)
        next(iter(state["state"].values()))["exp_avg"].fill_(float("nan"))
        return state, report

    monkeypatch.setattr(convert_module, "adamw_to_adapprox", poisoned)
    with pytest.raises(InputError, match="NaN"):
        convert_checkpoint(truth.path, out, verify=True)
    assert not out.exists()
    assert torch.load(truth.path, weights_only=True)["iter_num"] == 3  # the input is untouched


def test_every_writer_refuses_a_device_or_pipe(tmp_path):
    from adapprox_cli.atomic_io import atomic_write
    from adapprox_cli.errors import OutputError

    fifo = tmp_path / "plot.png"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        atomic_write(fifo, lambda temporary: temporary.write_bytes(b"x"))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not temporaries(tmp_path)
    truth = make_nanogpt(tmp_path)
    code, output = invoke("spectrum", truth.path, "--plot", fifo, "--json")
    assert code == 2 and "not a regular file" in output and stat.S_ISFIFO(os.lstat(fifo).st_mode), output


_SLOW_CONVERT = """
import sys, time
sys.path.insert(0, {tests!r})
from adapprox_cli import convert
from adapprox_cli.convert import output
real = output._write_torch

def slow(obj, path):
    real(obj, path)
    time.sleep(60)  # killed here: the temporary file is complete but never renamed

output._write_torch = slow
convert.convert_checkpoint({source!r}, {out!r})
"""


def test_kill_9_leaves_a_temporary_the_next_run_removes(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    truth = make_nanogpt(tmp_path)
    out = tmp_path / "o.pt"
    script = _SLOW_CONVERT.format(tests=str(Path(__file__).parent), source=str(truth.path), out=str(out))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not temporaries(tmp_path):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists() and temporaries(tmp_path), "the kill left neither a target nor a temporary"
    convert_checkpoint(truth.path, out)
    assert out.is_file() and not temporaries(tmp_path)


def test_links_inside_the_checkpoint_stay_relative_and_outside_ones_keep_working(tmp_path):
    ckpt = make_hf_trainer(tmp_path).path
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "readme").write_text("from the cache")
    (ckpt / "README.md").symlink_to(os.path.relpath(blobs / "readme", ckpt))  # Hub-cache style
    (ckpt / "config-link.json").symlink_to("config.json")
    out = tmp_path / "copies" / "out"
    code, output = invoke("convert", ckpt, "-o", out)
    assert code == 0, output
    assert os.readlink(out / "config-link.json") == "config.json"
    assert (out / "README.md").is_symlink() and (out / "README.md").read_text() == "from the cache"


def test_a_pipe_inside_the_checkpoint_is_refused_not_read(tmp_path):
    ckpt = make_hf_trainer(tmp_path).path
    os.mkfifo(ckpt / "events")
    code, output = invoke("convert", ckpt, "-o", tmp_path / "out")
    assert code == 2 and "events" in output and "not a regular file" in output, output
    assert not (tmp_path / "out").exists() and not temporaries(tmp_path)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 512 KiB tmpfs (needs mount rights: skipped where there are none)."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        import gc

        gc.collect()  # a failed torch.save may keep its file open until collected
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("fmt", ["auto", "safetensors"])
def test_a_really_full_disk_says_no_space_left(tmp_path, tiny_filesystem, fmt):
    truth = make_nanogpt(tmp_path)
    free = os.statvfs(tiny_filesystem)
    (tiny_filesystem / "fill").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 8192))
    out = tiny_filesystem / "out.pt"
    code, output = invoke("convert", truth.path, "-o", out, "--format", fmt)
    assert code == 2 and f"no space left on {tiny_filesystem}" in output and "unexpected pos" not in output, (
        output
    )
    assert sorted(p.name for p in tiny_filesystem.iterdir()) == ["fill"]


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_a_device_node_is_never_replaced_even_as_root(tmp_path):
    truth = make_nanogpt(tmp_path)
    node = tmp_path / "null"  # a private copy of /dev/null (char 1:3): what -o /dev/null --force would hit
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    code, output = invoke("convert", truth.path, "-o", node, "--force")
    assert code == 2 and "not a regular file" in output, output
    assert stat.S_ISCHR(os.lstat(node).st_mode) and not temporaries(tmp_path)
