"""The `rollback` runbook's docker compose targets over SSH: a service's version variables pinned
(``compose-ssh``), and nginx switched to the other colour's project (``blue-green-compose``)."""

from __future__ import annotations

from dataclasses import asdict

from prefect.artifacts import create_table_artifact
from prefect.states import State

from blocks.errors import ConfigurationError
from blocks.ssh import SSHHost
from flows._rollback_shared import Options, RollbackResult, approve_then_lock, prove_healthy, report
from tasks.compose import (
    ComposeProject,
    ContainerState,
    check_variables,
    compose_ps,
    env_values,
    pull_and_up,
    reload_nginx,
    set_env_lines,
    stop_project,
    wait_compose_healthy,
)
from tasks.log import run_logger
from tasks.prometheus import CheckResult
from tasks.ssh import read_remote_file, read_remote_file_for_report, write_remote_file
from tasks.undo import UndoStack


def pin_compose(host: SSHHost, project: ComposeProject, service: str, variables: dict[str, str],
                opts: Options) -> RollbackResult | State:
    check_variables(variables)
    original = read_remote_file(host, project.env_path)
    if original is None:
        raise ConfigurationError(f"{host.describe()}: {project.env_path} does not exist; nothing was changed")
    names = list(variables)
    before_values = env_values(original, names)
    before_ps = compose_ps(host, project, [service])
    evidence = [f"host `{host.describe()}`, project `{project.name}` in `{project.directory}`",
                *[f"`{k}`: `{before_values[k]}` -> `{v}`" for k, v in variables.items()],
                "running: " + (_ps_line(before_ps) or "no container")]
    if all(before_values[k] == v for k, v in variables.items()) and before_ps and all(c.ready for c in before_ps):
        report("compose-ssh", "nothing to do: already at the requested version", [], [], [], None, [], evidence)
        return RollbackResult(target="compose-ssh", outcome="unchanged", changed=[],
                              before=[{"variables": before_values}], after=[{"variables": before_values}])
    locked = approve_then_lock(opts, f"## Roll back `{service}` of `{project.name}` on `{host.describe()}`?",
                               [f"- {e}" for e in evidence], host.host,
                               [f"{host.host}:{host.port}/{project.directory}/{project.name}/{service}"])
    if isinstance(locked, State):
        return locked
    results: list[CheckResult] = []
    failure: BaseException | None = None
    undo = UndoStack()

    def put_back() -> None:
        write_remote_file(host, project.env_path, original)
        pull_and_up(host, project, [service])
        wait_compose_healthy(host, project, [service], timeout_seconds=opts.rollout_timeout,
                             interval_seconds=opts.poll)

    with locked:
        try:
            with undo:
                undo.register(f"put {project.env_path} back and recreate {service}", put_back)
                write_remote_file(host, project.env_path, set_env_lines(original, variables))
                pull_and_up(host, project, [service])
                wait_compose_healthy(host, project, [service], timeout_seconds=opts.rollout_timeout,
                                     interval_seconds=opts.poll)
                prove_healthy(opts, results)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
        after_ps = _safe_ps(host, project, [service])
    after_text = read_remote_file_for_report(host, project.env_path, "after the run")
    after_values = env_values(after_text, names) if after_text is not None else {}
    evidence.append("after: " + ", ".join(f"`{k}`=`{after_values.get(k)}`" for k in names)
                    + "; running: " + (_ps_line(after_ps) or "no container"))
    outcome = ("pinned and verified" if failure is None else
               f"FAILED ({failure}); " + ("the env file and service were put back" if undo.whole
                                          else "putting the env file back FAILED: act now"))
    _compose_table(names, before_values, after_values, before_ps, after_ps)
    report("compose-ssh", outcome, [], [], results, undo, [], evidence)
    if failure is not None:
        raise failure
    return RollbackResult(target="compose-ssh", outcome="pinned", changed=[f"{project.name}/{service}"],
                          before=[{"variables": before_values, "containers": [asdict(c) for c in before_ps]}],
                          after=[{"variables": after_values, "containers": [asdict(c) for c in after_ps]}],
                          checks=[asdict(r) for r in results])


def switch_compose(host: SSHHost, directory: str, pattern: str, env_file: str, colours: list[str],
                   colour_file: str, upstream_file: str, upstream_configs: dict[str, str], nginx: list[str],
                   opts: Options) -> RollbackResult | State:
    if "{colour}" not in pattern:
        raise ConfigurationError(f"compose_project {pattern!r} must contain {{colour}} for blue-green-compose")
    text = read_remote_file(host, colour_file)
    current = (text or "").strip()
    if current not in colours:
        raise ConfigurationError(f"{host.describe()}: {colour_file} says {current!r}, not one of {colours}; "
                                 "nothing was changed")
    other = colours[1] if current == colours[0] else colours[0]
    old_upstream = read_remote_file(host, upstream_file)
    if old_upstream is None:
        raise ConfigurationError(f"{host.describe()}: {upstream_file} does not exist; nothing was changed")
    live, standby = (ComposeProject(directory, pattern.format(colour=c), env_file) for c in (current, other))
    live_ps = compose_ps(host, live)
    standby_ps = compose_ps(host, standby)
    evidence = [f"host `{host.describe()}`: `{colour_file}` says {current}",
                f"{current} (`{live.name}`): {_ps_line(live_ps) or 'no containers'}",
                f"{other} (`{standby.name}`): {_ps_line(standby_ps) or 'no containers'}"]
    locked = approve_then_lock(opts, f"## Switch nginx on `{host.describe()}` from {current} to {other}?",
                               [f"- {e}" for e in evidence], host.host, [f"{host.host}:{host.port}/{upstream_file}"])
    if isinstance(locked, State):
        return locked
    results: list[CheckResult] = []
    failure: BaseException | None = None
    undo = UndoStack()
    was_running = bool(standby_ps) and all(c.state == "running" for c in standby_ps)
    with locked:
        try:
            with undo:
                if not was_running:
                    undo.register(f"stop {standby.name} again", lambda: stop_project(host, standby))
                pull_and_up(host, standby)
                wait_compose_healthy(host, standby, timeout_seconds=opts.rollout_timeout, interval_seconds=opts.poll)
                evidence.append(f"{other} healthy: {_ps_line(compose_ps(host, standby))}")
                undo.register(f"put {upstream_file} back and reload nginx", lambda: (
                    write_remote_file(host, upstream_file, old_upstream), reload_nginx(host, nginx)))
                write_remote_file(host, upstream_file, upstream_configs[other])
                reload_nginx(host, nginx)
                undo.register(f"put {colour_file} back ({current})",
                              lambda: write_remote_file(host, colour_file, text or ""))
                write_remote_file(host, colour_file, f"{other}\n")
                evidence.append(f"nginx switched to {other}; {live.name} left running")
                prove_healthy(opts, results)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
    outcome = (f"switched {current} -> {other} and verified" if failure is None else
               f"FAILED ({failure}); " + (f"nginx and {colour_file} put back to {current}" if undo.whole
                                          else "putting the switch back FAILED: act now"))
    final = read_remote_file_for_report(host, colour_file, "after the run")
    evidence.append(f"`{colour_file}` now says {(final or '?').strip()}")
    create_table_artifact([{"what": colour_file, "before": current, "after": (final or "?").strip()},
                           {"what": live.name, "before": _ps_line(live_ps), "after": _ps_line(_safe_ps(host, live))},
                           {"what": standby.name, "before": _ps_line(standby_ps),
                            "after": _ps_line(_safe_ps(host, standby))}],
                          key="rollback-after", description="Colours before and after the switch")
    report("blue-green-compose", outcome, [], [], results, undo, [], evidence)
    if failure is not None:
        raise failure
    return RollbackResult(target="blue-green-compose", outcome=f"switched to {other}", changed=[upstream_file],
                          before=[{"colour": current}], after=[{"colour": other}],
                          checks=[asdict(r) for r in results])


def _ps_line(states: list[ContainerState]) -> str:
    return ", ".join(f"{c.service}={c.image} ({c.state}{'/' + c.health if c.health else ''})" for c in states)


def _safe_ps(host: SSHHost, project: ComposeProject, services: list[str] | None = None) -> list[ContainerState]:
    try:
        return compose_ps(host, project, services)
    except Exception as exc:  # noqa: BLE001 - the report is written even when the host is gone
        run_logger().error("could not read the containers of %s after the run: %s", project.name, exc)
        return []


def _compose_table(names: list[str], before: dict[str, str | None], after: dict[str, str | None],
                   before_ps: list[ContainerState], after_ps: list[ContainerState]) -> None:
    rows = [{"what": k, "before": before.get(k), "after": after.get(k)} for k in names]
    rows.append({"what": "containers", "before": _ps_line(before_ps), "after": _ps_line(after_ps)})
    create_table_artifact(rows, key="rollback-after", description="Compose service before and after the rollback")
