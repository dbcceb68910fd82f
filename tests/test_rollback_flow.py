"""The `rollback` flow end to end: the real `kubernetes` client against the API double (tests/k8s_double.py),
health through a real HTTP app, checks against the real Debian Prometheus scraping a real Pushgateway, the
Prefect test harness for locks, logs and artifacts."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.app import AppEndpoint
from blocks.prometheus import PrometheusAPI
from tests.app_fixture import ProbeApp
from tests.conftest import MonitoringDaemon, pushgateway_daemon
from tests.k8s_double import KubeDouble
from tests.k8s_scenarios import GOOD_V1, GOOD_V2, container, double_cluster, env_of, make_deployment, read

pytestmark = pytest.mark.e2e

V1_ENV = {"MODE": "one"}
V2_ENV = {"MODE": "two", "DATABASE_PASSWORD": "s3cr3t-env-value-XYZ"}
APP_TOKEN = "app-token-" + secrets.token_hex(8)
PROM_PASSWORD = "prom-pass-" + secrets.token_hex(8)


class Prometheus:
    def __init__(self, prometheus: MonitoringDaemon, pushgateway: MonitoringDaemon) -> None:
        self.daemon, self.pushgateway = prometheus, pushgateway

    def block(self) -> PrometheusAPI:
        return PrometheusAPI(url=self.daemon.url, username="runbooks", password=SecretStr(PROM_PASSWORD))

    def push(self, value: float, deployment: str = "api") -> None:
        """Set app_error_ratio{deployment=...} and wait until Prometheus has scraped that value."""
        body = f'app_error_ratio{{deployment="{deployment}"}} {value}\n'.encode()
        urllib.request.urlopen(urllib.request.Request(f"{self.pushgateway.url}/metrics/job/app", data=body,
                                                      method="PUT"), timeout=5)
        block = self.block()
        from tasks.prometheus import query_instant

        deadline = time.monotonic() + 20
        with block.get_client() as client:
            while query_instant(client, block, f'app_error_ratio{{deployment="{deployment}"}}') != [value]:
                assert time.monotonic() < deadline, "Prometheus did not scrape the pushed value"
                time.sleep(0.2)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Debian's Prometheus behind basic auth (web config, bcrypt), scraping a Pushgateway every second."""
    import base64

    import bcrypt
    import yaml

    work = tmp_path_factory.mktemp("prometheus")
    pushgateway = pushgateway_daemon().start()
    hashed = bcrypt.hashpw(PROM_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (work / "web.yml").write_text(yaml.safe_dump({"basic_auth_users": {"runbooks": hashed}}))
    (work / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "pushgateway", "honor_labels": True,
                            "static_configs": [{"targets": [f"127.0.0.1:{pushgateway.port}"]}]}]}))
    auth = "Basic " + base64.b64encode(f"runbooks:{PROM_PASSWORD}".encode()).decode()
    daemon = MonitoringDaemon("prometheus", lambda port, d: [
        f"--config.file={work / 'prometheus.yml'}", f"--web.config.file={work / 'web.yml'}",
        f"--storage.tsdb.path={d}/data", f"--web.listen-address=127.0.0.1:{port}"],
        ready_headers={"Authorization": auth}).start()
    try:
        yield Prometheus(daemon, pushgateway)
    finally:
        daemon.stop()
        pushgateway.stop()


@pytest.fixture
def kube() -> Iterator[tuple[Any, KubeDouble, ProbeApp]]:
    """The double with `api` at revision 2 (v2), and an app healthy unless a pod of `api` runs an
    image tagged `unhealthy`."""
    with double_cluster() as (cluster, double):
        def healthy() -> bool:
            with double.lock:
                return not any(c["image"].endswith(":unhealthy") for p in double.pods.values()
                               for c in p["spec"]["containers"] if p["metadata"]["labels"].get("app") == "api")

        with ProbeApp(healthy, token=APP_TOKEN) as app:
            make_deployment(cluster, "api", [(GOOD_V1, V1_ENV), (GOOD_V2, V2_ENV)])
            yield cluster, double, app


def endpoint(app: ProbeApp) -> AppEndpoint:
    return AppEndpoint(base_url=app.base_url, auth_value=SecretStr(f"Bearer {APP_TOKEN}"))


FAST = {"confirm": True, "poll_seconds": 0.05, "rollout_timeout_seconds": 20, "health_timeout_seconds": 3,
        "check_interval_seconds": 0.5, "lock_timeout_seconds": 30}


def run_record(state: Any) -> tuple[list[Any], dict[str, Any], Any]:
    """(logs, {artifact key: data}, flow run) of a finished run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
        run = client.read_flow_run(run_id)
    return logs, {a.key: a.data for a in artifacts}, run


def assert_no_secrets(state: Any, double: KubeDouble, caplog: pytest.LogCaptureFixture) -> None:
    logs, artifacts, run = run_record(state)
    assert logs
    everything = "\n".join([*(log.message for log in logs), json.dumps(artifacts, default=str),
                            json.dumps(run.parameters, default=str), state.message or "",
                            str(state.result(raise_on_failure=False)), caplog.text])
    for secret in (double.token, APP_TOKEN, PROM_PASSWORD, V2_ENV["DATABASE_PASSWORD"]):
        assert secret not in everything


def test_previous_rolls_back_template_and_env_and_reports_before_after(kube, prefect_harness, caplog) -> None:
    from flows.rollback import rollback

    cluster, double, app = kube
    state = rollback(cluster=cluster, deployment="api", app=endpoint(app), return_state=True, **FAST)
    assert state.is_completed(), state.message
    result = state.result()
    after = read(cluster, "api")
    assert container(after)["image"] == GOOD_V1 and env_of(after) == V1_ENV
    assert after["status"]["availableReplicas"] == 3 == after["status"]["updatedReplicas"]
    assert result.changed == ["shop/api"] and result.before[0]["revision"] == 2 and result.after[0]["revision"] == 3
    assert app.health_calls() >= 1 and all(authorized for _m, _p, authorized in app.calls)
    _logs, artifacts, _run = run_record(state)
    [row] = artifacts["rollback-after"] if isinstance(artifacts["rollback-after"], list) else \
        json.loads(artifacts["rollback-after"])
    assert (row["images before"], row["images after"]) == (f"api={GOOD_V2}", f"api={GOOD_V1}")
    assert (row["revision before"], row["revision after"]) == (2, 3)
    assert "rolled back and verified" in artifacts["rollback-report"]
    assert_no_secrets(state, double, caplog)
    # the JSON patch kubectl rollout undo sends, template + annotations, exactly once
    [(path, content_type, body)] = double.patches("deployments")[2:]  # after the setup's create + patch
    assert path.endswith("/deployments/api") and content_type == "application/json-patch+json"
    assert [op["path"] for op in body] == ["/spec/template", "/metadata/annotations"]


def test_a_second_previous_is_refused_instead_of_flapping(kube, prefect_harness) -> None:
    from blocks.errors import ConfigurationError
    from flows.rollback import rollback

    cluster, double, app = kube
    assert rollback(cluster=cluster, deployment="api", return_state=True, **FAST).is_completed()
    patches = len(double.patches("deployments"))
    state = rollback(cluster=cluster, deployment="api", return_state=True, **FAST)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ConfigurationError) and "flap" in str(error) and "revision 2" in str(error)
    assert len(double.patches("deployments")) == patches  # nothing changed
    assert container(read(cluster, "api"))["image"] == GOOD_V1


def test_broken_image_fails_names_the_deployment_and_puts_the_template_back(kube, prefect_harness, caplog) -> None:
    from flows.rollback import rollback
    from tasks.kubernetes import RolloutFailed

    cluster, double, app = kube
    before = read(cluster, "api")
    state = rollback(cluster=cluster, deployment="api", images=["api=registry.k8s.io/pause:broken"],
                     app=endpoint(app), return_state=True, **FAST)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, RolloutFailed)
    assert "ProgressDeadlineExceeded" in str(error) and '"shop/api"' in str(error) and "broken" in str(error)
    after = read(cluster, "api")
    assert after["spec"]["template"] == before["spec"]["template"]  # the recorded template is back
    assert after["status"]["availableReplicas"] == 3 and after["status"]["updatedReplicas"] == 3
    _logs, artifacts, _run = run_record(state)
    report = artifacts["rollback-report"]
    assert "FAILED" in report and "the recorded state was put back" in report and "ProgressDeadlineExceeded" in report
    assert f"rev 2: api={GOOD_V2}" in report
    assert app.health_calls() == 0  # never reached the health check
    assert_no_secrets(state, double, caplog)


def test_unhealthy_after_rollout_puts_the_recorded_state_back_once(kube, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.app import AppUnhealthy

    cluster, double, app = kube
    state = rollback(cluster=cluster, deployment="api", images=["api=registry.example/app:unhealthy"],
                     app=endpoint(app), return_state=True, **FAST)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), AppUnhealthy)
    after = read(cluster, "api")
    assert container(after)["image"] == GOOD_V2 and env_of(after) == V2_ENV
    # one change, one undo: exactly two patches after the setup (no flapping)
    assert len(double.patches("deployments")) == 2 + 2
    _logs, artifacts, _run = run_record(state)
    assert "put shop/api back to revision 2" in artifacts["rollback-report"]


def test_prometheus_check_above_threshold_fails_with_the_values(kube, prometheus, prefect_harness, caplog) -> None:
    from flows.rollback import rollback
    from tasks.prometheus import MetricCheck, MetricCheckFailed

    cluster, double, app = kube
    prometheus.push(0.05)
    check = MetricCheck(query='max(app_error_ratio{deployment="api"})', max=0.01, for_seconds=2)
    state = rollback(cluster=cluster, deployment="api", app=endpoint(app), prometheus=prometheus.block(),
                     checks=[check], return_state=True, **FAST)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, MetricCheckFailed) and "0.05 > 0.01" in str(error) and "[0.05]" in str(error)
    assert container(read(cluster, "api"))["image"] == GOOD_V2  # put back
    _logs, artifacts, _run = run_record(state)
    assert "FAIL: 0.05 > 0.01" in artifacts["rollback-report"]
    assert_no_secrets(state, double, caplog)


def test_prometheus_check_below_threshold_passes(kube, prometheus, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.prometheus import MetricCheck

    cluster, double, app = kube
    prometheus.push(0.002)
    check = MetricCheck(query='max(app_error_ratio{deployment="api"})', max=0.01, for_seconds=2)
    state = rollback(cluster=cluster, deployment="api", app=endpoint(app), prometheus=prometheus.block(),
                     checks=[check], return_state=True, **FAST)
    assert state.is_completed(), state.message
    [result] = state.result().checks
    assert result["passed"] and result["evaluations"] >= 2 and set(result["values"]) == {0.002}
    assert container(read(cluster, "api"))["image"] == GOOD_V1


def test_bad_input_changes_nothing(kube, prefect_harness) -> None:
    from blocks.errors import ConfigurationError
    from flows.rollback import rollback

    cluster, double, app = kube
    for kwargs in ({"deployment": "api", "to": "yesterday"}, {"deployment": "api", "images": ["web=x:1"]},
                   {"deployment": "nope"}, {"deployment": "api", "to": "7"}, {}):
        state = rollback(cluster=cluster, return_state=True, **kwargs, **FAST)
        assert state.is_failed() and isinstance(state.result(raise_on_failure=False), ConfigurationError), kwargs
    assert len(double.patches("deployments")) == 2


# -- blue-green on Kubernetes ------------------------------------------------------------------------------------


@pytest.fixture
def colours() -> Iterator[tuple[Any, KubeDouble, dict[str, Any]]]:
    """`api` Service selecting version=blue; api-blue and api-green Deployments (3 replicas each) with their own
    Services, whose API-proxy backends are real HTTP apps (green's health is switchable)."""
    from kubernetes.client import CoreV1Api

    with double_cluster() as (cluster, double):
        state = {"green_healthy": True}
        with ProbeApp(lambda: True) as blue_app, ProbeApp(lambda: state["green_healthy"]) as green_app:
            def public_healthy() -> bool:
                colour = double.services[("shop", "api")]["spec"]["selector"]["version"]
                return colour == "blue" or state["green_healthy"]

            with ProbeApp(public_healthy, token=APP_TOKEN) as public:
                for colour, image in (("blue", GOOD_V2), ("green", GOOD_V1)):
                    make_deployment(cluster, f"api-{colour}", [(image, V1_ENV)],
                                    labels={"app": "api", "version": colour})
                core = CoreV1Api(cluster.get_client())
                for name, selector in (("api", {"app": "api", "version": "blue"}),
                                       ("api-blue", {"app": "api", "version": "blue"}),
                                       ("api-green", {"app": "api", "version": "green"})):
                    core.create_namespaced_service("shop", {"metadata": {"name": name}, "spec": {
                        "selector": selector, "ports": [{"port": 80, "targetPort": 8080}]}})
                double.backends[("shop", "api-blue")] = blue_app.base_url
                double.backends[("shop", "api-green")] = green_app.base_url
                yield cluster, double, {"state": state, "green": green_app, "public": public}


def selector_of(double: KubeDouble, name: str = "api") -> dict[str, str]:
    with double.lock:
        return dict(double.services[("shop", name)]["spec"]["selector"])


def test_blue_green_switches_when_the_other_colour_is_available_and_healthy(colours, prefect_harness, caplog) -> None:
    from flows.rollback import rollback

    cluster, double, apps = colours
    state = rollback(target="blue-green-kubernetes", cluster=cluster, service="api", app=endpoint(apps["public"]),
                     return_state=True, **FAST)
    assert state.is_completed(), state.message
    assert selector_of(double) == {"app": "api", "version": "green"}
    assert [p for _m, p, _a in apps["green"].calls] == ["/health"]  # checked through the API server's proxy
    assert apps["public"].health_calls() >= 1
    [(path, content_type, body)] = double.patches("services")[3:]  # after the three creates
    assert content_type == "application/strategic-merge-patch+json" and body == {
        "spec": {"selector": {"app": "api", "version": "green"}}}
    _logs, artifacts, _run = run_record(state)
    assert "switched blue -> green and verified" in artifacts["rollback-report"]
    rows = artifacts["rollback-after"]
    rows = {r["what"]: r for r in (json.loads(rows) if isinstance(rows, str) else rows)}
    assert rows["deployment shop/api-green"]["after"] == "serving"
    assert rows["deployment shop/api-blue"]["after"] == "standby"
    assert "'version': 'green'" in rows["service shop/api selector"]["after"]
    assert_no_secrets(state, double, caplog)


def test_blue_green_refuses_a_colour_scaled_to_zero_changing_nothing(colours, prefect_harness) -> None:
    from kubernetes.client import AppsV1Api

    from flows.rollback import rollback
    from tasks.kubernetes import ServiceSwitchRefused
    from tests.k8s_scenarios import settle

    cluster, double, apps = colours
    AppsV1Api(cluster.get_client()).patch_namespaced_deployment_scale(
        "api-green", "shop", {"spec": {"replicas": 0}}, _content_type="application/merge-patch+json")
    settle(cluster, "api-green")
    state = rollback(target="blue-green-kubernetes", cluster=cluster, service="api", return_state=True, **FAST)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ServiceSwitchRefused) and "scaled to zero" in str(error)
    assert "nothing was switched" in str(error)
    assert selector_of(double) == {"app": "api", "version": "blue"} and len(double.patches("services")) == 3
    _logs, artifacts, _run = run_record(state)
    assert "REFUSED" in artifacts["rollback-report"]


def test_blue_green_refuses_an_unhealthy_colour_changing_nothing(colours, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.kubernetes import ServiceSwitchRefused

    cluster, double, apps = colours
    apps["state"]["green_healthy"] = False
    state = rollback(target="blue-green-kubernetes", cluster=cluster, service="api", return_state=True, **FAST)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ServiceSwitchRefused) and "unhealthy" in str(error) and "HTTP 503" in str(error)
    assert selector_of(double) == {"app": "api", "version": "blue"} and len(double.patches("services")) == 3
    assert apps["green"].health_calls() == 3


def test_blue_green_refuses_a_missing_colour(colours, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.kubernetes import ServiceSwitchRefused

    cluster, double, apps = colours
    with double.lock:
        double.deployments.pop(("shop", "api-green"))
    state = rollback(target="blue-green-kubernetes", cluster=cluster, service="api", return_state=True, **FAST)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ServiceSwitchRefused) and "no deployment" in str(error)
    assert selector_of(double) == {"app": "api", "version": "blue"}


def test_blue_green_switches_back_when_the_app_is_unhealthy_after_the_switch(colours, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.app import AppUnhealthy

    cluster, double, apps = colours
    # green answers its own health check, but the public app is unhealthy once traffic is on green
    apps["public"].healthy = lambda: selector_of(double)["version"] == "blue"
    state = rollback(target="blue-green-kubernetes", cluster=cluster, service="api", app=endpoint(apps["public"]),
                     return_state=True, **FAST)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), AppUnhealthy)
    assert selector_of(double) == {"app": "api", "version": "blue"}
    bodies = [b for _p, _ct, b in double.patches("services")[3:]]
    assert [b["spec"]["selector"]["version"] for b in bodies] == ["green", "blue"]  # one switch, one switch back


# -- faults at each changing step, approval, the lock ------------------------------------------------------------


def test_a_failed_patch_of_the_second_deployment_puts_the_first_back(kube, prefect_harness) -> None:
    from flows.rollback import rollback

    cluster, double, app = kube
    make_deployment(cluster, "worker", [(GOOD_V1, V1_ENV), (GOOD_V2, V2_ENV)])
    api_before, worker_before = read(cluster, "api"), read(cluster, "worker")
    double.fail_patches[("deployments", "worker")] = [500]
    state = rollback(cluster=cluster, deployments=["api", "worker"], return_state=True, **FAST)
    assert state.is_failed() and "HTTP 500" in str(state.result(raise_on_failure=False))
    api, worker = read(cluster, "api"), read(cluster, "worker")
    assert api["spec"]["template"] == api_before["spec"]["template"]  # rolled back, then put back
    assert worker["spec"]["template"] == worker_before["spec"]["template"]
    assert api["status"]["availableReplicas"] == 3
    _logs, artifacts, _run = run_record(state)
    report = artifacts["rollback-report"]
    assert "the recorded state was put back" in report and "put shop/api back to revision 2" in report


def test_a_failing_undo_is_reported_as_needing_action(kube, prefect_harness) -> None:
    from flows.rollback import rollback
    from tasks.kubernetes import RolloutFailed

    cluster, double, app = kube
    double.fail_patches[("deployments", "api")] = [0, 500]  # the rollback's patch passes, the undo's fails
    state = rollback(cluster=cluster, deployment="api", images=["api=registry.k8s.io/pause:broken"],
                     return_state=True, **FAST)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), RolloutFailed)
    _logs, artifacts, _run = run_record(state)
    report = artifacts["rollback-report"]
    assert "putting the recorded state back FAILED: act now" in report and "FAILED: patching deployment" in report
    assert container(read(cluster, "api"))["image"].endswith(":broken")  # what the report says is live


def _wait_for_paused(timeout: float = 60) -> Any:
    """The run paused for its own approval form (a run input keyset with a description)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            keyed = [r for r in runs if (r.state.state_details.run_input_keyset or {}).get("description")]
            if keyed:
                return keyed[0]
            time.sleep(0.3)
    raise AssertionError("no paused run")


@pytest.mark.parametrize("approve", [False, True])
def test_approval_form_shows_current_and_target_images(kube, prefect_harness, approve: bool) -> None:
    import threading

    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from flows.rollback import rollback

    cluster, double, app = kube
    box: dict[str, Any] = {}
    params = {**FAST, "confirm": False}
    thread = threading.Thread(target=lambda: box.setdefault("state", rollback(
        cluster=cluster, deployment="api", reason="HighErrorRate: 7% errors", return_state=True, **params)))
    thread.start()
    paused = _wait_for_paused()
    with get_client(sync_client=True) as client:
        description = json.loads(client.read_flow_run_input(
            paused.id, paused.state.state_details.run_input_keyset["description"]))
    assert f"api={GOOD_V2}" in description and f"api={GOOD_V1}" in description and "2 -> 1" in description
    assert "HighErrorRate: 7% errors" in description
    time.sleep(0.5)
    assert len(double.patches("deployments")) == 2  # nothing changes while paused
    assert "type `api`" in description  # the Deployment's name, typed to approve
    with get_client(sync_client=True) as client:
        wrong = client.resume_flow_run(paused.id, run_input={"decision": "approve", "confirm_target": "web"})
        assert wrong.status.value == "REJECT" and client.read_flow_run(paused.id).state.is_paused()
    resume_flow_run(paused.id, run_input={"decision": "approve", "confirm_target": "api"} if approve
                    else {"decision": "reject", "note": "test"})
    thread.join(120)
    state = box["state"]
    if approve:
        assert state.is_completed() and container(read(cluster, "api"))["image"] == GOOD_V1
    else:
        assert state.is_cancelled() and len(double.patches("deployments")) == 2
        assert container(read(cluster, "api"))["image"] == GOOD_V2


def test_a_second_rollback_of_the_same_target_waits_on_the_lock(kube, prefect_harness) -> None:
    from prefect.concurrency.sync import concurrency

    from flows.rollback import rollback
    from tasks.locks import ensure_lock, lock_name

    cluster, double, app = kube
    name = lock_name("rollback", f"{cluster.describe()}/deployment/api")
    ensure_lock(name)
    with concurrency(name, occupy=1, timeout_seconds=10, strict=True):  # a rollback of api in progress
        started = time.monotonic()
        state = rollback(cluster=cluster, deployment="api", return_state=True, **{**FAST, "lock_timeout_seconds": 2})
        waited = time.monotonic() - started
    assert state.is_failed() and waited >= 2
    assert len(double.patches("deployments")) == 2 and container(read(cluster, "api"))["image"] == GOOD_V2
    assert rollback(cluster=cluster, deployment="api", return_state=True, **FAST).is_completed()  # lock free


def test_blue_green_failed_selector_patch_leaves_the_selector(colours, prefect_harness) -> None:
    from flows.rollback import rollback

    cluster, double, apps = colours
    double.fail_patches[("services", "api")] = [500]
    state = rollback(target="blue-green-kubernetes", cluster=cluster, service="api", return_state=True, **FAST)
    assert state.is_failed() and "HTTP 500" in str(state.result(raise_on_failure=False))
    assert selector_of(double) == {"app": "api", "version": "blue"}
