"""Alert -> approval -> rollback, end to end, as an operator runs it: `runbooks up` (Prefect server + serve +
bridge) with the shipped `rollback` deployment defaults (Blocks `kubernetes-cluster/app`, `app-endpoint/app`),
the shipped HighErrorRate rule (deployments/prometheus/app.rules.example.yml) in the real Debian Prometheus,
the real Alertmanager from the shipped example config, and the shipped route high-error-rate-after-deploy.
The cluster is the HTTP double (tests/k8s_double.py) in this process; the rollback run, in the served process,
drives it with the real `kubernetes` client.

The bridge's approval form lets the run start; the run's own approval form shows current vs target images and
the alert's reason; once approved, `api` goes back to its previous template and the run completes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from tasks.scratch import free_port
from tests.app_fixture import ProbeApp
from tests.conftest import MonitoringDaemon, pushgateway_daemon
from tests.k8s_scenarios import GOOD_V1, GOOD_V2, container, double_cluster, env_of, make_deployment, read
from tests.test_triggers import runs_of_route, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
ROUTE = "high-error-rate-after-deploy"
APP_TOKEN = "app-e2e-token-" + secrets.token_hex(8)


class Up:
    def __init__(self, proc: subprocess.Popen[bytes], home: Path, api_url: str, bridge_url: str) -> None:
        self.proc, self.home, self.api_url, self.bridge_url = proc, home, api_url, bridge_url

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("rollback-e2e")
    with double_cluster() as (cluster, double):
        with ProbeApp(lambda: True, token=APP_TOKEN) as app:
            make_deployment(cluster, "api", [(GOOD_V1, {"MODE": "one"}), (GOOD_V2, {"MODE": "two"})])
            token = secrets.token_urlsafe(24)
            token_file = home / "bridge-token"
            token_file.touch(mode=0o600)
            token_file.write_text(token)
            example = yaml.safe_load((ROOT / "deployments/routes.example.yaml").read_text())
            [route] = [r for r in example["routes"] if r["name"] == ROUTE]
            (home / "routes.yaml").write_text(yaml.safe_dump({"defaults": example["defaults"], "routes": [route]}))
            port, webhook_port = free_port(), free_port()
            env = {k: v for k, v in os.environ.items() if k != "RUNBOOKS_PUSHGATEWAY_URL"}

            def start_up() -> Up:
                log = open(home / "up.log", "ab")  # noqa: SIM115
                proc = subprocess.Popen(
                    [sys.executable, "-m", "deployments.cli", "up", "--home", str(home / "state"), "--port",
                     str(port), "--webhook-port", str(webhook_port), "--routes", str(home / "routes.yaml"),
                     "--token-file", str(token_file), "--poll", "1"], env=env, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(home), start_new_session=True)
                log.close()
                up = Up(proc, home, f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{webhook_port}")

                def served() -> bool:
                    if proc.poll() is not None:
                        raise AssertionError(f"runbooks up exited {proc.returncode}:\n{(home / 'up.log').read_text()}")
                    try:
                        urllib.request.urlopen(up.bridge_url + "/healthz", timeout=2)
                        with up.client() as client:
                            client.read_deployment_by_name("rollback/rollback")
                    except Exception:  # noqa: BLE001 - not up yet
                        return False
                    return True

                wait_for("runbooks up to serve the rollback runbook", served, timeout=180, every=1)
                return up

            # The shipped defaults name saved Blocks; `runbooks serve` keeps only defaults whose Blocks exist when
            # it starts. So: start, save the Blocks an operator would save, stop, start again (same database).
            up = start_up()
            try:
                from prefect.settings import PREFECT_API_URL, temporary_settings

                from blocks.app import AppEndpoint

                with temporary_settings({PREFECT_API_URL: up.api_url}):
                    cluster.save("app", overwrite=True)
                    AppEndpoint(base_url=app.base_url, auth_value=SecretStr(f"Bearer {APP_TOKEN}")).save(
                        "app", overwrite=True)
                with up.client() as client:  # registered without defaults; serve re-creates it with them
                    client.delete_deployment(client.read_deployment_by_name("rollback/rollback").id)
            finally:
                up.proc.send_signal(signal.SIGINT)
                up.proc.wait(90)
            up = start_up()
            proc = up.proc
            try:
                yield {"up": up, "cluster": cluster, "double": double, "app": app, "token_file": token_file}
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@pytest.fixture(scope="module")
def alerting(world: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Pushgateway, Prometheus with the shipped HighErrorRate rule, Alertmanager from the shipped example."""
    work = tmp_path_factory.mktemp("alerting")
    up: Up = world["up"]
    am_config = yaml.safe_load((ROOT / "deployments/alertmanager/alertmanager.example.yml").read_text())
    am_config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="2s")
    [hook] = next(r for r in am_config["receivers"] if r["name"] == "runbooks-bridge")["webhook_configs"]
    hook["url"] = up.bridge_url + "/alertmanager"
    hook["http_config"]["authorization"]["credentials_file"] = str(world["token_file"])
    (work / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
    alertmanager = MonitoringDaemon("prometheus-alertmanager", lambda port, d: [
        f"--config.file={work / 'alertmanager.yml'}", f"--storage.path={d}", f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address="]).start()
    pushgateway = pushgateway_daemon().start()
    rules = yaml.safe_load((ROOT / "deployments/prometheus/app.rules.example.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        rule["for"] = "0s"  # the test cannot wait the shipped 2 minutes; the expression is the shipped one
    (work / "rules.yml").write_text(yaml.safe_dump(rules))
    (work / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager.port}"]}]}]},
        "scrape_configs": [{"job_name": "pushgateway", "honor_labels": True,
                            "static_configs": [{"targets": [f"127.0.0.1:{pushgateway.port}"]}]}]}))
    prometheus = MonitoringDaemon("prometheus", lambda port, d: [
        f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={d}/data",
        f"--web.listen-address=127.0.0.1:{port}", "--rules.alert.resend-delay=2s"]).start()
    stop = threading.Event()

    def traffic() -> None:
        """The app after a bad deploy: 10 % of requests fail; kube-state-metrics saw the generation change."""
        step, generation = 0, 1
        seen_before_deploy = f"{prometheus.url}/api/v1/query?query=kube_deployment_metadata_generation%3D%3D1"
        while not stop.is_set():
            step += 1
            if generation == 1:
                try:  # the deploy happens once Prometheus has scraped the generation before it
                    if json.loads(urllib.request.urlopen(seen_before_deploy, timeout=5).read())["data"]["result"]:
                        generation = 2
                except OSError:
                    pass
            body = "".join([
                f'http_requests_total{{namespace="shop",deployment="api",code="200"}} {90 * step}\n',
                f'http_requests_total{{namespace="shop",deployment="api",code="500"}} {10 * step}\n',
                f'kube_deployment_metadata_generation{{namespace="shop",deployment="api"}} {generation}\n'])
            try:
                urllib.request.urlopen(urllib.request.Request(f"{pushgateway.url}/metrics/job/app", method="PUT",
                                                              data=body.encode()), timeout=5)
            except OSError:
                pass
            stop.wait(0.5)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        yield {"prometheus": prometheus, "alertmanager": alertmanager}
    finally:
        stop.set()
        thread.join(5)
        prometheus.stop()
        pushgateway.stop()
        alertmanager.stop()


def _state(up: Up, run_id: Any) -> Any:
    with up.client() as client:
        return client.read_flow_run(run_id).state


def test_alert_approval_rollback_end_to_end(world: dict[str, Any], alerting: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    up: Up = world["up"]
    cluster, double = world["cluster"], world["double"]
    try:
        [run] = wait_for("HighErrorRate to start a rollback run", lambda: runs_of_route(up, ROUTE), 120)
    except AssertionError:
        alerts = urllib.request.urlopen(alerting["prometheus"].url + "/api/v1/alerts", timeout=5).read().decode()
        raise AssertionError(f"no run; Prometheus alerts: {alerts}\nup.log:\n"
                             f"{(up.home / 'up.log').read_text()[-4000:]}") from None
    assert run.parameters["deployment"] == "api" and run.parameters["namespace"] == "shop"
    # the shipped deployment defaults: saved Blocks by reference, never their secrets
    with up.client() as client:
        defaults = client.read_deployment_by_name("rollback/rollback").parameters
        ids = {slug: str(client.read_block_document_by_name(name=slug.split("/")[1],
                                                            block_type_slug=slug.split("/")[0]).id)
               for slug in ("kubernetes-cluster/app", "app-endpoint/app")}
    # by id: what the run form's block picker shows as the default
    assert defaults == {"cluster": {"$ref": {"block_document_id": ids["kubernetes-cluster/app"]}},
                        "app": {"$ref": {"block_document_id": ids["app-endpoint/app"]}}}, (run.parameters, defaults)
    assert "of requests fail since its last deploy" in run.parameters["reason"]
    assert _state(up, run.id).is_paused()  # the bridge's gate: nothing runs before a human says so
    time.sleep(3)
    assert container(read(cluster, "api"))["image"] == GOOD_V2 and len(runs_of_route(up, ROUTE)) == 1

    with up.client() as client:
        client.resume_flow_run(run.id, run_input={"decision": "approve", "confirm_target": "rollback/rollback",
                                                  "approved_by": "e2e"})

    def waiting_for_the_runs_own_approval() -> Any:
        state = _state(up, run.id)
        assert not (state.is_failed() or state.is_crashed()), state
        keyset = state.state_details.run_input_keyset if state.is_paused() else None
        return keyset if keyset and keyset.get("description") and "approval" not in keyset["description"] \
            else None

    keyset = wait_for("the run to pause with its rollback plan", waiting_for_the_runs_own_approval, 120)
    with up.client() as client:
        description = json.loads(client.read_flow_run_input(run.id, keyset["description"]))
    assert f"api={GOOD_V2}" in description and f"api={GOOD_V1}" in description  # current vs target images
    assert "2 -> 1" in description and "of requests fail since its last deploy" in description
    assert container(read(cluster, "api"))["image"] == GOOD_V2  # still nothing changed
    with up.client() as client:
        client.resume_flow_run(run.id, run_input={"decision": "approve", "confirm_target": "api",
                                                  "note": "e2e: error rate after deploy"})

    def completed() -> bool:
        state = _state(up, run.id)
        assert not (state.is_failed() or state.is_crashed()), (state, (up.home / "up.log").read_text()[-3000:])
        return state.is_completed()

    wait_for("the rollback run to complete", completed, 120)
    after = read(cluster, "api")
    assert container(after)["image"] == GOOD_V1 and env_of(after) == {"MODE": "one"}
    assert after["status"]["availableReplicas"] == 3
    assert world["app"].health_calls() >= 1
    assert len(runs_of_route(up, ROUTE)) == 1  # Alertmanager kept repeating: still one rollback

    with up.client() as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run.id])))
        stored = client.read_flow_run(run.id)
    report = next(a.data for a in artifacts if a.key == "rollback-report")
    assert "rolled back and verified" in report
    everything = "\n".join([*(log.message for log in logs), json.dumps([a.data for a in artifacts], default=str),
                            json.dumps(stored.parameters, default=str), (up.home / "up.log").read_text()])
    for secret in (double.token, APP_TOKEN):
        assert secret not in everything
