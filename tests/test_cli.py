"""The command line as a user runs it: the installed console script, in a subprocess."""

import shutil
import subprocess
import sys

import pytest

import psoft_export

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
