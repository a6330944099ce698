"""The one way adapprox writes an output: all of it or nothing, in a place it may write to.

``atomic_write(path, write)`` lets ``write`` fill a temporary file in the target's own directory
(so the final rename stays on one filesystem), fsyncs it, gives it the mode an ordinary
``open(path, "w")`` would (0666 less the umask, not ``mkstemp``'s 0600), renames it onto ``path``
and fsyncs the directory so the rename itself survives a power cut. ``install_directory`` does
the same for a finished directory, exchanging it with an existing target in one step so that a
kill at any moment leaves either the old or the new target, never neither.

Temporary names are ``.<target name>.adapprox-tmp-<pid>-<random>``: recognisable, and removed by
the next write to the same target once their process is gone (a kill -9 cannot clean up).
``check_target`` refuses targets that are not a regular file or directory (``-o /dev/null
--force`` must never replace a device node) and targets inside the input. OS errors become one
line naming the target: "no space left on /x", "/x/out.pt cannot be written (Permission denied)".
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from adapprox_cli.errors import InputError, OutputError, ParameterError

__all__ = [
    "TEMPORARY_MARK",
    "atomic_write",
    "check_target",
    "fsync_directory",
    "install_directory",
    "install_file",
    "new_temporary_directory",
    "remove_stale_temporaries",
    "temporary_path",
    "write_error",
]

TEMPORARY_MARK = ".adapprox-tmp-"


def temporary_path(path: Path) -> Path:
    """A fresh name beside ``path`` that ``remove_stale_temporaries`` recognises."""
    return path.parent / f".{path.name}{TEMPORARY_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_temporaries(path: Path) -> None:
    """Remove what interrupted writes to ``path`` left behind (their process no longer runs)."""
    pattern = f".{glob.escape(path.name)}{glob.escape(TEMPORARY_MARK)}*"
    for leftover in path.parent.glob(pattern):
        pid_text = leftover.name.rpartition(TEMPORARY_MARK)[2].partition("-")[0]
        if pid_text.isdigit() and not _running(int(pid_text)):
            remove_path(leftover)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # ours: possibly a write still in progress in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree if it is there; errors are ignored (best effort)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_target(
    path: str | Path, *, force: bool, inputs: Iterable[str | Path] = (), directory: bool | None = None
) -> None:
    """Refuse an output path that would replace something it must not.

    ``inputs`` are the checkpoint files/directories being read: the output may not be one of
    them or lie inside one (it would be read back as part of the input next time, and an
    interrupted write would leave debris in it). ``directory``: whether the output is a
    directory (None: not known yet, either may be replaced).
    """
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or (source.is_dir() and source in resolved.parents):
            raise InputError(
                f"{path} is inside the input {source}; write the output outside the checkpoint it is read from"
            )
    mode = _refuse_special(path)
    if mode is None:
        return
    if not force:
        raise ParameterError("force", f"{path} exists; pass {{name}} to replace it")
    if stat.S_ISDIR(mode) and directory is False:
        raise InputError(f"{path} is a directory; the output is a single file: choose a file path")
    if stat.S_ISREG(mode) and directory is True:
        raise InputError(f"{path} is a file; the output is a directory: choose another path")


def _refuse_special(path: Path) -> int | None:
    """The target's mode (None if absent); a device, pipe or socket is refused, never replaced."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise write_error(exc, path) from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        raise OutputError(
            f"{path} is not a regular file or directory (a device, pipe or socket); adapprox never replaces "
            "one: choose another output path"
        )
    return mode


def write_error(exc: OSError, path: Path) -> OutputError:
    """An OS error while writing ``path``, in words, naming the target (never a temporary)."""
    path = Path(path)
    code = exc.errno
    if code == errno.ENOSPC or code == getattr(errno, "EDQUOT", None):
        message = f"no space left on {path.parent} while writing {path}; free some space or write elsewhere"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        message = (
            f"{path} cannot be written ({os.strerror(code)}); check the permissions of {path.parent} "
            "or write elsewhere"
        )
    else:
        reason = os.strerror(code) if code else str(exc)
        message = f"writing {path} failed ({reason}); nothing was written there"
    error = OutputError(message)
    error.errno, error.filename = code, str(path)
    return error


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the result onto ``path``; no partial file is left."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
    except OSError as exc:
        raise write_error(exc, path) from exc
    _refuse_special(path)
    temporary = temporary_path(path)
    try:
        write(temporary)
        install_file(temporary, path)
    except OSError as exc:
        raise write_error(exc, path) from exc
    except Exception as exc:
        # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos
        # 2082048 vs 2081940", safetensors as a SafetensorError: look at the filesystem instead.
        if _nearly_full(path.parent):
            raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path) from exc
        raise
    finally:
        remove_path(temporary)
    return path


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < _FULL_BELOW
    except OSError:
        return False


_FULL_BELOW = 1 << 20  # free bytes under which a failed write is taken for a full disk


def install_file(temporary: Path, path: Path) -> None:
    """Give a finished temporary file the umask's mode, make it durable and rename it onto ``path``."""
    os.chmod(temporary, 0o666 & ~current_umask())
    _fsync_file(temporary)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def new_temporary_directory(destination: Path) -> Path:
    """An empty directory beside ``destination`` with the umask's mode (``mkdtemp`` gives 0700)."""
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(destination)
        temporary = temporary_path(destination)
        os.mkdir(temporary)
    except OSError as exc:
        raise write_error(exc, destination) from exc
    return temporary


def install_directory(temporary: Path, destination: Path) -> None:
    """Put the finished directory ``temporary`` at ``destination``.

    An existing destination is exchanged with the new one in one ``renameat2(RENAME_EXCHANGE)``
    (Linux) and then removed, so there is no moment without a target. Where the exchange is not
    available the old target is renamed aside first and put back if installing the new one
    fails; only a kill -9 between the two renames can leave it aside, as
    ``.<name>.adapprox-old-<pid>-<random>`` (never removed automatically: it is the old output).
    """
    try:
        for root, _dirs, names in os.walk(temporary):
            for name in names:
                with contextlib.suppress(OSError):
                    if not os.path.islink(os.path.join(root, name)):
                        _fsync_file(Path(root) / name)
        if not os.path.lexists(destination):
            os.replace(temporary, destination)
        elif _exchange(temporary, destination):
            remove_path(temporary)  # now holds the old target
        else:
            aside = (
                destination.parent / f".{destination.name}.adapprox-old-{os.getpid()}-{secrets.token_hex(4)}"
            )
            os.replace(destination, aside)
            try:
                os.replace(temporary, destination)
            except BaseException:
                os.replace(aside, destination)  # put the old target back
                raise
            remove_path(aside)
        fsync_directory(destination.parent)
    except OSError as exc:
        raise write_error(exc, destination) from exc


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
        return False
    raise OSError(code, os.strerror(code), str(b))


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def current_umask() -> int:
    # The umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
