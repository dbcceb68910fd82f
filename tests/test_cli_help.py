"""`runbooks --help` names every command, one line each; each command's own --help works."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deployments.cli import EXTERNAL_COMMANDS, EXTERNAL_HELP, build_parser


def _help(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deployments.cli", *argv], capture_output=True, text=True,
                          check=False, timeout=120, env={"PATH": "/usr/bin:/bin", "COLUMNS": "60"})


def test_help_lists_every_command_on_one_line() -> None:
    done = _help("--help")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    parser_commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    commands = parser_commands | set(EXTERNAL_COMMANDS)
    assert {"backup", "recover-status", "demo", "up", "sandbox", "serve", "webhook", "wal-push",
            "wal-fetch"} <= commands
    for command in commands:
        # "    <command>   <help text>" on one line, even in a 60-column terminal
        found = [line for line in lines if line.split()[:1] == [command]]
        assert len(found) == 1, f"{command!r} is not on exactly one line of --help:\n{done.stdout}"
        assert len(found[0].split(None, 1)) == 2 and len(found[0].split(None, 1)[1]) > 10, found[0]
    assert set(EXTERNAL_HELP) == set(EXTERNAL_COMMANDS)


@pytest.mark.parametrize("command", ["up", "sandbox", "serve", "webhook"])
def test_each_command_has_its_own_help(command: str) -> None:
    done = _help(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: runbooks {command}"), done.stdout[:200]
