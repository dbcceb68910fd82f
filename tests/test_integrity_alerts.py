"""The PostgresChecksumFailure rule's input for real: postgres_exporter with the shipped queries file, scraping
a cluster (data checksums on) in which a damaged page was read. The rule logic itself is unit-tested by
promtool (deployments/prometheus/runbooks.rules.test.yml, run by tests/test_triggers_metrics.py)."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from tasks.scratch import ScratchPostgres
from tests.conftest import MonitoringDaemon
from tests.test_integrity import GARBAGE_HEAP, HEAP_BLOCK, connect, corrupt, create_database

ROOT = Path(__file__).resolve().parent.parent
QUERIES = ROOT / "deployments/prometheus/postgres-exporter-queries.yml"


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:  # noqa: S310 - loopback
        return response.read().decode()


def test_exporter_with_the_shipped_queries_counts_a_real_checksum_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    with ScratchPostgres(fast=True, data_checksums=True) as server:
        create_database(server, "app", rows=20000)
        corrupt(server, [("app", "u", HEAP_BLOCK, GARBAGE_HEAP)])
        with connect(server, "app") as conn, pytest.raises(psycopg.errors.DataCorrupted):
            conn.execute("SELECT count(*) FROM u")
        monkeypatch.setenv("DATA_SOURCE_NAME", server.url.rsplit("/", 1)[0] + "/postgres?sslmode=disable")
        exporter = MonitoringDaemon("prometheus-postgres-exporter", lambda port, _d: [
            f"--web.listen-address=127.0.0.1:{port}", f"--extend.query-path={QUERIES}"], ready_path="/metrics")
        exporter.start()
        try:
            deadline = time.monotonic() + 20
            while True:
                text = _scrape(exporter.url)
                found = re.search(r'^pg_checksum_failures\{[^}]*datname="app"[^}]*\} (\S+)$', text, re.MULTILINE)
                if (found and float(found.group(1)) >= 1) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            exporter.stop()
        assert found is not None, exporter.log_tail()
        assert float(found.group(1)) >= 1
        clean = re.search(r'^pg_checksum_failures\{[^}]*datname="postgres"[^}]*\} (\S+)$', text, re.MULTILINE)
        assert clean is not None and float(clean.group(1)) == 0
        assert "# TYPE pg_checksum_failures counter" in text
        last = re.search(r'^pg_checksum_last_failure_seconds\{[^}]*datname="app"[^}]*\} (\S+)$', text, re.MULTILINE)
        assert last is not None and abs(float(last.group(1)) - time.time()) < 600
