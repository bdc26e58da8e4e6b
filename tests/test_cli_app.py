"""The top-level command: help, version, completions that stay current."""

import pytest

from gpt2cli import __version__
from scripts.make_completions import SHELLS
from tests.conftest import FIXTURES, cli, run_gpt2

COMPLETIONS = FIXTURES.parent.parent / "completions"


def test_help_lists_the_commands():
    done = run_gpt2("--help")
    assert done.returncode == 0
    for command in ("convert", "inspect"):
        assert command in done.stdout


def test_version():
    done = run_gpt2("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"gpt2 {__version__}"


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_each_command_help_has_an_example(command):
    done = run_gpt2(command, "--help")
    assert done.returncode == 0
    assert f"gpt2 {command} " in done.stdout  # the Examples section


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_scripts_are_current(shell):
    committed = (COMPLETIONS / SHELLS[shell]).read_text()
    # What the `gpt2` console script prints; a checkout run (no console script) has a launcher
    # of the same name, which prints the same.
    current = run_gpt2(env={"_GPT2_COMPLETE": f"source_{shell}"})
    assert committed == current.stdout, "run: uv run python scripts/make_completions.py"
    assert "gpt2" in committed


def _invoke_with_failing_load(monkeypatch, error):
    import gpt2cli.hub

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(gpt2cli.hub, "resolve", fail)
    monkeypatch.delenv("GPT2_DEBUG", raising=False)
    return cli("inspect", "whatever.npz")


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch):
    result = _invoke_with_failing_load(monkeypatch, KeyboardInterrupt())
    assert result.exit_code == 130
    assert "Traceback" not in result.output


def test_unexpected_errors_are_one_line_with_a_debug_hint(monkeypatch):
    result = _invoke_with_failing_load(monkeypatch, RuntimeError("disk on fire"))
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        == "error: RuntimeError: disk on fire (run with --debug for the traceback)"
    )


def test_help_piped_into_head_ends_quietly():
    import subprocess

    from tests.conftest import gpt2_exe

    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; '{gpt2_exe()}' train --help | head -c 10"],
        capture_output=True,
        text=True,
    )
    assert done.stdout and done.stderr == ""  # no "error: BrokenPipeError", no traceback
