"""The Prefect UI, clicked through in headless Chromium (Debian's) against `runbooks sandbox`.

One sandbox for the module (a real Prefect server and UI, `runbooks serve`, scratch PostgreSQL, Redis and
SeaweedFS S3, Blocks saved by the sandbox). The tests run in order, as an operator would: the Deployments
page, the Blocks catalog and a Block form, `backup` from its run form to Completed with its artifacts (and
the set in the store), `disaster-recovery` to its approval dialog, rejected (the run ends Cancelled, every
table checksum and the Redis keyspace digest as before), and Ctrl-C removing the whole sandbox.

Screenshots of each step go to $RUNBOOKS_SCREENSHOT_DIR (`make screenshots` sets docs/screenshots, the
pictures the docs show), else to the test's temporary directory.
$RUNBOOKS_BROWSER_SANDBOX=/path/sandbox.json attaches to a running sandbox instead of starting one (for
writing tests; the last test, which stops the sandbox, is then skipped with that reason).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.scratch import free_port

pytestmark = pytest.mark.timeout(900)

START_TIMEOUT = 420.0  # the Prefect server alone took 45-52 s to answer while other suites loaded both cores
RUN_TIMEOUT = 240_000  # ms: a run from click to Completed/Paused
PROJECT = Path(__file__).resolve().parent.parent


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        raise RuntimeError("chromium not found: `apt-get install -y chromium` (make system-deps installs it)")
    return found


class Sandbox:
    """A `runbooks sandbox` process and what its sandbox.json says."""

    def __init__(self, about: dict[str, Any], proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
        self.about = about
        self.proc = proc
        self.log = log

    @property
    def ui(self) -> str:
        return str(self.about["ui"])

    def log_tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stacks_and_log_tail(self) -> str:
        """Ask the running sandbox for every thread's stack (SIGUSR1: faulthandler writes it to its log), and
        give the log's tail with it: where a start that hangs is waiting."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGUSR1)  # the sandbox process only: its children have no such handler
            time.sleep(1)
        return self.log_tail(lines=200)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    attach = os.environ.get("RUNBOOKS_BROWSER_SANDBOX")
    if attach:
        yield Sandbox(json.loads(Path(attach).read_text()), None, None)
        return
    base = tmp_path_factory.mktemp("browser-sandbox")
    home, log = base / "home", base / "sandbox.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.cli", "sandbox", "--home", str(home), "--port", str(free_port()),
             "--webhook-port", str(free_port())],
            cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    box = Sandbox({}, proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (home / "sandbox.json").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"runbooks sandbox exited with {proc.returncode}:\n{box.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"runbooks sandbox not ready within {START_TIMEOUT:.0f} s; its threads' stacks "
                                   f"and log:\n{box.stacks_and_log_tail()}")
            time.sleep(1)
        time.sleep(0.2)  # written in one call; let it land
        box.about = json.loads((home / "sandbox.json").read_text())
        yield box
    finally:
        if proc.poll() is None:  # the last test stops it; this is for a failure before that
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("RUNBOOKS_SCREENSHOT_DIR")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def page(sandbox: Sandbox) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--headless=new"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            tab = context.new_page()
            tab.set_default_timeout(60_000)
            # API errors the UI only shows as a toast: printed, so a failing test says what the server answered
            tab.on("response", lambda r: r.status >= 400 and print(
                f"API {r.status} {r.request.method} {r.url}: {r.text()[:500]}"))
            yield tab
        finally:
            browser.close()


@pytest.fixture(scope="module")
def sandbox_api(sandbox: Sandbox) -> Iterator[None]:
    """Prefect settings pointing this process at the sandbox's API (to load its Blocks)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: sandbox.about["api"]}):
        yield


def _snap(page: Any, shots: Path, name: str, *, full_page: bool = False) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=full_page)


def _ui(sandbox: Sandbox, path: str) -> str:
    """A page of the UI a browser opens by default (Prefect 3.8's V2 UI, under /v2)."""
    return f"{sandbox.ui}/v2{path}"


def _open_deployment(page: Any, sandbox: Sandbox, name: str) -> None:
    page.goto(_ui(sandbox, "/deployments"))
    page.get_by_role("link", name=name, exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).first.wait_for()


def _custom_run(page: Any) -> None:
    page.get_by_role("button", name="Run", exact=True).first.click()
    page.get_by_text("Custom run", exact=True).first.click()
    page.get_by_role("button", name="Submit", exact=True).wait_for()


RUN_PAGE = re.compile(r".*/runs/flow-run/([0-9a-f-]+).*")


def _until_not_refused(page: Any, endpoint: Callable[[str], bool], act: Callable[[int], None],
                       done: Callable[[], bool], what: str, poll_ms: int) -> None:
    """``act(attempt)`` (which ends with a click), then ``done()`` polled until it holds.

    The sandbox's Prefect server runs on SQLite, which answers 503 when a write finds the database busy
    (docs/operations.md; a Prefect server on PostgreSQL is the production setting). A 5xx answer to a request
    whose URL ``endpoint`` accepts means the click was refused: ``act`` again, five times at most, 5 s apart."""
    refused: list[int] = []

    def listener(response: Any) -> None:
        if endpoint(response.url) and response.status >= 500:
            refused.append(response.status)

    for attempt in range(5):
        refused.clear()
        page.on("response", listener)
        try:
            act(attempt)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not refused:
                if done():
                    return
                page.wait_for_timeout(poll_ms)
        finally:
            page.remove_listener("response", listener)
        if not refused:
            raise AssertionError(f"{what} neither went through nor was refused within 60 s")
        print(f"{what}: the server answered {refused}; trying again")
        page.wait_for_timeout(5000)
    raise AssertionError(f"the server refused {what} five times: {refused}")


def _submit_run(page: Any) -> None:
    """Submit the run form and open the created run (submitted again if the server refuses to create it)."""

    def opened() -> bool:
        if RUN_PAGE.match(page.url):
            return True
        view = page.get_by_role("button", name="View run").or_(page.get_by_role("link", name="View run"))
        if view.count():
            view.first.click()
            page.wait_for_url(RUN_PAGE)
            return True
        return False

    _until_not_refused(page, lambda url: "/create_flow_run" in url,
                       lambda _attempt: page.get_by_role("button", name="Submit", exact=True).click(),
                       opened, "submitting the run form", poll_ms=250)


def _field(page: Any, title: str) -> Any:
    """The run form's block for the parameter titled ``title`` (label, union tabs, input)."""
    return page.locator(f"xpath=//label[starts-with(normalize-space(), {title!r})]"
                        "/ancestor::div[contains(concat(' ', @class, ' '), ' group ')][1]")


def _pick_block(page: Any, title: str, block_type: str, name: str) -> None:
    """The parameter ``title`` (a Block or None) set to the saved Block ``name`` with its picker."""
    field = _field(page, title)
    field.get_by_role("tab", name=block_type, exact=True).click()
    field.get_by_role("button", name="Select a block").click()
    page.get_by_role("option", name=name, exact=True).click()
    field.get_by_role("button", name="Select a block").filter(has_text=name).wait_for()


def _resume_with_reject(page: Any, sandbox: Sandbox, shots: Path) -> None:
    """Choose reject in the open approval dialog and submit it.

    A resume refused by the sandbox's SQLite-backed server (see :func:`_until_not_refused`) leaves the run
    Paused: the dialog is then opened again from the run's menu and submitted again."""
    run_id = RUN_PAGE.match(page.url).group(1)  # type: ignore[union-attr]
    dialog = page.get_by_role("dialog")

    def reject(attempt: int) -> None:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        for opening in range(3):
            if attempt or opening:
                page.keyboard.press("Escape")  # the dialog, if the failed answer (or a stuck one) left it open
                dialog.wait_for(state="hidden")
            if not dialog.is_visible():
                page.get_by_role("button", name="Open menu").first.click()
                page.get_by_role("menuitem", name="Resume").click()
                dialog.get_by_text("Decision", exact=True).wait_for()
            try:
                # Seen once in six runs: this button re-rendered under every click for a minute. A dialog
                # opened afresh from the menu then takes the click.
                dialog.get_by_role("button", name="Select Decision").click(timeout=15_000)
                page.get_by_role("option", name="reject", exact=True).click(timeout=15_000)
            except PlaywrightTimeout:
                if opening == 2:
                    raise
                print("the approval dialog's decision picker took no click for 15 s; opening the dialog again")
                continue
            break
        if attempt == 0:
            _snap(page, shots, "09-disaster-recovery-reject")
        dialog.get_by_role("button", name="Resume", exact=True).click()

    _until_not_refused(page, lambda url: url.endswith("/resume"), reject,
                       lambda: _run_state(sandbox, run_id) != "Paused", "the rejection", poll_ms=500)


def _run_state(sandbox: Sandbox, run_id: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{sandbox.about['api']}/flow_runs/{run_id}", timeout=10) as response:  # noqa: S310
        return str(json.load(response)["state"]["name"])


def _wait_for_state(page: Any, sandbox: Sandbox, wanted: str) -> None:
    """The open run reaches ``wanted`` (read from the API) and its page shows it; Failed or Crashed fail at once."""
    run_id = RUN_PAGE.match(page.url).group(1)  # type: ignore[union-attr]
    deadline = time.monotonic() + RUN_TIMEOUT / 1000
    state = ""
    while time.monotonic() < deadline:
        state = _run_state(sandbox, run_id)
        if state == wanted:
            page.get_by_text(wanted, exact=True).filter(visible=True).first.wait_for()
            return
        assert state not in ("Failed", "Crashed", "Completed", "Cancelled"), f"the run ended {state}"
        page.wait_for_timeout(1000)
    raise AssertionError(f"the run did not reach {wanted} within {RUN_TIMEOUT / 1000:.0f} s (it is {state})")


def _database_checksums(block: Any) -> dict[str, Any]:
    from tasks.databases import existing_databases
    from tasks.pg_checksums import collect_checksums

    found = {}
    for database in existing_databases.fn(block, ["postgres", "shop"]):
        with block.connect(database) as conn:
            found[database] = [(t.qualified, t.rows, t.checksum) for t in collect_checksums(conn)]
    return found


# ---------------------------------------------------------------------------------------------------------- tests


def test_deployments_page_lists_every_runbook(page: Any, sandbox: Sandbox, shots: Path) -> None:
    from deployments.registry import RUNBOOKS

    page.goto(_ui(sandbox, "/deployments"))
    for rb in RUNBOOKS:
        if rb.module_path.exists():
            page.get_by_role("link", name=rb.deployment, exact=True).first.wait_for()
    _snap(page, shots, "01-deployments")


def test_blocks_catalog_offers_every_block_type(page: Any, sandbox: Sandbox, shots: Path) -> None:
    """`runbooks serve` registered every Block type: App Endpoint is in the catalog though none is saved."""
    page.goto(_ui(sandbox, "/blocks/catalog"))
    for title in ("App Endpoint", "Backup Store", "Postgres Connection", "Redis Connection", "SSH Host",
                  "Kubernetes Cluster", "Prometheus API", "Alertmanager API", "Weaviate Connection"):
        page.get_by_text(title, exact=True).first.wait_for()
    _snap(page, shots, "02-blocks-catalog")


def test_secret_fields_are_password_inputs(page: Any, sandbox: Sandbox, shots: Path) -> None:
    """A password typed into a Block's form is masked, on create and on edit."""
    page.goto(_ui(sandbox, "/blocks/catalog/postgres-connection/create"))
    password = page.get_by_label("Password", exact=False).first
    password.wait_for()
    password.fill("typed-secret")
    _snap(page, shots, "03-block-form-password")
    assert password.get_attribute("type") == "password"


def test_backup_from_its_run_form(page: Any, sandbox: Sandbox, shots: Path, sandbox_api: None) -> None:
    from blocks.store import BackupStore
    from tasks.store import list_sets

    store = BackupStore.load("backups", _sync=True)  # the sync Playwright loop runs in this thread
    before = {m.set_id for m in list_sets(store.get_client())}
    _open_deployment(page, sandbox, "nightly")
    _custom_run(page)
    _snap(page, shots, "04-backup-run-form")
    _submit_run(page)
    _wait_for_state(page, sandbox, "Completed")
    _snap(page, shots, "05-backup-completed")
    page.get_by_role("tab", name="Artifacts").click()
    for key in ("backup-summary", "backup-parts"):
        page.get_by_text(key).first.wait_for()
    _snap(page, shots, "06-backup-artifacts")

    new = [m for m in list_sets(store.get_client()) if m.set_id not in before]
    assert len(new) == 1, "the run wrote one complete set (manifest last) into the sandbox store"
    names = {p.name for p in new[0].parts}
    assert {"shop", "postgres"} <= {n.split("/")[-1] for n in names} or any("shop" in n for n in names), names
    assert any(p.kind == "redis" for p in new[0].parts)


def test_disaster_recovery_rejected_changes_nothing(page: Any, sandbox: Sandbox, shots: Path,
                                                    sandbox_api: None) -> None:
    from blocks.postgres import PostgresConnection
    from blocks.redis import RedisConnection
    from tasks.redis import keyspace_digest

    postgres, redis = PostgresConnection.load("app-db", _sync=True), RedisConnection.load("app-redis", _sync=True)
    tables_before, keys_before = _database_checksums(postgres), keyspace_digest(redis)
    assert tables_before["shop"], "the sandbox seeded the application database"

    _open_deployment(page, sandbox, "disaster-recovery")
    _custom_run(page)
    _pick_block(page, "PostgreSQL server", "PostgresConnection", "app-db")
    _pick_block(page, "Redis server", "RedisConnection", "app-redis")
    _snap(page, shots, "07-disaster-recovery-run-form")
    _submit_run(page)
    _wait_for_state(page, sandbox, "Paused")
    page.get_by_role("button", name="Open menu").first.click()  # the run's menu, top right
    page.get_by_role("menuitem", name="Resume").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Decision", exact=True).wait_for()
    _snap(page, shots, "08-disaster-recovery-approval")
    dialog.get_by_role("button", name="Resume", exact=True).click()  # no decision chosen: refused
    page.wait_for_timeout(2000)
    assert dialog.is_visible() and page.get_by_text("Paused", exact=True).filter(visible=True).count()
    _resume_with_reject(page, sandbox, shots)
    _wait_for_state(page, sandbox, "Cancelled")
    _snap(page, shots, "10-disaster-recovery-cancelled")

    assert _database_checksums(postgres) == tables_before
    after = keyspace_digest(redis)
    assert (after.key_count, after.digest) == (keys_before.key_count, keys_before.digest)


def test_ctrl_c_stops_and_removes_the_sandbox(sandbox: Sandbox) -> None:
    if sandbox.proc is None:
        pytest.skip("attached to a running sandbox ($RUNBOOKS_BROWSER_SANDBOX): not ours to stop")
    about, proc = sandbox.about, sandbox.proc
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(120) == 0, sandbox.log_tail()
    for key in ("home", "postgres_dir", "redis_dir", "s3_dir"):
        assert not Path(about[key]).exists(), f"{key} {about[key]} left behind"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    for key in ("postgres_dir", "redis_dir", "s3_dir", "home"):
        assert about[key] not in ps, f"a process of {key} still runs"
