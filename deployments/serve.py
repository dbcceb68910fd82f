"""`runbooks serve` (every runbook of the registry, served by this process) and `runbooks up` (the stack).

`runbooks serve` builds one deployment per registry entry whose flow exists (schedules in
$RUNBOOKS_TIMEZONE, default parameters, tags, a concurrency limit) and serves them with Prefect's
``serve()``, polling every ``--poll`` seconds so a click in the UI or an alert starts within seconds.
Default parameters that point at saved Blocks are sent by block document id (what the run form's block picker
shows); those whose Block is not saved yet are left out, with one log line each, and filled in once it is saved.
The server checks each run's parameters against the flow's schema before the run is created.
Every Block type of `blocks` is registered first, so the Blocks catalog offers all of them.

`runbooks up` is the whole local stack in one command: a Prefect server on SQLite (UI included) under
``--home``, `runbooks serve` and the Alertmanager bridge, each its own process; Ctrl-C (or SIGTERM)
stops them in reverse order and waits for each.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deployments.registry import Discovered, block_slug, discover, schedule_timezone
from tasks.process import stop_process

log = logging.getLogger("runbooks.serve")

DEFAULT_POLL_SECONDS = 1.0
DEFAULT_HOME = Path.home() / ".runbooks"
SERVER_START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0


# -- serve -------------------------------------------------------------------------------------------------


def saved_block_ids(slugs: set[str]) -> dict[str, str]:
    """``{slug: block document id}`` for those of ``slugs`` (``<block-type-slug>/<name>``) saved on the server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = {}
    with get_client(sync_client=True) as client:
        for slug in sorted(slugs):
            type_slug, _, name = slug.partition("/")
            try:
                document = client.read_block_document_by_name(name=name, block_type_slug=type_slug)
            except ObjectNotFound:
                continue
            found[slug] = str(document.id)
    return found


def register_block_types() -> list[str]:
    """Register every Block type of ``blocks`` with the server, so the Blocks catalog offers each (App Endpoint
    included) before any is saved; a type registered before is updated to its current schema. Returns the slugs."""
    import blocks

    slugs = []
    for name in blocks.BLOCK_TYPES:
        block_type = getattr(blocks, name)
        block_type.register_type_and_schema()
        slugs.append(block_type.get_block_type_slug())
    return slugs


def usable_parameters(parameters: Mapping[str, Any], blocks: Mapping[str, str], deployment: str) -> dict[str, Any]:
    """Default parameters with each saved-Block reference by id, without those whose Block is not saved.

    By id, because the run form's block picker shows a default only as ``{"$ref": {"block_document_id": ...}}``
    (a reference by slug works for runs, but the picker shows it empty). A Block that is not saved would fail
    the run: that default is left out until it is saved (:func:`fill_block_defaults`)."""
    kept = {}
    for name, value in parameters.items():
        slug = block_slug(value)
        if slug is not None:
            if slug not in blocks:
                log.info("%s: no default for %r yet: block %s is not saved (it is filled in once saved; or fill "
                         "the field per run)", deployment, name, slug)
                continue
            value = {"$ref": {"block_document_id": blocks[slug]}}
        kept[name] = value
    return kept


def fill_block_defaults(found: Sequence[Discovered], missing: set[str], every: float = 5.0,
                        stop: threading.Event | None = None) -> None:
    """Until every Block in ``missing`` is saved: each one saved since serve started becomes its deployments'
    default (the deployment's parameters are updated through the API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    stop = stop or threading.Event()
    while missing and not stop.wait(every):
        try:
            saved = saved_block_ids(missing)
            if not saved:
                continue
            with get_client(sync_client=True) as client:
                for item in found:
                    rb = item.runbook
                    new = {k: {"$ref": {"block_document_id": saved[s]}} for k, v in rb.parameters.items()
                           if (s := block_slug(v)) in saved}
                    if not new:
                        continue
                    try:
                        deployment = client.read_deployment_by_name(rb.name)
                    except ObjectNotFound:
                        continue  # not applied yet: the runner applies it with the Block's id
                    client.update_deployment(deployment.id, DeploymentUpdate(
                        parameters={**deployment.parameters, **new}))
                    log.info("%s: default %s now the saved block(s) %s", rb.name, ", ".join(sorted(new)),
                             ", ".join(sorted(block_slug(rb.parameters[k]) or "" for k in new)))
            missing -= set(saved)
        except Exception as exc:  # noqa: BLE001 - an unreachable API now is retried on the next round
            log.warning("filling in block defaults failed (retried in %.0f s): %s", every, exc)


def deployment_options(item: Discovered, timezone: str, blocks: Mapping[str, str]) -> dict[str, Any]:
    """How a discovered runbook is deployed: name, schedules in ``timezone``, defaults, tags, concurrency."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    rb = item.runbook
    return {
        "name": rb.deployment,
        "description": rb.description,
        "tags": rb.all_tags,
        "parameters": usable_parameters(rb.parameters, blocks, rb.name),
        "schedules": [Cron(cron, timezone=timezone, parameters=dict(rb.schedule_parameters) or None)
                      for cron in rb.schedules],
        "concurrency_limit": rb.concurrency_limit,
        "entrypoint_type": EntrypointType.MODULE_PATH,  # importable by module path, so any cwd works
        # Off only while the deployment is created: Prefect 3.8.8 checks a new deployment's defaults with a
        # validator that knows no Block references. serve_flows switches it on right after (enforce_schemas).
        "enforce_parameter_schema": False,
    }


def enforce_schemas(deployment_ids: Sequence[Any]) -> None:
    """The server checks every run's parameters against the flow's schema before the run is created.

    A form's mistake (``compression_level=40``) is refused with the field and the reason; the form's
    "Validate parameters" box starts ticked (it follows the deployment); saved-Block references pass
    (blocks/_reference.py)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        for deployment_id in deployment_ids:
            client.update_deployment(deployment_id, DeploymentUpdate(enforce_parameter_schema=True))


def _runner_class() -> type:
    from prefect.runner import Runner

    class QuietStopRunner(Runner):
        """Prefect's Runner, stopped on SIGTERM by awaiting its ``astop()`` on the runner's loop.

        Prefect 3.8.8's own handler calls ``stop()`` from inside the running loop, where it dispatches to
        ``astop()`` and returns a coroutine nobody awaits ("coroutine 'Runner.astop' was never awaited"),
        then exits the process mid-loop."""

        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            import asyncio

            self._logger.info("SIGTERM received, shutting down")
            if not self.started:
                raise KeyboardInterrupt  # not polling yet: unwound like Ctrl-C
            loop = asyncio.get_event_loop()  # the runner's, running in this (the main) thread

            def stop() -> None:
                self._stopping = loop.create_task(self.astop())

            loop.call_soon_threadsafe(stop)  # wakes the loop

    return QuietStopRunner


def serve_flows(flows: Sequence[tuple[Any, dict[str, Any]]], *, poll: float, limit: int | None,
                start_method: str = "forkserver") -> None:
    """Serve each ``(flow, deployment options)`` with one runner until SIGINT/SIGTERM.

    What ``prefect.serve()`` does, but the runner is handed the flow objects (``Runner.add_flow``, not
    ``add_deployment``): a run then starts as a subprocess given the flow (a fork of the forkserver, see
    deployments/forkserver.py), not as `python -m prefect.engine` importing Prefect and the flow again. On a
    Prefect version this was not checked against, Prefect's own path.
    """
    import asyncio

    from prefect.exceptions import TerminationSignal

    from deployments import forkserver

    runner = _runner_class()(query_seconds=poll, limit=limit)
    if not forkserver.pickle_flows_by_reference():
        # Pickled by value, a runbook's Annotated parameters would not validate: Prefect's own serve() path.
        log.warning("runs start as `python -m prefect.engine` (handing flows to the runner is not checked for this "
                    "Prefect version)")
        ids = [runner.add_deployment(flow.to_deployment(**options)) for flow, options in flows]
    else:
        if start_method == "forkserver" and not forkserver.install(sorted({f.fn.__module__ for f, _ in flows})):
            log.warning("flow runs start with Prefect's spawn (forkserver start not checked for this Prefect)")
        ids = [runner.add_flow(flow, **options) for flow, options in flows]
    enforce_schemas(ids)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as exc:
        log.info("received %s, shutting down", type(exc).__name__)


def serve_main(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("runbooks serve: PREFECT_API_URL is not set: point it at the Prefect server "
              "(or use `runbooks up` for a local one)", file=sys.stderr)
        return 2
    timezone = schedule_timezone()
    found, skipped = discover(only=args.only or None)
    if args.strict and skipped:
        print("runbooks serve: --strict and some runbooks are missing: "
              + "; ".join(f"{s.runbook.name}: {s.reason}" for s in skipped), file=sys.stderr)
        return 2
    if not found:
        print("runbooks serve: no runbook to serve", file=sys.stderr)
        return 2
    log.info("block types registered: %s", ", ".join(register_block_types()))
    slugs = {s for item in found for v in item.runbook.parameters.values() if (s := block_slug(v))}
    blocks = saved_block_ids(slugs)
    if slugs - set(blocks):
        threading.Thread(target=fill_block_defaults, args=(found, slugs - set(blocks)), name="block-defaults",
                         daemon=True).start()
    log.info("serving %d runbooks (schedules in %s, poll every %.1f s, runs start by %s): %s", len(found), timezone,
             args.poll, args.start_method, ", ".join(item.runbook.name for item in found))
    serve_flows([(item.flow, deployment_options(item, timezone, blocks)) for item in found], poll=args.poll,
                limit=args.limit, start_method=args.start_method)
    return 0


# -- up ----------------------------------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Callable[[], None] | None:
    """A call that makes the calling process get SIGTERM when its parent dies (Linux prctl PR_SET_PDEATHSIG), so
    children get SIGTERM if `runbooks up` dies without cleaning up; None where libc has no prctl.

    Resolved here, in the parent: the child between fork and exec (``preexec_fn``) must not import or dlopen.
    Another thread of the parent may hold that module's import lock or the loader's lock at the fork (the
    sandbox starts its services in a thread, importing psycopg, which imports ctypes), and the child then
    waits for a lock nobody will release, while ``Popen`` waits for the child's exec without a timeout."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = int(signal.SIGTERM)
    return lambda: prctl(_PR_SET_PDEATHSIG, sigterm)


class ChildProcesses:
    """Child processes started in order and stopped in reverse; each in its own process group."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.death_signal = _parent_death_signal()

    def start(self, name: str, argv: list[str], env: Mapping[str, str], *, nice: int = 0) -> subprocess.Popen[bytes]:
        death_signal = self.death_signal

        def prepare() -> None:  # runs in the child before exec: no imports, no dlopen (see _parent_death_signal)
            if death_signal is not None:
                death_signal()
            if nice:
                os.nice(nice)

        logfile = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
        proc = subprocess.Popen(argv, env=dict(env), stdout=logfile, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=prepare)  # noqa: PLW1509
        logfile.close()
        self.children.append((name, proc))
        log.info("started %s (pid %d), log %s", name, proc.pid, self.home / f"{name}.log")
        return proc

    def exited(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def stop(self) -> None:
        for name, proc in reversed(self.children):
            if stop_process(proc, timeout=STOP_TIMEOUT, group=True):
                log.warning("%s did not stop within %.0f s: killed", name, STOP_TIMEOUT)
            log.info("%s stopped (exit %s)", name, proc.returncode)


def wait_for_api(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310 - loopback URL we built
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"prefect server did not answer {url}/health within {timeout:.0f} s")


TOKEN_ENV = "RUNBOOKS_WEBHOOK_TOKEN"  # (deployments.webhook.TOKEN_ENV; that module is not imported here)


def bridge_token_source(home: Path, given: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """The bridge's one bearer token source: ``(token file or None, what to tell the operator)``.

    ``--token-file`` or ``$RUNBOOKS_WEBHOOK_TOKEN``, never both; neither: a token generated once in
    ``home/webhook-token`` (0600)."""
    if given and environ.get(TOKEN_ENV):
        raise ValueError(f"both --token-file {given} and ${TOKEN_ENV} are set: the bridge takes exactly one "
                         "bearer token; unset one")
    if given:
        return given, f"bearer token in {given}"
    if environ.get(TOKEN_ENV):
        return None, f"bearer token from ${TOKEN_ENV}"
    path = home / "webhook-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    return str(path), f"bearer token in {path} (generated)"


API_AUTH_SERVER_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # the server checks it (HTTP basic auth)
API_AUTH_CLIENT_ENV = "PREFECT_API_AUTH_STRING"  # every client sends it
MIN_AUTH_STRING = 16


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_auth_string(host: str, auth_file: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """The Prefect API's basic-auth string (``user:password``) and what to tell the operator.

    From ``--api-auth-file`` or $PREFECT_SERVER_API_AUTH_STRING / $PREFECT_API_AUTH_STRING. Bound to anything
    but loopback, the API refuses to start without one: whoever reaches an open API can start any runbook."""
    if auth_file:
        from deployments.bridge.auth import read_secret_file

        value, source = read_secret_file(auth_file), auth_file
    else:
        name = next((n for n in (API_AUTH_SERVER_ENV, API_AUTH_CLIENT_ENV) if environ.get(n)), None)
        value, source = (environ[name], f"${name}") if name else (None, "")
    if value is None:
        if not is_loopback(host):
            raise ValueError(f"the Prefect API would listen on {host} without authentication: anyone who reaches "
                             f"it can start any runbook. Give --api-auth-file FILE (user:password) or set "
                             f"${API_AUTH_SERVER_ENV}, or bind to 127.0.0.1")
        return None, "API auth off (bound to loopback only)"
    if len(value) < MIN_AUTH_STRING or ":" not in value:
        raise ValueError(f"the API auth string from {source} must be user:password, at least {MIN_AUTH_STRING} "
                         "characters")
    return value, f"API basic auth on (from {source})"


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def up_main(args: argparse.Namespace, *, before_serve: Callable[[Mapping[str, str]], None] | None = None,
            on_ready: Callable[[], None] | None = None) -> int:
    """The stack until Ctrl-C/SIGTERM. ``before_serve(env)`` runs once the server answers and before the runbooks
    are served (`runbooks sandbox` saves its Blocks there); ``on_ready()`` once everything has started."""
    home = Path(args.home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    api_url = f"http://{args.host}:{args.port}/api"
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(home / "prefect"))
    env.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    env["PREFECT_API_URL"] = api_url
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.setdefault("PREFECT_UI_API_URL", api_url)
    try:
        auth, auth_note = api_auth_string(args.host, args.api_auth_file, env)
        token_file, token_note = bridge_token_source(home, args.token_file or env.get("RUNBOOKS_WEBHOOK_TOKEN_FILE"),
                                                     env)
    except (ValueError, OSError) as exc:
        print(f"runbooks up: {exc}", file=sys.stderr)
        return 2
    env.pop("RUNBOOKS_WEBHOOK_TOKEN_FILE", None)  # the bridge gets its one source from the lines below
    for name in (API_AUTH_SERVER_ENV, API_AUTH_CLIENT_ENV):
        env.pop(name, None)
    if auth is not None:  # the server checks it; serve, the bridge and flow runs send it (never in argv)
        env[API_AUTH_SERVER_ENV] = env[API_AUTH_CLIENT_ENV] = auth
    runbooks = [sys.executable, "-m", "deployments.cli"]

    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    children = ChildProcesses(home)
    started = time.monotonic()
    try:
        # --server-nice > 0: the server yields the CPU to the bridge when a burst of alerts makes it create runs.
        # Off by default: it delays alert -> Running, and the bridge gains no clear margin from it.
        server = children.start("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                                   args.host, "--port", str(args.port)], env, nice=args.server_nice)
        wait_for_api(api_url, server, SERVER_START_TIMEOUT)
        log.info("Prefect server and UI on http://%s:%d (%.1f s)", args.host, args.port, time.monotonic() - started)
        if before_serve is not None:
            before_serve(env)
        serve_argv = [*runbooks, "serve", "--poll", str(args.poll), "--start-method", args.start_method]
        for name in args.only or []:
            serve_argv += ["--only", name]
        children.start("serve", serve_argv, env)
        webhook_argv = [*runbooks, "webhook", "--host", args.webhook_host, "--port", str(args.webhook_port)]
        if token_file is not None:
            webhook_argv += ["--token-file", token_file]
        if args.routes:
            webhook_argv += ["--routes", args.routes]
        for flag, value in (("--tls-cert", args.webhook_tls_cert), ("--tls-key", args.webhook_tls_key),
                            ("--tls-client-ca", args.webhook_tls_client_ca)):
            if value:
                webhook_argv += [flag, value]  # file names, not secrets
        children.start("webhook", webhook_argv, env)
        scheme = "https" if args.webhook_tls_cert else "http"
        print(f"runbooks up: UI http://{args.host}:{args.port}  bridge "
              f"{scheme}://{args.webhook_host}:{args.webhook_port}/alertmanager ({token_note}); {auth_note};  "
              f"logs in {home}; Ctrl-C stops everything", flush=True)
        if on_ready is not None:
            on_ready()
        while True:
            gone = children.exited()
            if gone:
                log.error("%s exited with %s; stopping the stack (see %s)", gone[0], gone[1],
                          home / f"{gone[0]}.log")
                return 1
            time.sleep(0.5)
    except _Stop as stop:
        log.info("received %s: stopping", stop)
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop()


# -- command line ------------------------------------------------------------------------------------------


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"runbooks {command}")
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL_SECONDS,
                        help="seconds between the runner's checks for runs to start (default 1)")
    parser.add_argument("--only", action="append", help="serve only this runbook (flow or flow/deployment)")
    parser.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver",
                        help="how a flow run's process starts: forked from a process with Prefect and the flows "
                             "imported (default; a run is Running about 2 s sooner), or Prefect's spawn")
    if command == "serve":
        parser.add_argument("--limit", type=int, default=None, help="most flow runs at once (default: no limit)")
        parser.add_argument("--strict", action="store_true", help="fail if a registry runbook is missing")
    else:
        parser.add_argument("--home", default=os.environ.get("RUNBOOKS_STATE_DIR", str(DEFAULT_HOME)),
                            help="state directory: SQLite database, logs, webhook token (default ~/.runbooks)")
        parser.add_argument("--host", default="127.0.0.1", help="Prefect server/UI address")
        parser.add_argument("--port", type=int, default=4200)
        parser.add_argument("--webhook-host", default="127.0.0.1")
        parser.add_argument("--webhook-port", type=int, default=9095)
        parser.add_argument("--webhook-tls-cert", help="the bridge serves HTTPS with this certificate (PEM)")
        parser.add_argument("--webhook-tls-key", help="... and this private key (PEM, 0600)")
        parser.add_argument("--webhook-tls-client-ca", help="the bridge requires client certificates of this CA")
        parser.add_argument("--routes", help="routes file for the bridge (default: the example routes)")
        parser.add_argument("--token-file", help="bearer token for the bridge (default: $RUNBOOKS_WEBHOOK_TOKEN, "
                                                 "else generated in --home)")
        parser.add_argument("--api-auth-file", help="file holding the Prefect API's basic-auth string user:password "
                                                    f"(default ${API_AUTH_SERVER_ENV}); required when --host is not "
                                                    "loopback")
        parser.add_argument("--server-nice", type=int, default=0, choices=range(0, 20), metavar="0-19",
                            help="nice value of the Prefect server: above 0 the bridge answers first when they "
                                 "share the CPU, but runs also start later (default 0)")
    return parser


def main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else "serve"
    args = build_parser(command).parse_args(list(argv)[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runner poll otherwise
    if command == "up":
        return up_main(args)
    return serve_main(args)
