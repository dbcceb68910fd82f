"""docker compose steps on a host over SSH: the project's version variables, pull + up of one service, the
state and health of a project's containers (``docker compose ps --format json``), nginx test + reload.

The env file may hold secrets besides the version variables: its content is kept in memory for the undo
and never logged or reported; only the variables the runbook was asked to set are shown.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.errors import ConfigurationError, RunbookError
from blocks.ssh import SSHHost
from tasks.log import run_logger
from tasks.ssh import run_remote

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ComposeUnhealthy(RunbookError):
    """A compose project's containers did not all become running and healthy in time."""


@dataclass(frozen=True)
class ComposeProject:
    """Where a compose project lives on the host and how to address it."""

    directory: str
    name: str
    env_file: str = ".env"

    @property
    def env_path(self) -> str:
        return self.env_file if self.env_file.startswith("/") else f"{self.directory.rstrip('/')}/{self.env_file}"

    def argv(self, *command: str) -> list[str]:
        """``docker compose --project-directory DIR -p NAME --env-file FILE COMMAND...`` as an argv list."""
        return ["docker", "compose", "--project-directory", self.directory, "-p", self.name, "--env-file",
                self.env_path, *command]


# -- pure ------------------------------------------------------------------------------------------------------


def check_variables(variables: dict[str, str]) -> None:
    for name, value in variables.items():
        if not _NAME.match(name):
            raise ConfigurationError(f"{name!r} is not an environment variable name; nothing was changed")
        if "\n" in value or "\r" in value:
            raise ConfigurationError(f"the value of {name} has a line break; nothing was changed")


def env_values(text: str, names: list[str]) -> dict[str, str | None]:
    """The values the env file gives the named variables (None: not set); nothing else is read out."""
    found: dict[str, str | None] = dict.fromkeys(names)
    for line in text.splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip() in found:
            found[key.strip()] = value.strip().strip("'\"")
    return found


def set_env_lines(text: str, variables: dict[str, str]) -> str:
    """The env file with each variable's line replaced (or appended); every other line kept as it was."""
    done: set[str] = set()
    lines = []
    for line in text.splitlines():
        key = line.strip().removeprefix("export ").partition("=")[0].strip()
        if key in variables and "=" in line:
            lines.append(f"{key}={variables[key]}")
            done.add(key)
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in variables.items() if k not in done]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ContainerState:
    service: str
    image: str
    state: str
    health: str  # "healthy", "unhealthy", "starting", or "" (no healthcheck)

    @property
    def ready(self) -> bool:
        return self.state == "running" and self.health in ("healthy", "")


def parse_ps(output: str) -> list[ContainerState]:
    """``docker compose ps --format json``: one JSON object per line (compose >= 2.21) or one JSON array."""
    text = output.strip()
    if not text:
        return []
    items = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    return [ContainerState(i.get("Service", ""), i.get("Image", ""), i.get("State", ""), i.get("Health", ""))
            for i in items]


# -- tasks -----------------------------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE)
def compose_ps(host: SSHHost, project: ComposeProject, services: list[str] | None = None) -> list[ContainerState]:
    """The project's containers (all, or the given services) as compose reports them."""
    result = run_remote.fn(host, project.argv("ps", "--all", "--format", "json", *(services or [])))
    states = parse_ps(result.stdout)
    run_logger().info("%s: project %s: %s", host.describe(), project.name,
                      ", ".join(f"{s.service}={s.image} ({s.state}{'/' + s.health if s.health else ''})"
                                for s in states) or "no containers")
    return states


@task(cache_policy=NO_CACHE)
def pull_and_up(host: SSHHost, project: ComposeProject, services: list[str] | None = None) -> None:
    """``pull`` then ``up -d`` (with ``--no-deps`` and the services when given: only those are recreated)."""
    run_remote.fn(host, project.argv("pull", *(services or [])))
    run_remote.fn(host, project.argv("up", "-d", *(["--no-deps", *services] if services else [])))
    run_logger().info("%s: project %s up (%s)", host.describe(), project.name, ", ".join(services or ["all"]))


@task(cache_policy=NO_CACHE)
def stop_project(host: SSHHost, project: ComposeProject) -> None:
    """``docker compose stop``: containers stay (and can be started again), they stop serving."""
    run_remote.fn(host, project.argv("stop"))
    run_logger().info("%s: project %s stopped", host.describe(), project.name)


@task(cache_policy=NO_CACHE)
def wait_compose_healthy(host: SSHHost, project: ComposeProject, services: list[str] | None = None, *,
                         timeout_seconds: float = 300, interval_seconds: float = 2) -> list[ContainerState]:
    """Poll ``compose ps`` until every container (of the services) is running and healthy (or has no
    healthcheck); raise ComposeUnhealthy with their last states after the timeout."""
    started = time.monotonic()
    while True:
        states = parse_ps(run_remote.fn(host, project.argv("ps", "--all", "--format", "json",
                                                           *(services or []))).stdout)
        missing = sorted(set(services or []) - {s.service for s in states})
        if states and not missing and all(s.ready for s in states):
            run_logger().info("%s: project %s healthy after %.1f s", host.describe(), project.name,
                              time.monotonic() - started)
            return states
        if time.monotonic() - started + interval_seconds > timeout_seconds:
            what = ", ".join(f"{s.service}={s.image} {s.state}/{s.health or 'no healthcheck'}" for s in states)
            raise ComposeUnhealthy(f"{host.describe()}: project {project.name} not healthy after "
                                   f"{timeout_seconds:.0f} s: {what or 'no containers'}"
                                   + (f"; missing {missing}" if missing else ""))
        time.sleep(interval_seconds)


@task(cache_policy=NO_CACHE)
def reload_nginx(host: SSHHost, nginx: list[str]) -> None:
    """``nginx -t`` (the configuration as it is on disk now), then ``nginx -s reload``."""
    run_remote.fn(host, [*nginx, "-t"])
    run_remote.fn(host, [*nginx, "-s", "reload"])
    run_logger().info("%s: nginx configuration tested and reloaded", host.describe())
