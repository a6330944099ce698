"""Regenerate ``sample_states/`` bit-identically, or check that it still regenerates so.

    python scripts/make_sample_states.py            # rewrite sample_states/
    python scripts/make_sample_states.py --check    # regenerate into a temp dir, compare SHA256SUMS

The full configuration takes about a minute on a 2-core CPU. See scripts/sample_builder.py
for what is made and how it is kept reproducible.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from sample_builder import (  # noqa: E402 - beside this script
    SAMPLE_CONFIGS,
    SHA256SUMS_FILE,
    compare_trees,
    make_sample_states,
    read_sha256sums,
    tree_sha256,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "sample_states", help="the folder to (re)write"
    )
    parser.add_argument("--size", choices=sorted(SAMPLE_CONFIGS), default="full", help="which configuration")
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary folder and compare with --out's files and SHA256SUMS",
    )
    return parser.parse_args()


def generate(out: Path, size: str) -> None:
    # Build next to the target and swap at the end, so a failed run leaves the old folder intact.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        started = time.perf_counter()
        report = make_sample_states(staging, size)
        elapsed = time.perf_counter() - started
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _, train_loss, val_loss = report.nanogpt.curve[-1]
    print(f"wrote {out} in {elapsed:.0f} s ({sum(report.file_sizes.values()) / 1e6:.2f} MB)")
    print(f"  nanogpt: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
    print(f"  plain:   train loss {report.plain.final_loss:.4f}, accuracy {report.plain.accuracy:.3f}")
    print(f"  hf:      train loss {report.hf.log_history[-1]['loss']:.4f}")


def check(out: Path, size: str) -> int:
    sums_path = out / SHA256SUMS_FILE
    if not sums_path.is_file():
        print(f"{sums_path} is missing; run without --check to create the folder", file=sys.stderr)
        return 1
    listed = read_sha256sums(sums_path)
    problems = [f"{out}: {problem}" for problem in compare_trees(listed, tree_sha256(out))]
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        make_sample_states(Path(scratch) / "sample_states", size)
        elapsed = time.perf_counter() - started
        regenerated = tree_sha256(Path(scratch) / "sample_states")
    problems += [f"regenerated: {problem}" for problem in compare_trees(listed, regenerated)]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(
            f"{len(problems)} difference(s) with {sums_path}. Different CPU types or torch builds can round "
            "differently; if the change is intended, regenerate without --check.",
            file=sys.stderr,
        )
        return 1
    print(
        f"ok: {len(listed)} files in {out} match SHA256SUMS and regenerate bit-identically ({elapsed:.0f} s)"
    )
    return 0


def main() -> int:
    args = parse_args()
    out = args.out.resolve()
    if args.check:
        return check(out, args.size)
    generate(out, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
