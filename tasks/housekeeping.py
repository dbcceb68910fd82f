"""Housekeeping steps of a maintenance window, each run over SSH as an argv list with its output recorded:
package upgrade (simulated or real), container prune, certificate expiry, disk usage, log rotation.

Each returns a HousekeepingResult: ``ok`` false when the command failed; ``finding`` set when the command
ran but found something to act on (a certificate expiring within the threshold, a filesystem above it).
The parsers are plain functions over the tools' C-locale output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.errors import ConfigurationError, RunbookError
from blocks.ssh import SSHHost
from tasks.log import run_logger
from tasks.ssh import run_remote

Step = Literal["apt-upgrade", "container-prune", "certificate-expiry", "disk-usage", "log-rotation"]
STEPS: tuple[str, ...] = ("apt-upgrade", "container-prune", "certificate-expiry", "disk-usage", "log-rotation")
MAX_OUTPUT = 20_000  # characters of each command's output kept (the end)
_C = ["env", "LC_ALL=C"]  # the parsers read the tools' untranslated output


@dataclass(frozen=True)
class HousekeepingResult:
    step: str
    ok: bool
    summary: str
    finding: str = ""
    output: str = ""
    commands: tuple[str, ...] = ()


# -- pure parsers ------------------------------------------------------------------------------------------------


def parse_apt_summary(output: str) -> tuple[int, int, int, int]:
    """(upgraded, newly installed, to remove, not upgraded) from apt-get's summary line."""
    m = re.search(r"(\d+) upgraded, (\d+) newly installed, (\d+) to remove and (\d+) not upgraded", output)
    if not m:
        raise RunbookError("apt-get printed no summary line (… upgraded, … newly installed …)")
    return int(m[1]), int(m[2]), int(m[3]), int(m[4])


def parse_enddate(output: str) -> datetime:
    """``notAfter=Mar  1 12:00:00 2027 GMT`` (openssl x509 -enddate) -> an aware datetime."""
    m = re.search(r"notAfter=(\w{3})\s+(\d{1,2}) (\d{2}:\d{2}:\d{2}) (\d{4}) GMT", output)
    if not m:
        raise RunbookError(f"no notAfter date in openssl's output: {output.strip()[:200]!r}")
    return datetime.strptime(f"{m[1]} {m[2]} {m[3]} {m[4]}", "%b %d %H:%M:%S %Y").replace(tzinfo=UTC)


def parse_df(output: str) -> list[tuple[str, int]]:
    """(mount point, percent used) per line of ``df -P``."""
    rows = []
    for line in output.strip().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 6 and fields[4].endswith("%") and fields[4][:-1].isdigit():
            rows.append((" ".join(fields[5:]), int(fields[4][:-1])))
    if not rows:
        raise RunbookError(f"df printed no filesystem: {output.strip()[:200]!r}")
    return rows


def parse_reclaimed(output: str) -> str:
    """Docker's ``Total reclaimed space: 1.2GB`` (each prune prints one)."""
    found = re.findall(r"Total reclaimed space:\s*(\S+)", output)
    return " + ".join(found) if found else "0B"


# -- steps -------------------------------------------------------------------------------------------------------


def _run(host: SSHHost, argv: list[str], timeout: float) -> tuple[int, str, str]:
    result = run_remote.fn(host, argv, check=False, timeout_seconds=timeout)
    return result.exit_code, result.stdout + result.stderr, " ".join(argv)


def _kept(output: str) -> str:
    """A command's output for the record: all of it, or its start and end (parsers read all of it)."""
    if len(output) <= MAX_OUTPUT:
        return output
    head, tail = MAX_OUTPUT // 4, MAX_OUTPUT - MAX_OUTPUT // 4
    return f"{output[:head]}\n[... {len(output) - MAX_OUTPUT} characters ...]\n{output[-tail:]}"


@task(cache_policy=NO_CACHE, task_run_name="housekeeping-apt-upgrade")
def apt_upgrade(host: SSHHost, *, real: bool = False, timeout_seconds: float = 1800) -> HousekeepingResult:
    """``apt-get -s upgrade`` (simulation: changes nothing) or, when ``real``, ``apt-get -y upgrade``."""
    argv = [*_C, "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y" if real else "-s", "upgrade"]
    code, output, command = _run(host, argv, timeout_seconds)
    if code != 0:
        return HousekeepingResult("apt-upgrade", False, f"apt-get exited {code}", output=_kept(output),
                                  commands=(command,))
    upgraded, new, remove, held = parse_apt_summary(output)
    verb = "upgraded" if real else "would upgrade"
    summary = f"{verb} {upgraded}, {new} new, {remove} to remove, {held} held back"
    run_logger().info("%s: apt: %s", host.describe(), summary)
    return HousekeepingResult("apt-upgrade", True, summary, output=_kept(output), commands=(command,))


@task(cache_policy=NO_CACHE, task_run_name="housekeeping-container-prune")
def prune_containers(host: SSHHost, *, images: bool = True, timeout_seconds: float = 600) -> HousekeepingResult:
    """``docker container prune -f`` (stopped containers) and ``docker image prune -f`` (dangling images)."""
    outputs, commands = [], []
    for argv in [["docker", "container", "prune", "-f"], *([["docker", "image", "prune", "-f"]] if images else [])]:
        code, output, command = _run(host, argv, timeout_seconds)
        outputs.append(output)
        commands.append(command)
        if code != 0:
            return HousekeepingResult("container-prune", False, f"`{command}` exited {code}",
                                      output=_kept("\n".join(outputs)), commands=tuple(commands))
    summary = f"reclaimed {parse_reclaimed(chr(10).join(outputs))}"
    return HousekeepingResult("container-prune", True, summary, output=_kept("\n".join(outputs)),
                              commands=tuple(commands))


@task(cache_policy=NO_CACHE, task_run_name="housekeeping-certificate-expiry")
def check_certificates(host: SSHHost, paths: list[str], *, min_days: float = 14,
                       now: datetime | None = None) -> HousekeepingResult:
    """Each PEM certificate's expiry (``openssl x509 -enddate``); one within ``min_days`` is a finding."""
    if not paths:
        raise ConfigurationError("certificate-expiry needs certificate paths on the host")
    now = now or datetime.now(UTC)
    lines, findings, outputs, commands = [], [], [], []
    for path in paths:
        code, output, command = _run(host, ["openssl", "x509", "-enddate", "-noout", "-in", path], 60)
        outputs.append(f"{path}: {output.strip()}")
        commands.append(command)
        if code != 0:
            return HousekeepingResult("certificate-expiry", False, f"{path}: openssl exited {code}",
                                      output=_kept("\n".join(outputs)), commands=tuple(commands))
        expires = parse_enddate(output)
        days = (expires - now).total_seconds() / 86400
        lines.append(f"{path}: {expires:%Y-%m-%d} ({days:.0f} days)")
        if days < min_days:
            findings.append(f"{path} expires {expires:%Y-%m-%d %H:%M} UTC ({days:.1f} days, under {min_days:g})")
    return HousekeepingResult("certificate-expiry", True, "; ".join(lines), "; ".join(findings),
                              _kept("\n".join(outputs)), tuple(commands))


@task(cache_policy=NO_CACHE, task_run_name="housekeeping-disk-usage")
def check_disk_usage(host: SSHHost, paths: list[str], *, max_percent: float = 85) -> HousekeepingResult:
    """``df -P`` of each path; a filesystem above ``max_percent`` used is a finding."""
    code, output, command = _run(host, [*_C, "df", "-P", *(paths or ["/"])], 60)
    if code != 0:
        return HousekeepingResult("disk-usage", False, f"df exited {code}", output=_kept(output),
                                  commands=(command,))
    rows = parse_df(output)
    findings = [f"{mount} is {used}% full (over {max_percent:g}%)" for mount, used in rows if used > max_percent]
    summary = ", ".join(f"{mount} {used}%" for mount, used in rows)
    return HousekeepingResult("disk-usage", True, summary, "; ".join(findings), _kept(output), (command,))


@task(cache_policy=NO_CACHE, task_run_name="housekeeping-log-rotation")
def rotate_logs(host: SSHHost, config: str, *, state_file: str = "", force: bool = False) -> HousekeepingResult:
    """``logrotate [-f] [-s STATE] CONFIG`` (verbose, so the output says what was rotated)."""
    argv = [*_C, "logrotate", "-v", *(["-f"] if force else []), *(["-s", state_file] if state_file else []), config]
    code, output, command = _run(host, argv, 600)
    if code != 0:
        return HousekeepingResult("log-rotation", False, f"logrotate exited {code}", output=_kept(output),
                                  commands=(command,))
    rotated = len(re.findall(r"^rotating log ", output, flags=re.MULTILINE))
    return HousekeepingResult("log-rotation", True, f"{rotated} file(s) rotated", output=_kept(output),
                              commands=(command,))
