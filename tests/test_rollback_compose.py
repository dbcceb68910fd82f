"""compose-ssh and blue-green-compose over a real sshd on loopback (tests/ssh_fixture.py): the argv that reached
the host (recorded by the stub `docker`), host keys, atomic file replacement, and a real nginx switched
between two real HTTP apps."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.app import AppEndpoint
from blocks.ssh import HostKeyRejected
from tests.app_fixture import ProbeApp
from tests.ssh_fixture import Nginx, SshServer

ENV = "# app settings\nAPI_VERSION=v1.2.0\nDB_PASSWORD=env-secret-Q7x9\n"


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with SshServer() as server:
        yield server


@pytest.fixture
def project(sshd: SshServer) -> Iterator[Path]:
    """A compose project directory on the host with its .env, `api` and `worker` running v1.2.0."""
    directory = sshd.dir / "app dir"  # a space: the argv must be quoted
    directory.mkdir()
    (directory / ".env").write_text(ENV)
    (directory / ".env").chmod(0o600)
    sshd.compose_services({"api": "registry/app:${API_VERSION}", "worker": "registry/worker:${API_VERSION}"})
    running = {"image": "registry/app:v1.2.0", "state": "running", "health": "healthy"}
    sshd.set_containers({"app": {"api": running, "worker": {**running, "image": "registry/worker:v1.2.0"}}})
    (sshd.state / "argv.log").unlink(missing_ok=True)
    yield directory
    import shutil

    shutil.rmtree(directory)


# -- the SSH Block and tasks -------------------------------------------------------------------------------------


def test_argv_reaches_the_host_exactly_quoted(sshd: SshServer, project: Path) -> None:
    from tasks.ssh import run_remote

    marker = sshd.dir / "pwned"
    hostile = ["a b", "it's", f"$(touch {marker})", "; touch " + str(marker), "`id`", "*", "\\n"]
    result = run_remote.fn(sshd.block(), ["docker", "compose", "-p", "x", "ps", *hostile])
    assert result.exit_code == 0
    assert sshd.argv_log() == [["compose", "-p", "x", "ps", *hostile]]
    assert not marker.exists()


def test_a_changed_host_key_is_refused_before_any_command(sshd: SshServer, project: Path) -> None:
    from tasks.ssh import run_remote

    changed = sshd.block(known_hosts=sshd.known_hosts("other_host_key"))
    with pytest.raises(HostKeyRejected, match="CHANGED") as caught:
        run_remote.fn(changed, ["docker", "compose", "-p", "app", "up", "-d"])
    assert "refused before any command ran" in str(caught.value)
    unknown = sshd.block(known_hosts=sshd.known_hosts().replace("[127.0.0.1]", "[otherhost]"))
    with pytest.raises(HostKeyRejected, match="not in the Block's known_hosts"):
        run_remote.fn(unknown, ["docker", "compose", "-p", "app", "up", "-d"])
    assert sshd.argv_log() == []  # nothing reached the host
    assert sshd.private_key not in str(caught.value) and sshd.private_key not in repr(changed)


def test_empty_known_hosts_and_missing_credentials_are_refused(sshd: SshServer) -> None:
    from blocks.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="known_hosts is empty"):
        sshd.block(known_hosts="# nothing\n").connect()
    block = sshd.block()
    block.private_key = None
    with pytest.raises(ConfigurationError, match="private key or a password"):
        block.connect()


def test_write_remote_file_replaces_atomically_and_keeps_the_mode(sshd: SshServer, project: Path) -> None:
    from tasks.ssh import read_remote_file, write_remote_file

    path = project / ".env"
    inode = path.stat().st_ino
    write_remote_file.fn(sshd.block(), str(path), "API_VERSION=v9\n")
    assert path.read_text() == "API_VERSION=v9\n" and path.stat().st_ino != inode  # a new file renamed over
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert sorted(p.name for p in project.iterdir()) == [".env"]  # no temporary file left
    assert read_remote_file.fn(sshd.block(), str(path)) == "API_VERSION=v9\n"
    assert read_remote_file.fn(sshd.block(), str(project / "nope")) is None


def test_env_file_helpers() -> None:
    from tasks.compose import env_values, set_env_lines

    assert env_values(ENV, ["API_VERSION", "NOPE"]) == {"API_VERSION": "v1.2.0", "NOPE": None}
    assert set_env_lines(ENV, {"API_VERSION": "v1.1.0", "NEW": "x"}) == (
        "# app settings\nAPI_VERSION=v1.1.0\nDB_PASSWORD=env-secret-Q7x9\nNEW=x\n")


# -- the flow ----------------------------------------------------------------------------------------------------


FAST = {"confirm": True, "poll_seconds": 0.1, "rollout_timeout_seconds": 3, "health_timeout_seconds": 3,
        "lock_timeout_seconds": 30}


def run_record(state: Any) -> tuple[str, dict[str, Any]]:
    from tests.test_rollback_flow import run_record as record

    logs, artifacts, run = record(state)
    text = "\n".join([*(log.message for log in logs), json.dumps(artifacts, default=str),
                      json.dumps(run.parameters, default=str), state.message or ""])
    return text, artifacts


def test_compose_pin_runs_the_expected_argv_and_pins_the_version(sshd, project, prefect_harness, caplog) -> None:
    from flows.rollback import rollback

    state = rollback(target="compose-ssh", ssh=sshd.block(), compose_dir=str(project), compose_project="app",
                     compose_service="api", variables={"API_VERSION": "v1.1.0"}, return_state=True, **FAST)
    assert state.is_completed(), state.message
    base = ["compose", "--project-directory", str(project), "-p", "app", "--env-file", f"{project}/.env"]
    log = sshd.argv_log()
    assert [*base, "pull", "api"] in log and [*base, "up", "-d", "--no-deps", "api"] in log
    assert log.index([*base, "pull", "api"]) < log.index([*base, "up", "-d", "--no-deps", "api"])
    assert not [argv for argv in log if "stop" in argv or "down" in argv]
    assert (project / ".env").read_text() == ENV.replace("v1.2.0", "v1.1.0")  # the password line kept
    containers = sshd.containers()["app"]
    assert containers["api"]["image"] == "registry/app:v1.1.0" and containers["api"]["health"] == "healthy"
    assert containers["worker"]["image"] == "registry/worker:v1.2.0"  # --no-deps: untouched
    text, artifacts = run_record(state)
    rows = artifacts["rollback-after"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert {"what": "API_VERSION", "before": "v1.2.0", "after": "v1.1.0"} in rows
    for secret in ("env-secret-Q7x9", sshd.private_key.strip().splitlines()[1]):
        assert secret not in text and secret not in caplog.text


def test_compose_pin_to_a_broken_version_puts_the_env_file_back(sshd, project, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.compose import ComposeUnhealthy

    state = rollback(target="compose-ssh", ssh=sshd.block(), compose_dir=str(project), compose_project="app",
                     compose_service="api", variables={"API_VERSION": "v1.0.0-broken"}, return_state=True, **FAST)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ComposeUnhealthy) and "registry/app:v1.0.0-broken running/unhealthy" in str(error)
    assert (project / ".env").read_text() == ENV  # byte for byte
    assert sshd.containers()["app"]["api"]["image"] == "registry/app:v1.2.0"
    ups = [argv for argv in sshd.argv_log() if "up" in argv]
    assert len(ups) == 2  # the rollback and its undo, nothing more
    text, artifacts = run_record(state)
    assert "the env file and service were put back" in artifacts["rollback-report"]


def test_compose_bad_input_changes_nothing(sshd, project, prefect_harness) -> None:
    from blocks.errors import ConfigurationError
    from flows.rollback import rollback

    for kwargs in ({"variables": {"API VERSION": "x"}}, {"variables": {"API_VERSION": "a\nDB_PASSWORD=x"}},
                   {"variables": {"API_VERSION": "v1"}, "compose_env_file": "missing.env"}):
        state = rollback(target="compose-ssh", ssh=sshd.block(), compose_dir=str(project), compose_project="app",
                         compose_service="api", return_state=True, **{**FAST, **kwargs})
        assert isinstance(state.result(raise_on_failure=False), ConfigurationError), kwargs
    assert (project / ".env").read_text() == ENV
    assert not [argv for argv in sshd.argv_log() if "up" in argv or "pull" in argv]


# -- blue-green compose behind a real nginx -----------------------------------------------------------------------


@pytest.fixture
def colours(sshd: SshServer, project: Path) -> Iterator[dict[str, Any]]:
    sshd.compose_services({"web": "registry/app:${API_VERSION}"})
    sshd.set_containers({"app-blue": {"web": {"image": "registry/app:v2", "state": "running", "health": "healthy"}}})
    (project / ".env").write_text("API_VERSION=v1\n")
    with ProbeApp(lambda: True) as blue, ProbeApp(lambda: True) as green:
        upstreams = {c: f"upstream app {{ server 127.0.0.1:{a.server.server_port}; }}\n"
                     for c, a in (("blue", blue), ("green", green))}
        nginx_dir = sshd.dir / f"nginx-{os.getpid()}"
        nginx_dir.mkdir()
        with Nginx(nginx_dir, upstreams["blue"]) as nginx:
            (project / "current_env").write_text("blue\n")
            yield {"blue": blue, "green": green, "nginx": nginx, "upstreams": upstreams,
                   "params": {"target": "blue-green-compose", "compose_dir": str(project),
                              "compose_project": "app-{colour}", "colour_file": str(project / "current_env"),
                              "upstream_file": str(nginx.upstream), "upstream_configs": upstreams,
                              "nginx": nginx.argv}}
        import shutil

        shutil.rmtree(nginx_dir)


def through_nginx(nginx: Nginx) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{nginx.port}/health", timeout=5) as response:
        return response.status


def test_blue_green_compose_starts_green_then_switches_nginx(sshd, project, colours, prefect_harness) -> None:
    from flows.rollback import rollback

    nginx, blue, green = colours["nginx"], colours["blue"], colours["green"]
    assert through_nginx(nginx) == 200 and blue.health_calls() == 1 and green.health_calls() == 0
    inode = nginx.upstream.stat().st_ino
    state = rollback(ssh=sshd.block(), app=AppEndpoint(base_url=f"http://127.0.0.1:{nginx.port}"),
                     return_state=True, **colours["params"], **FAST)
    assert state.is_completed(), state.message
    assert nginx.upstream.read_text() == colours["upstreams"]["green"] and nginx.upstream.stat().st_ino != inode
    assert (project / "current_env").read_text() == "green\n"
    before = green.health_calls()
    assert through_nginx(nginx) == 200 and green.health_calls() == before + 1  # nginx now proxies to green
    containers = sshd.containers()
    assert containers["app-green"]["web"]["state"] == "running"
    assert containers["app-blue"]["web"]["state"] == "running"  # the old colour keeps running
    assert [argv for argv in sshd.argv_log() if "up" in argv][0][4] == "app-green"
    assert not [argv for argv in sshd.argv_log() if "stop" in argv]
    assert not [p for p in nginx.upstream.parent.iterdir() if ".runbooks-" in p.name]


def test_blue_green_compose_unhealthy_green_leaves_blue_serving(sshd, project, colours, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.compose import ComposeUnhealthy

    (project / ".env").write_text("API_VERSION=v3-broken\n")
    nginx, blue = colours["nginx"], colours["blue"]
    before = nginx.upstream.read_text()
    state = rollback(ssh=sshd.block(), return_state=True, **colours["params"], **FAST)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), ComposeUnhealthy)
    assert nginx.upstream.read_text() == before and (project / "current_env").read_text() == "blue\n"
    calls = blue.health_calls()
    assert through_nginx(nginx) == 200 and blue.health_calls() == calls + 1
    containers = sshd.containers()
    assert containers["app-blue"]["web"]["state"] == "running"
    assert containers["app-green"]["web"]["state"] == "exited"  # started by the run, stopped by its undo


def test_private_key_with_passphrase_and_password_block_fields_stay_secret(sshd) -> None:
    block = sshd.block()
    block.password = SecretStr("pw-123456789")
    assert "pw-123456789" not in repr(block) and sshd.private_key not in repr(block)
    assert block.describe() == f"{block.user}@127.0.0.1:{sshd.port}"


def test_compose_pull_failure_puts_the_env_file_back(sshd, project, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.ssh import RemoteCommandFailed

    state = rollback(target="compose-ssh", ssh=sshd.block(), compose_dir=str(project), compose_project="app",
                     compose_service="api", variables={"API_VERSION": "missing"}, return_state=True, **FAST)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, RemoteCommandFailed) and "manifest unknown" in str(error) and "exited 1" in str(error)
    assert (project / ".env").read_text() == ENV
    assert sshd.containers()["app"]["api"]["image"] == "registry/app:v1.2.0"


def test_blue_green_compose_bad_nginx_config_is_put_back(sshd, project, colours, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.ssh import RemoteCommandFailed

    nginx, blue = colours["nginx"], colours["blue"]
    before = nginx.upstream.read_text()
    broken = {**colours["upstreams"], "green": "upstream app { nonsense; }\n"}
    params = {**colours["params"], "upstream_configs": broken}
    state = rollback(ssh=sshd.block(), return_state=True, **params, **FAST)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, RemoteCommandFailed) and "-t" in str(error)  # nginx -t refused it, before any reload
    assert nginx.upstream.read_text() == before and (project / "current_env").read_text() == "blue\n"
    calls = blue.health_calls()
    assert through_nginx(nginx) == 200 and blue.health_calls() == calls + 1
    assert sshd.containers()["app-green"]["web"]["state"] == "exited"
    text, artifacts = run_record(state)
    assert "nginx and" in artifacts["rollback-report"] and "put back to blue" in artifacts["rollback-report"]
