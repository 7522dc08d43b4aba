"""The command line as a user runs it: the installed console script, in a subprocess."""

import shutil
import subprocess
import sys

import pytest

import psoft_export
from tests.conftest import MODELS

COMMANDS = ("decompose", "train", "merge", "verify")


def run(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("psoft-export")
    cmd = [exe] if exe else [sys.executable, "-m", "psoft_export"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    res = run("--help")
    assert res.returncode == 0, res.stderr
    for command in COMMANDS:
        assert f"  {command} " in res.stdout, f"{command} missing from --help"


def test_version():
    res = run("--version")
    assert res.returncode == 0 and psoft_export.__version__ in res.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    res = run(command, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage: psoft-export " + command in res.stdout
    assert len(res.stdout.splitlines()) > 5


def test_unknown_command_is_usage_error():
    res = run("export")
    assert res.returncode == 2 and "No such command" in res.stderr


def test_help_and_argument_errors_do_not_import_torch():
    """Issue 12.7: help must be instant; importing torch and transformers takes seconds."""
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom psoft_export.cli import cli\n"
        "for args in (['--help'], ['train', '--help'], ['merge', '--help'], ['decompose', '--help'], ['train']):\n"
        "    CliRunner().invoke(cli, args)\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    """Issue 12.4: under CI, nohup or a notebook a long run still says how far it is."""
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "psoft_export",
            "train",
            str(MODELS / "llama"),
            "--data",
            str(MODELS.parent / "data" / "train.jsonl"),
            "-o",
            str(out),
            "--method",
            "oft",
            "--block-size",
            "16",
            "--steps",
            "40",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("train: step ")]
    assert [l.split()[2] for l in lines] == [f"{s}/40" for s in range(2, 41, 2)], result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", str(MODELS / "llama"), "--data", "x.jsonl", "-o", "out", "--seed", "1e23"],
            "'1e23' is not a valid integer",
        ),
        (["merge"], "Missing argument 'MODEL_DIR'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_argument_errors_are_one_line(args, message):
    """click's own errors (bad values, missing arguments) follow the project's contract: one line, exit 2."""
    result = run(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_bare_command_prints_the_help():
    result = run()
    assert result.returncode == 2 and "Typical chain" in result.stdout
