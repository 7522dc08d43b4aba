#!/usr/bin/env python
"""The suite's mutation checks: plant one realistic bug at a time in a temporary copy and run the tests that
must catch it. Exit 0 when every mutation is caught (its tests fail), 1 otherwise.

    python tools/mutations.py            # all
    python tools/mutations.py --list
    python tools/mutations.py grad-accum rng-on-resume

The copy is made from ``git ls-files`` (tracked and untracked, not ignored) and put first on PYTHONPATH, so the
installed (editable) package is not touched; fixtures are linked, not copied.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (file, original text, planted text, tests that must fail)
MUTATIONS = {
    "prompt-not-masked": (
        "psoft_export/data.py",
        "labels = ([IGNORE] * len(prompt) + completion)[:seq_len]",
        "labels = (prompt + completion)[:seq_len]",
        ["tests/test_loop.py::test_completion_rows_mask_the_prompt_by_hand"],
    ),
    "lr-doubled-in-cosine": (
        "psoft_export/train_config.py",
        "return peak * 0.5 * (1.0 + math.cos(",
        "return peak * (1.0 + math.cos(",
        ["tests/test_loop.py::test_schedule_by_hand"],
    ),
    "clipping-disabled": (
        "psoft_export/train.py",
        'cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))',
        'float("inf"))',
        ["tests/test_loop.py::test_clipping_caps_the_norm"],
    ),
    "signal-inside-a-library-error": (
        "psoft_export/cli.py",
        "            signum = received()",
        "            signum = None",
        ["tests/test_reliability.py::test_a_signal_a_library_turned_into_its_own_error_is_an_interruption"],
    ),
    "oft-group-stale-blocks": (
        "psoft_export/adapters/oft.py",
        "return (*modes, q.data_ptr(), q._version, q.requires_grad)",
        "return (*modes, q.data_ptr(), q.requires_grad)",
        ["tests/test_adapters_oft.py::test_rotation_groups_build_once_per_parent_and_train_as_per_layer"],
    ),
    "oft-group-spent-graph": (
        "psoft_export/adapters/oft.py",
        "        if R.requires_grad:  # a backward",
        "        if False:  # a backward",
        ["tests/test_adapters_oft.py::test_rotation_groups_build_once_per_parent_and_train_as_per_layer"],
    ),
    "grad-accum": (
        "psoft_export/train.py",
        "run.device)).loss / divisor",
        "run.device)).loss",
        ["tests/test_loop.py::test_grad_accum_2x4_equals_batch_8"],
    ),
    "rng-on-resume": (
        "psoft_export/train.py",
        'torch.set_rng_state(state["rng"])',
        "pass",
        ["tests/test_loop.py::test_resume_is_bit_identical_with_dropout"],
    ),
    "vector-b-axis": (
        "psoft_export/adapters/psoft.py",
        "R = self.vector_b[:, None] * R",
        "R = R * self.vector_b[None, :]",
        ["tests/test_float64_recompute.py"],
    ),
    "subspace-unrefined": (
        "psoft_export/subspace.py",
        "ANGLE_TOL = 1e-7",
        'ANGLE_TOL = float("inf")',
        ["tests/test_real_checkpoint.py::test_default_decomposition_is_the_exact_subspace"],
    ),
    "tridiagonal-shift-sign": (
        "psoft_export/subspace.py",
        "self.lapack.dgtsv(self.off, shift - self.d64, self.off",
        "self.lapack.dgtsv(self.off, self.d64 - shift, self.off",
        ["tests/test_decompose.py::test_tridiagonal_basis_reduces_in_place_and_corrects_like_the_spectral_formula"],
    ),
    "unit-reference-unmerged": (
        "psoft_export/streamed_run.py",
        "                    layer.merge()  # folds into base's (loaded) weight in place",
        "                    pass",
        ["tests/test_verify.py::test_unit_by_unit_verification_equals_the_whole_model_one"],
    ),
    "overwrite-foreign-dir": (
        "psoft_export/atomic.py",
        "if not (path / MARKER).is_file():",
        "if False:",
        ["tests/test_reliability.py::test_overwrite_only_replaces_what_psoft_export_wrote"],
    ),
    "verify-tolerance-10x": (
        "converters/__init__.py",
        'rounded_tolerances={"float32": 1e-5,',
        'rounded_tolerances={"float32": 1e-4,',
        ["tests/test_merge.py::test_verify_fails_just_above_its_tolerance"],
    ),
    "gguf-tolerance-10x": (
        "converters/__init__.py",
        '\n            tolerances={\n                "float32": 2e-3,',
        '\n            tolerances={\n                "float32": 2e-2,',
        ["tests/test_merge.py::test_each_runtime_route_fails_just_above_its_tolerance"],
    ),
    "divergence-after-step": (
        "psoft_export/train.py",
        "if not math.isfinite(loss_sum):",
        "if False:",
        ["tests/test_loop.py::test_non_finite_loss_stops_before_the_optimizer_step"],
    ),
    "streamed-read-untransposed": (
        "psoft_export/stored.py",
        "return self.T.apply(Y)",
        "return self.apply(Y)",
        ["tests/test_decompose.py::test_weight_streamed_from_its_file_gives_the_same_subspace"],
    ),
    "peft-file-unchecked": (
        "psoft_export/adapter_io.py",
        "faithful = worst <= PEFT_FAITHFUL_RTOL",
        "faithful = True",
        ["tests/test_real_checkpoint.py::test_peft_file_is_written_only_when_peft_reproduces_it"],
    ),
}


def copy_tree(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if rel.startswith("fixtures/"):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    (dst / "fixtures").symlink_to(ROOT / "fixtures")


def pytest_in_copy(tests: list[str], edit=None) -> int:
    """Run ``tests`` in a fresh copy of the tree, after ``edit(copy_root)``; pytest's exit code."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tmp = Path(tmp)
        copy_tree(tmp)
        if edit is not None:
            edit(tmp)
        env = {**os.environ, "PYTHONPATH": str(tmp), "HF_HUB_OFFLINE": "1"}
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        ).returncode


def run(name: str) -> bool:
    path, old, new, tests = MUTATIONS[name]

    def plant(root: Path) -> None:
        text = (root / path).read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: the original text is not found once in {path}: update tools/mutations.py")
        (root / path).write_text(text.replace(old, new))

    caught = pytest_in_copy(tests, plant) == 1  # 1: tests failed (2+ would be a broken run, not a catch)
    print(f"{'caught' if caught else 'MISSED'}  {name}  ({path}: {new!r})")
    return caught


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list:
        for name, (path, _, new, tests) in MUTATIONS.items():
            print(f"{name}: {path} -> {new!r}; caught by {', '.join(tests)}")
        return 0
    names = args.names or list(MUTATIONS)
    unknown = [n for n in names if n not in MUTATIONS]
    if unknown:
        print(f"error: unknown mutation {unknown[0]}: see --list", file=sys.stderr)
        return 2
    baseline = sorted({t for n in names for t in MUTATIONS[n][3]})
    if pytest_in_copy(baseline) != 0:  # otherwise every mutation would look caught
        print("error: the tests fail without any mutation: fix them first", file=sys.stderr)
        return 1
    results = [run(n) for n in names]
    print(f"{sum(results)} of {len(results)} mutations caught")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
