"""Checksums a checkpoint already carries: the CRC-32 of every member of a zip ``torch.save`` file.

``torch.load`` never checks them, so a byte flipped inside a tensor (a bad disk, a broken copy)
loads silently and trains on. ``adapprox inspect --check`` and ``convert --verify`` read every
member once, in a stream (constant memory), and compare. safetensors and legacy pickle files
carry no checksum; they are reported as unchecked rather than passed.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from adapprox_cli.errors import InputError

_BLOCK = 1 << 20


@dataclass
class IntegrityReport:
    checked: dict[str, int] = field(default_factory=dict)  # file -> members whose CRC-32 matched
    unchecked: list[str] = field(default_factory=list)  # files without checksums (safetensors, pickles)

    def to_dict(self) -> dict:
        return {"checked": self.checked, "unchecked": self.unchecked}


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # A directory: its regular files, links not followed (their targets are not the checkpoint).
    files = []
    for root, _dirs, names in os.walk(path, followlinks=False):
        files += [Path(root) / n for n in names if not (Path(root) / n).is_symlink()]
    return sorted(files)


def check_zip_crcs(path: Path) -> int:
    """Verify the CRC-32 of every member of one zip file; returns how many were checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            for info in members:
                crc = 0
                with archive.open(info) as stream:
                    # zipfile raises BadZipFile on a CRC mismatch at the end of the stream; the
                    # explicit CRC keeps the check independent of that behaviour.
                    while block := stream.read(_BLOCK):
                        crc = zlib.crc32(block, crc)
                if crc != info.CRC:
                    raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
    except zipfile.BadZipFile as exc:
        raise InputError(
            f"{path} is corrupt: {_member_problem(exc)} (its bytes changed after it was saved); re-copy it "
            "from its source"
        ) from None
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror or exc}); check the file") from None
    return len(members)


def _member_problem(exc: zipfile.BadZipFile) -> str:
    text = str(exc)
    if "CRC" in text:
        return text.replace("Bad CRC-32 for file", "the CRC-32 of member").rstrip() + " does not match"
    return f"the zip structure is damaged ({text})"


def check_integrity(path: str | Path) -> IntegrityReport:
    """The CRC-32 of every zip member of a checkpoint file, or of every zip file in a directory."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; check the path")
    report = IntegrityReport()
    for f in _checkpoint_files(path):
        if zipfile.is_zipfile(f):
            report.checked[str(f)] = check_zip_crcs(f)
        elif f.suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".distcp"):
            report.unchecked.append(str(f))
    return report
