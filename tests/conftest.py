"""Real services for the tests, started on loopback only when a test asks for them.

Nothing here is autouse: a test of pure code starts no server and no Prefect API. A missing binary
(initdb, redis-server, weed) is a fixture error that says what to install, never a skip.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest

from deployments.sandbox import SeaweedS3
from tasks.process import stop_process
from tasks.scratch import ScratchPostgres
from tasks.scratch_redis import ScratchRedis
from tests.faults import FaultyProxy

S3_BUCKET = "runbooks-test"


@pytest.fixture(scope="session")
def pg() -> Iterator[ScratchPostgres]:
    """One PostgreSQL cluster for the session (fsync on: it holds the source data of backups)."""
    with ScratchPostgres(password=secrets.token_urlsafe(16)) as server:
        yield server


@pytest.fixture
def fresh_pg() -> Iterator[ScratchPostgres]:
    """A new, empty cluster per test: a restore target (fsync off)."""
    with ScratchPostgres(password=secrets.token_urlsafe(16), fast=True) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ScratchRedis]:
    """One password-protected redis-server for the session."""
    with ScratchRedis(password=secrets.token_urlsafe(16)) as server:
        yield server


@pytest.fixture
def scratch_redis() -> Iterator[ScratchRedis]:
    """A new, empty password-protected redis-server per test: a restore target."""
    with ScratchRedis(password=secrets.token_urlsafe(16)) as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 endpoint with the bucket ``s3.bucket`` (~3.5 s to start, ~3 s to stop)."""
    with SeaweedS3(bucket=S3_BUCKET) as server:
        yield server


@pytest.fixture
def faulty_proxy() -> Iterator[Callable[[str, int], FaultyProxy]]:
    """Factory: ``faulty_proxy(host, port)`` gives a started proxy, stopped at the end of the test."""
    proxies: list[FaultyProxy] = []

    def make(host: str, port: int) -> FaultyProxy:
        proxy = FaultyProxy(host, port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API and database, entered once per session by the first test that asks."""
    # Imported here: importing Prefect alone costs seconds that tests of pure code must not pay.
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ------------------------------------------------------------------------------------ WAL archiving (PITR)


@pytest.fixture(scope="session")
def wal_python() -> Iterator[str]:
    """A Python the ``postgres`` OS user can run with this project importable: archive_command runs as it."""
    import shutil
    import tempfile
    from pathlib import Path

    from tasks.scratch import interpreter_for

    base = Path(tempfile.mkdtemp(prefix="runbooks-wal-python-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield interpreter_for(ScratchPostgres.OS_USER, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


class WalArchive:
    """A WAL archive in the sandbox S3 under its own prefix, and the commands PostgreSQL runs for it.

    The store URL and credentials sit in a 0600 env file owned by ``postgres`` (never in the commands).
    """

    def __init__(self, s3: SeaweedS3, python: str, prefix: str, directory: str, extra: dict[str, str]) -> None:
        import os
        import shutil
        from pathlib import Path

        from blocks.backends import make_s3_store

        self._s3 = s3
        self.prefix = prefix
        self.store_url = f"s3://{s3.bucket}/{prefix}?endpoint_url={s3.endpoint_url}&region={s3.region}"
        self.config_file = str(Path(directory) / f"{prefix.replace('/', '_')}.env")
        lines = {"RUNBOOKS_WAL_STORE": self.store_url, "AWS_ACCESS_KEY_ID": s3.access_key,
                 "AWS_SECRET_ACCESS_KEY": s3.secret_key, "RUNBOOKS_WAL_IDLE_EXIT": "20", **extra}
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(f"{k}={v}\n" for k, v in lines.items()))
        shutil.chown(self.config_file, ScratchPostgres.OS_USER, ScratchPostgres.OS_USER)
        self.python = python
        self.command = f"{python} -m deployments.cli"
        self.archive_command = f"{self.command} wal-push --config {self.config_file} %p"
        self.restore_command = f"{self.command} wal-fetch --config {self.config_file} %f %p"
        self.client = make_s3_store(
            bucket=str(s3.bucket), prefix=prefix, description=f"s3://{s3.bucket}/{prefix}",
            endpoint_url=s3.endpoint_url, region=s3.region, access_key_id=s3.access_key,
            secret_access_key=s3.secret_key, session_token=None, sse="", kms_key_id=None, storage_class=None,
            part_size=8 * 2**20, max_concurrency=4)

    def settings(self, **more: str) -> dict[str, str]:
        """postgresql.conf settings of a cluster archiving here."""
        return {"wal_level": "replica", "archive_mode": "on", "archive_command": self.archive_command,
                "max_wal_senders": "4", "lc_messages": "C", **more}

    def block(self):  # -> BackupStore, imported below: Prefect must not load for tests of pure code
        """The same store as a BackupStore Block (base backups and the WAL archive share it)."""
        from pydantic import SecretStr

        from blocks.store import BackupStore

        s3 = self._s3
        return BackupStore(backend="s3", bucket=s3.bucket, prefix=self.prefix, endpoint_url=s3.endpoint_url,
                           region=s3.region, access_key_id=SecretStr(s3.access_key),
                           secret_access_key=SecretStr(s3.secret_key))

    def wal_names(self) -> set[str]:
        from tasks.wal import name_of_key

        return {n for n in (name_of_key(o.key) for o in self.client.list("wal/")) if n}


@pytest.fixture(scope="session")
def wal_archive(s3: SeaweedS3, wal_python: str) -> Iterator[Callable[..., WalArchive]]:
    """Factory: ``wal_archive(**extra_settings)`` gives a fresh WAL archive (its own S3 prefix)."""
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="runbooks-wal-config-", dir="/tmp")
    shutil.chown(directory, ScratchPostgres.OS_USER, ScratchPostgres.OS_USER)

    def make(**extra: str) -> WalArchive:
        return WalArchive(s3, wal_python, f"pitr-{secrets.token_hex(4)}", directory, extra)

    yield make
    shutil.rmtree(directory, ignore_errors=True)


# -- monitoring daemons (Debian's prometheus, prometheus-alertmanager, prometheus-pushgateway) -------------

import subprocess  # noqa: E402 - appended section: its own imports
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402


class MonitoringDaemon:
    """A Prometheus-family binary on a free loopback port in its own temp dir; ready when ``ready_path`` is 200."""

    def __init__(self, binary: str, args: Callable[[int, str], list[str]], ready_path: str = "/-/ready",
                 ready_headers: dict[str, str] | None = None) -> None:
        import shutil

        found = shutil.which(binary)
        if found is None:
            raise RuntimeError(f"{binary} not found: apt-get install -y prometheus prometheus-alertmanager "
                               "prometheus-pushgateway (make system-deps does)")
        self.binary = found
        self._args = args
        self.ready_path = ready_path
        self.ready_headers = ready_headers or {}  # e.g. basic auth, when the daemon runs with a web config
        self.port = 0
        self.dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MonitoringDaemon:
        import tempfile

        from tasks.scratch import free_port

        self.dir = tempfile.mkdtemp(prefix=f"{Path(self.binary).name}-")
        self.port = free_port()
        log = open(Path(self.dir) / "daemon.log", "wb")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen([self.binary, *self._args(self.port, self.dir)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                ready = urllib.request.Request(self.url + self.ready_path, headers=self.ready_headers)
                with urllib.request.urlopen(ready, timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.binary} not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((Path(self.dir) / "daemon.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        import shutil

        if self.proc is not None:
            stop_process(self.proc, timeout=10)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def pushgateway_daemon() -> MonitoringDaemon:
    # Debian's build persists to /var/lib/prometheus/pushgateway.data unless told otherwise: memory only here.
    return MonitoringDaemon("prometheus-pushgateway", lambda port, _dir: [
        f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="])


@pytest.fixture(scope="session")
def pushgateway() -> Iterator[MonitoringDaemon]:
    """A Pushgateway (no persistence) on loopback."""
    daemon = pushgateway_daemon().start()
    yield daemon
    daemon.stop()


# -- secrets never leave: a scan of every e2e test's logs, artifacts and exception texts ------------------

import logging  # noqa: E402
import re  # noqa: E402
from typing import Any  # noqa: E402

_SECRET_NAME = re.compile(r"(password|secret|token|auth_string|_key$|^key$|_pw$)", re.IGNORECASE)
_NOT_SECRET_NAMES = {"access_key", "access_key_id", "kms_key_id", "idempotency_key", "pause_key", "sort_key"}
MIN_SECRET_LENGTH = 8  # shorter values would match by chance


def _secret_values(value: Any, found: set[str], seen: set[int], depth: int = 0, name: str = "") -> None:
    """Walk a fixture value (a server, a Block, a dataclass of them) for the secrets it holds."""
    from pydantic import SecretBytes, SecretStr

    if depth > 4 or id(value) in seen or value is None:
        return
    seen.add(id(value))
    if isinstance(value, SecretStr | SecretBytes):
        secret = value.get_secret_value()
        text = secret.decode(errors="replace") if isinstance(secret, bytes) else secret
        found.update(line.strip() for line in text.splitlines() if len(line.strip()) >= MIN_SECRET_LENGTH
                     and "-----" not in line)  # a PEM key: each base64 line is a secret
        return
    if isinstance(value, str):
        if name and _SECRET_NAME.search(name) and name.lstrip("_") not in _NOT_SECRET_NAMES \
                and len(value) >= MIN_SECRET_LENGTH and not value.startswith("/"):  # a key's path is no secret
            found.add(value)
        return
    if isinstance(value, int | float | bool | bytes | Path) or callable(value) and not hasattr(value, "__dict__"):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _secret_values(item, found, seen, depth + 1, str(key))
        return
    if isinstance(value, list | tuple | set):
        for item in value:
            _secret_values(item, found, seen, depth + 1, name)
        return
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict) and type(value).__module__.startswith(
            ("tests", "test_", "tasks", "blocks", "deployments", "flows")):
        for key, item in list(fields.items()):
            _secret_values(item, found, seen, depth + 1, key)
        for prop in ("password", "secret_key", "token"):  # properties of the scratch servers
            if prop not in fields and isinstance(getattr(type(value), prop, None), property):
                _secret_values(getattr(value, prop, None), found, seen, depth + 1, prop)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is still scanned as its template
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.texts.append(f"log {record.name}: {text}")


def _api_texts(since: Any) -> list[str]:
    """Logs, artifacts and state messages of the flow runs that started since ``since`` on the current API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterStartTime,
        LogFilter,
        LogFilterFlowRunId,
    )

    texts: list[str] = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
                                     limit=200)
        ids = [run.id for run in runs]
        texts += [f"state of run {run.name}: {run.state.message}" for run in runs if run.state and run.state.message]
        if ids:
            for offset in range(0, 10_000, 200):
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                                        limit=200, offset=offset)
                texts += [f"api log {log.name}: {log.message}" for log in logs]
                if len(logs) < 200:
                    break
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)), limit=200)
            texts += [f"artifact {a.key}: {a.data} {a.description or ''}" for a in artifacts]
    return texts


@pytest.fixture(autouse=True)
def secret_scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests marked e2e: every log record, artifact, run state message and exception text (raised, or
    caught by pytest.raises) produced during the test must not contain a secret it configured: the
    passwords, tokens and keys held by its fixtures (scratch servers, Blocks, stacks) and its module's
    TOKEN/PASSWORD constants. Subprocess logs under a fixture's ``home`` directory are read too."""
    if request.node.get_closest_marker("e2e") is None:
        yield
        return
    from datetime import UTC, datetime, timedelta

    from _pytest._code.code import ExceptionInfo

    started = datetime.now(UTC) - timedelta(seconds=1)
    recorder = _Recorder()
    loggers = [logging.getLogger(n) for n in ("", "prefect", "prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(recorder)
    root_level = loggers[0].level
    loggers[0].setLevel(min(root_level, logging.INFO))  # the INFO lines tasks log outside a flow run too
    caught: list[str] = []
    fill = ExceptionInfo.fill_unfilled

    def fill_and_record(self: Any, exc_info: Any) -> None:
        caught.append(f"exception caught by pytest.raises: {type(exc_info[1]).__name__}: {exc_info[1]}")
        fill(self, exc_info)

    monkeypatch.setattr(ExceptionInfo, "fill_unfilled", fill_and_record)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(recorder)
        loggers[0].setLevel(root_level)
    secrets_found = fixture_secrets(request.node.funcargs)
    module = getattr(request, "module", None)
    for name, value in vars(module).items() if module else ():
        if isinstance(value, str) and name.isupper() and _SECRET_NAME.search(name) \
                and len(value) >= MIN_SECRET_LENGTH:
            secrets_found.add(value)
    texts = recorder.texts + caught
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and getattr(report, "exception_text", None):
        texts.append("test failure: " + report.exception_text)
    if "prefect_harness" in request.fixturenames:
        texts += _api_texts(started)
    for value in request.node.funcargs.values():
        home = getattr(value, "home", None)
        if isinstance(home, Path) and home.is_dir():
            texts += [f"file {p}: {p.read_text(errors='replace')}" for p in home.rglob("*.log")
                      if p.is_file() and p.stat().st_size < 50 * 2**20]
    leaks = find_leaks(secrets_found, texts)
    assert not leaks, f"{len(leaks)} secret(s) of the test leaked into logs/artifacts/exceptions:\n" + "\n".join(
        leaks[:20])


def find_leaks(secrets: set[str], texts: list[str]) -> list[str]:
    """Where a secret occurs in a text, shown without the secret (its first 3 characters and its length, and
    the text around it with the secret replaced by <SECRET>)."""
    leaks = set()
    for secret in secrets:
        for text in texts:
            at = text.find(secret)
            if at >= 0:
                around = text[max(0, at - 80):at + len(secret) + 80].replace(secret, "<SECRET>")
                leaks.add(f"{secret[:3]}... ({len(secret)} chars) in {around!r}")
    return sorted(leaks)


def fixture_secrets(values: dict[str, Any]) -> set[str]:
    """The secrets held by fixture values (by name: the fixture's or the attribute's)."""
    found: set[str] = set()
    seen: set[int] = set()
    for name, value in values.items():
        _secret_values(value, found, seen, 0, name)
    return found


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep the call phase's report and exception text on the item, for ``secret_scan``."""
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
        if call.excinfo is not None:
            report.exception_text = f"{call.excinfo.typename}: {call.excinfo.value}"  # type: ignore[attr-defined]
    return report


# ---------------------------------------------------------------------------------------- deselected suites
# No test is skipped: a suite that needs what this machine lacks is deselected, and the summary says why and
# how to run it. `-m` (pyproject addopts: "not kind and not weaviate") deselects the first two.

import os  # noqa: E402

WHY_DESELECTED = {
    "kind": "need a real Kubernetes cluster: `KUBECONFIG=... make test-kind`",
    "weaviate": "need a real Weaviate: `WEAVIATE_URL=... make test-weaviate`",
    "root": "need root (a cluster handed to the postgres OS user): run the suite as root, as CI does",
}
_deselected: dict[str, int] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    rooted = [item for item in items if item.get_closest_marker("root")]
    if rooted:
        items[:] = [item for item in items if not item.get_closest_marker("root")]
        config.hook.pytest_deselected(items=rooted)


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        marker = next((m for m in WHY_DESELECTED if item.get_closest_marker(m)), "other")
        _deselected[marker] = _deselected.get(marker, 0) + 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for marker, count in sorted(_deselected.items()):
        why = WHY_DESELECTED.get(marker, "not selected by -m/-k")
        terminalreporter.write_line(f"DESELECTED {count} {marker} test(s): {why}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With RUNBOOKS_NO_SKIP=1 (`make test`), a skipped test fails the run: here every test runs or is deselected."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if os.environ.get("RUNBOOKS_NO_SKIP") == "1" and skipped and exitstatus == 0:
        session.exitstatus = 1
        if reporter is not None:
            reporter.write_line(f"FAILED: {skipped} test(s) skipped; `make test` runs every test it selects")
