"""The Alertmanager bridge as an ASGI app: authentication, limits, validation, a fuzz run that finds no 500,
and run creation, deduplication, cooldown and approval against a real Prefect API (the session harness)."""

from __future__ import annotations

import base64
import copy
import json
import string
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from starlette.testclient import TestClient

from deployments.bridge.app import create_app
from deployments.bridge.approval import APPROVAL_PAUSE_KEY
from deployments.bridge.auth import authorized
from deployments.bridge.config import BridgeConfig
from deployments.bridge.runs import PrefectRunStarter
from deployments.routes import compile_routes

TOKEN = "test-token-" + "x" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLOSED_API = "http://127.0.0.1:9/api"  # discard port: nothing listens, so any run creation is a 503
TARGET_FLOW = "bridge-test-target"


def payload(*alerts: dict[str, Any], status: str = "firing") -> dict[str, Any]:
    return {"version": "4", "groupKey": "{}:{alertname=\"x\"}", "truncatedAlerts": 0, "status": status,
            "receiver": "runbooks", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager", "alerts": list(alerts)}


def alert(name: str, fingerprint: str, status: str = "firing", starts: str = "2026-11-20T02:00:00Z",
          **labels: str) -> dict[str, Any]:
    return {"status": status, "labels": {"alertname": name, **labels}, "annotations": {"summary": "s"},
            "startsAt": starts, "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": fingerprint}


def config(routes: list[dict[str, Any]], **kwargs: Any) -> BridgeConfig:
    compiled = compile_routes({"routes": routes}, lambda _n: False)
    kwargs.setdefault("respond_within", 30.0)  # answers list the created runs, however busy the harness is
    return BridgeConfig(routes=compiled, tokens=[SecretStr(TOKEN)],
                        basic_users={"alertmanager": SecretStr("basic-pass-0123456789")}, **kwargs)


OFFLINE_ROUTES = [{"name": "fuzz", "alertname": "Fuzz", "deployment": "x/y",
                   "parameters": {"who": "{{ labels.who | default('n') }}"}}]


@pytest.fixture
def offline() -> Iterator[TestClient]:
    app = create_app(config(OFFLINE_ROUTES, max_body_bytes=4096), PrefectRunStarter(CLOSED_API))
    with TestClient(app) as client:
        yield client


# -- authentication, limits, validation (no Prefect API needed) ---------------------------------------------


def test_the_bridge_process_freezes_its_startup_objects_once_warmed_up() -> None:
    """The bridge's own process (freeze_heap, as `runbooks webhook` runs it): after the warm-up the objects
    Prefect's client and the routes left behind are out of the collector's generations, so a full collection
    no longer walks them while requests wait. In a subprocess: freezing pytest's own heap would outlive the test."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import gc, json, time
        from starlette.testclient import TestClient
        from deployments.routes import compile_routes
        from deployments.bridge.app import create_app
        from deployments.bridge.config import BridgeConfig
        from deployments.bridge.runs import PrefectRunStarter
        from pydantic import SecretStr
        routes = compile_routes({{"routes": {OFFLINE_ROUTES!r}}}, lambda _n: False)
        config = BridgeConfig(routes=routes, tokens=[SecretStr("t" * 20)])
        app = create_app(config, PrefectRunStarter({CLOSED_API!r}), freeze_heap=True)
        before = len(gc.get_objects())
        with TestClient(app) as client:
            deadline = time.monotonic() + 30
            while not gc.get_freeze_count() and time.monotonic() < deadline:
                time.sleep(0.05)
            answer = client.get("/healthz").status_code
        print(json.dumps({{"before": before, "frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects()),
                          "healthz": answer}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["healthz"] == 200
    assert seen["frozen"] > seen["before"] / 2 and seen["tracked"] < seen["frozen"] / 4, seen



def test_authorization_header_checks() -> None:
    cfg = config(OFFLINE_ROUTES)
    basic = base64.b64encode(b"alertmanager:basic-pass-0123456789").decode()
    assert authorized(f"Bearer {TOKEN}", cfg)
    assert authorized(f"bearer   {TOKEN} ", cfg)
    assert authorized(f"Basic {basic}", cfg)
    for header in (None, "", "Bearer", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Token {TOKEN}", TOKEN,
                   "Basic " + base64.b64encode(b"alertmanager:wrong").decode(),
                   "Basic " + base64.b64encode(b"other:basic-pass-0123456789").decode(),
                   "Basic " + base64.b64encode(b"no-colon").decode(), "Basic !!!notbase64", "Basic " + "\u00e9"):
        assert not authorized(header, cfg), header
    with pytest.raises(ValueError, match="never accepts anonymous"):
        BridgeConfig(routes=[])
    with pytest.raises(ValueError, match="shorter than 16"):
        BridgeConfig(routes=[], tokens=[SecretStr("REPLACE-ME")])


def test_missing_or_wrong_credentials_get_401(offline: TestClient) -> None:
    body = payload(alert("Fuzz", "f1"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + base64.b64encode(
            b"alertmanager:nope").decode()}):
        r = offline.post("/alertmanager", json=body, headers=headers)
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    # before the body is even read: a huge unauthenticated body is still a 401
    assert offline.post("/alertmanager", content=b"x" * 100_000).status_code == 401
    metrics = offline.get("/metrics").text
    assert 'runbooks_bridge_requests_rejected_total{reason="unauthorized"} 4.0' in metrics


def test_oversized_body_is_413_with_or_without_content_length(offline: TestClient) -> None:
    assert offline.post("/alertmanager", content=b"{" + b" " * 5000 + b"}", headers=AUTH).status_code == 413

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to trust
        for _ in range(10):
            yield b" " * 1000

    assert offline.post("/alertmanager", content=chunks(), headers=AUTH).status_code == 413


@pytest.mark.parametrize("body, reason", [
    (b"not json", "not JSON"),
    (b"[" * 3000 + b"]" * 3000, "JSON"),  # nesting deeper than the parser's recursion limit
    (b"\xff\xfe", "not JSON"),
    (json.dumps([1, 2]).encode(), "Alertmanager v4"),
    (json.dumps({**payload(), "version": 4}).encode(), "version"),
    (json.dumps({k: v for k, v in payload().items() if k != "alerts"}).encode(), "alerts"),
    (json.dumps(payload({"status": "firing", "labels": {"alertname": 1}})).encode(), "alerts.0"),
])
def test_malformed_payloads_get_400_with_the_reason(offline: TestClient, body: bytes, reason: str) -> None:
    app = create_app(config(OFFLINE_ROUTES), PrefectRunStarter(CLOSED_API))  # default 1 MiB limit
    with TestClient(app) as client:
        r = client.post("/alertmanager", content=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]


def test_valid_payload_without_matching_route_is_202_with_reasons(offline: TestClient) -> None:
    r = offline.post("/alertmanager", json=payload(alert("Unrouted", "u1")), headers=AUTH)
    assert r.status_code == 202
    assert r.json() == {"created": [], "pending": [], "skipped": [{"fingerprint": "u1", "alertname": "Unrouted",
                                                                   "reason": "no route matches"}]}
    assert offline.get("/healthz").json()["status"] == "ok"


def test_prefect_api_down_is_503_so_alertmanager_retries(offline: TestClient) -> None:
    r = offline.post("/alertmanager", json=payload(alert("Fuzz", "f1")), headers=AUTH)
    assert r.status_code == 503 and r.headers["Retry-After"]


# -- fuzz: whatever arrives, the answer is never a 500 ------------------------------------------------------

_label_text = st.text(alphabet=string.printable + "\u00e9\u2603\x00", max_size=12)
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), _label_text)
_json = st.recursive(_json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_label_text, inner, max_size=4)), max_leaves=12)
_FIELDS = ["version", "groupKey", "status", "receiver", "groupLabels", "commonLabels", "alerts", "truncatedAlerts"]
_ALERT_FIELDS = ["status", "labels", "annotations", "startsAt", "endsAt", "fingerprint", "generatorURL"]


@st.composite
def mutated_payloads(draw: st.DrawFn) -> Any:
    """A valid notification with a few fields replaced by arbitrary JSON or removed."""
    body = copy.deepcopy(payload(alert("Fuzz", "fp", who="a"), alert("Other", "fp2")))
    for _ in range(draw(st.integers(0, 3))):  # alert fields first: the top level may replace the list
        target = body["alerts"][draw(st.integers(0, 1))]
        key = draw(st.sampled_from(_ALERT_FIELDS))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(_json)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(_FIELDS))
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(_json)
    return body


_bodies = st.one_of(
    mutated_payloads(),
    _json,
    st.binary(max_size=300),
    st.builds(lambda labels, fp, starts: payload({"status": "firing", "labels": {"alertname": "Fuzz", **labels},
                                                  "startsAt": starts, "fingerprint": fp}),
              st.dictionaries(_label_text, _label_text, max_size=3), _label_text,
              st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "0001-01-01T00:00:00Z",
                               "9999-12-31T23:59:59.999999999Z", "2026-02-30T00:00:00Z", ""])),
)


def test_fuzzed_bodies_never_get_a_500(target_deployment: str) -> None:
    """Schema-driven mutations of a valid notification, arbitrary JSON and bytes; routed alerts really create
    runs on the harness API, so rendering and creation are fuzzed too."""
    routes = [{"name": "fuzz", "alertname": "Fuzz", "deployment": target_deployment,
               "parameters": {"who": "{{ labels.who | default('n') }}"}}]
    app = create_app(config(routes, max_body_bytes=2048))
    statuses: set[int] = set()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=_bodies)
    def check(body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = client.post("/alertmanager", content=raw, headers=AUTH)  # server errors raise here: no 500 hides
        assert r.status_code in (202, 400, 413), (r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        statuses.add(r.status_code)

    with TestClient(app) as client:
        check()
    assert {202, 400} <= statuses


# -- against a real Prefect API -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target_deployment(prefect_harness: None) -> str:
    """A deployment of a tiny flow on the harness API (nothing serves it: runs stay where the bridge put them)."""
    from prefect import flow

    @flow(name=TARGET_FLOW)
    def target(who: str = "", tags: list[str] | None = None) -> str:
        return who

    target.to_deployment("bridge", entrypoint_type=_module_path()).apply()
    return f"{TARGET_FLOW}/bridge"


def _module_path() -> Any:
    from prefect.deployments.runner import EntrypointType

    return EntrypointType.MODULE_PATH


def _runs(tag: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def test_one_run_per_notification_across_repeats_and_restarts(target_deployment: str) -> None:
    route = f"dedup-{uuid.uuid4().hex[:8]}"
    routes = [{"name": route, "alertname": "DiskFull", "deployment": target_deployment, "on": "both",
               "parameters": {"who": "{{ labels.instance }}"}}]
    fp = uuid.uuid4().hex[:16]
    body = payload(alert("DiskFull", fp, instance="db-1"))
    with TestClient(create_app(config(routes))) as client:
        first = client.post("/alertmanager", json=body, headers=AUTH)
        assert first.status_code == 202, first.text
        [created] = first.json()["created"]
        assert created["route"] == route and created["awaiting_approval"] is False
        repeat = client.post("/alertmanager", json=body, headers=AUTH).json()  # repeat_interval
        assert repeat["created"] == [] and repeat["skipped"][0]["flow_run_id"] == created["flow_run_id"]
        assert repeat["skipped"][0]["reason"].startswith("duplicate")
        metrics = client.get("/metrics").text
    assert "runbooks_bridge_alerts_deduplicated_total 1.0" in metrics
    created_line = (f'runbooks_bridge_runs_created_total{{approval="false",deployment="{target_deployment}",'
                    f'route="{route}"}} 1.0')
    assert created_line in metrics
    with TestClient(create_app(config(routes))) as restarted:  # a new bridge process: empty memory
        again = restarted.post("/alertmanager", json=body, headers=AUTH).json()
        assert again["created"] == [] and again["skipped"][0]["flow_run_id"] == created["flow_run_id"]
        resolved = restarted.post("/alertmanager", json=payload(alert("DiskFull", fp, status="resolved",
                                                                     instance="db-1"), status="resolved"),
                                  headers=AUTH).json()
        assert len(resolved["created"]) == 1  # on: both -> the resolved notification is a new run
    runs = _runs(f"route:{route}")
    assert len(runs) == 2
    assert {r.parameters["who"] for r in runs} == {"db-1"}
    assert all(r.state.is_scheduled() for r in runs)


def test_cooldown_per_route_and_parameters(target_deployment: str) -> None:
    route = f"cool-{uuid.uuid4().hex[:8]}"
    routes = [{"name": route, "alertname": "Flappy", "deployment": target_deployment, "cooldown": "1h",
               "parameters": {"who": "{{ labels.instance }}"}}]
    with TestClient(create_app(config(routes))) as client:
        one = client.post("/alertmanager", json=payload(alert("Flappy", uuid.uuid4().hex, instance="a")),
                          headers=AUTH).json()
        two = client.post("/alertmanager", json=payload(alert("Flappy", uuid.uuid4().hex, instance="a"),
                                                        alert("Flappy", uuid.uuid4().hex, instance="b")),
                          headers=AUTH).json()
    assert len(one["created"]) == 1
    assert [c["fingerprint"] for c in two["created"]] == [two["created"][0]["fingerprint"]]
    assert two["created"][0]["flow_run_id"] != one["created"][0]["flow_run_id"]
    [cooled] = two["skipped"]
    assert cooled["reason"].startswith("cooldown") and cooled["flow_run_id"] == one["created"][0]["flow_run_id"]
    assert sorted(r.parameters["who"] for r in _runs(f"route:{route}")) == ["a", "b"]


def test_missing_deployment_and_refused_parameters_are_reported_not_500(target_deployment: str) -> None:
    routes = [{"name": "ghost", "alertname": "Ghost", "deployment": "no-such-flow/nowhere"},
              {"name": "badparams", "alertname": "BadParams", "deployment": target_deployment,
               "parameters": {"who": {"not": "a string"}}}]
    with TestClient(create_app(config(routes))) as client:
        r = client.post("/alertmanager", json=payload(alert("Ghost", uuid.uuid4().hex),
                                                      alert("BadParams", uuid.uuid4().hex)), headers=AUTH)
    assert r.status_code == 202
    ghost, bad = r.json()["skipped"]
    assert "not found" in ghost["reason"]
    assert bad["reason"].startswith("parameters refused")


def test_approval_route_creates_a_paused_run_that_waits_for_the_form(target_deployment: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus

    from tasks.approval import BRIDGE_RESPONSE_KEY

    route = f"approve-{uuid.uuid4().hex[:8]}"
    routes = [{"name": route, "alertname": "HighErrorRate", "deployment": target_deployment,
               "require_approval": True, "approval_timeout": "2h", "parameters": {"who": "{{ labels.deployment }}"}}]
    with TestClient(create_app(config(routes))) as client:
        r = client.post("/alertmanager", json=payload(alert("HighErrorRate", uuid.uuid4().hex, deployment="api")),
                        headers=AUTH).json()
    [created] = r["created"]
    assert created["awaiting_approval"] is True
    with get_client(sync_client=True) as api:
        run = api.read_flow_run(created["flow_run_id"])
        assert run.state.is_paused() and run.state.state_details.pause_reschedule
        keyset = run.state.state_details.run_input_keyset
        assert keyset and APPROVAL_PAUSE_KEY in keyset["schema"]
        assert keyset["response"] == BRIDGE_RESPONSE_KEY  # where the flow looks for a rejection
        schema = json.loads(api.read_flow_run_input(run.id, keyset["schema"]))
        assert schema["required"] == ["decision"] and "default" not in schema["properties"]["decision"]
        description = json.loads(api.read_flow_run_input(run.id, keyset["description"]))
        assert "HighErrorRate" in description and f"type `{target_deployment}`" in description
        # the same form as the runbooks' own: no choice, or approving without or with another name, is refused
        for answer in ({"approved_by": "ops"}, {"decision": "approve"},
                       {"decision": "approve", "confirm_target": "rollback/rollback"}):
            assert api.resume_flow_run(run.id, run_input=answer).status == SetStateStatus.REJECT, answer
            assert api.read_flow_run(run.id).state.is_paused()  # starts nothing
        accepted = api.resume_flow_run(run.id, run_input={"decision": "approve", "confirm_target": target_deployment,
                                                          "approved_by": "ops"})
        assert accepted.status == SetStateStatus.ACCEPT
        resumed = api.read_flow_run(run.id)
        assert resumed.state.is_scheduled()  # the runner of the deployment picks it up from here


def test_a_repeat_restores_a_missing_approval_form(target_deployment: str) -> None:
    """The call that created a paused run died before saving the form: the next repeat saves it."""
    from prefect.client.orchestration import get_client

    route = f"approve-{uuid.uuid4().hex[:8]}"
    routes = [{"name": route, "alertname": "Crashy", "deployment": target_deployment, "require_approval": True}]
    body = payload(alert("Crashy", uuid.uuid4().hex))
    with TestClient(create_app(config(routes))) as client:
        [created] = client.post("/alertmanager", json=body, headers=AUTH).json()["created"]
    with get_client(sync_client=True) as api:
        keyset = api.read_flow_run(created["flow_run_id"]).state.state_details.run_input_keyset
        api.delete_flow_run_input(created["flow_run_id"], keyset["schema"])
    with TestClient(create_app(config(routes))) as client:
        again = client.post("/alertmanager", json=body, headers=AUTH).json()
    assert again["skipped"][0]["flow_run_id"] == created["flow_run_id"]
    with get_client(sync_client=True) as api:
        assert "confirm_target" in api.read_flow_run_input(created["flow_run_id"], keyset["schema"])


def test_concurrent_repeats_do_not_wait_for_the_first_creation(target_deployment: str) -> None:
    """Ten copies of one notification at once (HA peers): one API creation; the nine repeats are answered at
    once as duplicates (naming the run when it already exists) instead of queueing behind the creation."""
    import asyncio

    import httpx

    route = f"burst-{uuid.uuid4().hex[:8]}"
    app = create_app(config([{"name": route, "alertname": "Burst", "deployment": target_deployment}]))
    body = json.dumps(payload(alert("Burst", uuid.uuid4().hex))).encode()

    async def post_all() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bridge") as client:
            responses = await asyncio.gather(*(client.post("/alertmanager", content=body, headers=AUTH)
                                               for _ in range(10)))
        await app.state.bridge.starter.aclose()
        return [r.json() for r in responses]

    answers = asyncio.run(post_all())
    created = [c for a in answers for c in a["created"]]
    assert len(created) == 1
    duplicates = [s for a in answers for s in a["skipped"]]
    assert len(duplicates) == 9 and all(d["reason"].startswith("duplicate:") for d in duplicates)
    assert {d.get("flow_run_id") for d in duplicates} <= {created[0]["flow_run_id"], None}
    assert [str(r.id) for r in _runs(f"route:{route}")] == [created[0]["flow_run_id"]]


def test_a_slow_creation_is_answered_as_pending_and_finishes_in_the_background(target_deployment: str) -> None:
    import time

    route = f"slow-{uuid.uuid4().hex[:8]}"
    body = payload(alert("Slow", uuid.uuid4().hex))
    with TestClient(create_app(config([{"name": route, "alertname": "Slow", "deployment": target_deployment}],
                                      respond_within=0.0))) as client:
        first = client.post("/alertmanager", json=body, headers=AUTH).json()
        assert first["created"] == [] and first["pending"][0]["status"] == "creating"
        assert first["pending"][0]["idempotency_key"].startswith("alertmanager-")
        deadline = time.monotonic() + 30
        while not _runs(f"route:{route}") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        repeat = client.post("/alertmanager", json=body, headers=AUTH).json()
    [run] = _runs(f"route:{route}")
    assert repeat["skipped"][0]["flow_run_id"] == str(run.id)


# -- background creation: a failure after the answer is retried or reported, never lost ------------------------


class FaultyApi:
    """The real HTTP transport to the harness API, with faults on ``create_flow_run`` (at the HTTP boundary, so
    the real Prefect client and the bridge's error mapping run): the first ``failures`` POSTs of each alert
    wait ``delay`` s and answer 500, either before the server saw them or after it created the run (the answer
    lost on the way back, for the keys in ``lose_answer``). ``latency``: every creation takes that much longer
    (a busy API; it can be changed while the bridge runs)."""

    def __init__(self, failures: float, delay: float, lose_answer: frozenset[str] = frozenset(),
                 latency: float = 0.0) -> None:
        import collections

        self.failures, self.delay, self.lose_answer, self.latency = failures, delay, lose_answer, latency
        self.attempts: collections.Counter[str] = collections.Counter()

    def starter(self) -> PrefectRunStarter:
        import asyncio

        import httpx

        faults = self

        class Transport(httpx.AsyncBaseTransport):
            def __init__(self) -> None:
                self.real = httpx.AsyncHTTPTransport()

            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                if request.method == "POST" and request.url.path.endswith("/create_flow_run"):
                    key = json.loads(await request.aread())["idempotency_key"]
                    faults.attempts[key] += 1
                    await asyncio.sleep(faults.latency)
                    if faults.attempts[key] <= faults.failures:
                        await asyncio.sleep(faults.delay)
                        if key in faults.lose_answer:
                            await (await self.real.handle_async_request(request)).aread()
                        return httpx.Response(500, json={"exception_message": "Internal Server Error"},
                                              request=request)
                return await self.real.handle_async_request(request)

            async def aclose(self) -> None:
                await self.real.aclose()

        return PrefectRunStarter(httpx_settings={"transport": Transport()})


async def _post_all(app: Any, bodies: list[bytes]) -> list[dict[str, Any]]:
    """POST every body at once through the ASGI app (the app's background creations go on after)."""
    import asyncio

    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bridge") as client:
        responses = await asyncio.gather(*(client.post("/alertmanager", content=b, headers=AUTH) for b in bodies))
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


def _alert_key(route: str, body: dict[str, Any]) -> str:
    from deployments.routes import Alert, dedup_key

    return dedup_key(route, Alert.model_validate(body))


def test_background_creations_that_fail_are_retried_until_each_alert_has_one_run(target_deployment: str) -> None:
    """The bench's missing run: creations answered as pending whose API call then failed (500 after the answer;
    for half of them the server had made the run). Every alert ends with exactly one run, and the bridge's
    dedup memory names that run."""
    import asyncio

    route = f"flaky-{uuid.uuid4().hex[:8]}"
    alerts = {fp: alert("Flaky", fp) for fp in (uuid.uuid4().hex[:16] for _ in range(8))}
    keys = {fp: _alert_key(route, a) for fp, a in alerts.items()}
    api = FaultyApi(failures=1, delay=0.3, lose_answer=frozenset(list(keys.values())[::2]))
    app = create_app(config([{"name": route, "alertname": "Flaky", "deployment": target_deployment,
                              "parameters": {"who": "{{ alert.fingerprint }}"}}],
                            respond_within=0.05, retry_backoff=0.1), api.starter())

    async def scenario() -> list[dict[str, Any]]:
        try:  # 3 copies of each notification, all at once (repeats, HA peers)
            return await _post_all(app, [json.dumps(payload(a)).encode() for a in alerts.values()] * 3)
        finally:
            await app.state.bridge.drain(timeout=60)
            await app.state.bridge.starter.aclose()

    answers = asyncio.run(scenario())
    pending = [p["fingerprint"] for a in answers for p in a["pending"]]
    assert sorted(pending) == sorted(alerts)  # answered before the failure: Alertmanager will not retry them
    runs = _runs(f"route:{route}")
    assert sorted(r.parameters["who"] for r in runs) == sorted(alerts)  # one run each, none lost or doubled
    assert all(api.attempts[k] >= 2 for k in keys.values()), api.attempts  # more: the harness's SQLite 503s
    metrics = app.state.metrics.render().decode()
    assert "runbooks_bridge_creation_retries_total 8.0" in metrics
    assert "runbooks_bridge_creations_in_flight 0.0" in metrics
    assert 'runbooks_bridge_requests_rejected_total{reason="unavailable"} 0.0' in metrics  # no request refused
    remembered = {fp: app.state.bridge._seen.get(key) for fp, key in keys.items()}
    assert remembered == {r.parameters["who"]: str(r.id) for r in runs}  # dedup memory names runs that exist


def test_a_pending_creation_that_keeps_failing_is_reported_and_not_deduplicated(
        target_deployment: str, caplog: pytest.LogCaptureFixture) -> None:
    """Retries run out: counted and logged with the alert, and the next repeat creates the run (once)."""
    import asyncio
    import logging

    route = f"doomed-{uuid.uuid4().hex[:8]}"
    fp = uuid.uuid4().hex[:16]
    body = json.dumps(payload(alert("Doomed", fp))).encode()
    api = FaultyApi(failures=float("inf"), delay=0.1)
    app = create_app(config([{"name": route, "alertname": "Doomed", "deployment": target_deployment}],
                            respond_within=0.05, retry_for=0.5, retry_backoff=0.1), api.starter())

    async def scenario() -> tuple[dict[str, Any], list[Any], str, dict[str, Any]]:
        try:
            [first] = await _post_all(app, [body])
            await app.state.bridge.drain(timeout=30)
            runs_meanwhile = _runs(f"route:{route}")
            metrics = app.state.metrics.render().decode()
            api.failures = 0  # the API is back: Alertmanager's next repeat
            [repeat] = await _post_all(app, [body])
            await app.state.bridge.drain(timeout=30)
            return first, runs_meanwhile, metrics, repeat
        finally:
            await app.state.bridge.starter.aclose()

    with caplog.at_level(logging.ERROR, logger="runbooks.webhook"):
        first, runs_meanwhile, metrics, repeat = asyncio.run(scenario())
    assert [p["fingerprint"] for p in first["pending"]] == [fp]
    assert runs_meanwhile == []
    assert 'runbooks_bridge_creations_failed_total{reason="retries_exhausted"} 1.0' in metrics
    assert api.attempts[_alert_key(route, alert("Doomed", fp))] >= 3  # the first try and at least two retries
    assert any(fp in r.getMessage() and "no flow run created" in r.getMessage() for r in caplog.records)
    # not remembered as handled: the repeat is not a duplicate, it creates the run
    assert repeat["skipped"] == [] and len(repeat["created"] + repeat["pending"]) == 1
    assert len(_runs(f"route:{route}")) == 1


def test_a_creation_cut_short_by_shutdown_is_reported(target_deployment: str) -> None:
    import asyncio

    route = f"stopped-{uuid.uuid4().hex[:8]}"
    api = FaultyApi(failures=1, delay=60)  # the API hangs past the shutdown deadline
    app = create_app(config([{"name": route, "alertname": "Stopped", "deployment": target_deployment}],
                            respond_within=0.05), api.starter())

    async def scenario() -> dict[str, Any]:
        try:
            [answer] = await _post_all(app, [json.dumps(payload(alert("Stopped", uuid.uuid4().hex))).encode()])
            await app.state.bridge.drain(timeout=0.2)
            return answer
        finally:
            await app.state.bridge.starter.aclose()

    assert len(asyncio.run(scenario())["pending"]) == 1
    metrics = app.state.metrics.render().decode()
    assert 'runbooks_bridge_creations_failed_total{reason="shutdown"} 1.0' in metrics
    assert "runbooks_bridge_creations_in_flight 0.0" in metrics


def test_first_copies_stop_waiting_while_creations_are_slower_than_the_window(target_deployment: str) -> None:
    """An alert storm: while another creation is in flight, or once creations take longer than
    --respond-within, a first copy is answered at once (pending, with its key) instead of waiting out the window
    for nothing; when the API is calm again, answers name their runs again. Every alert gets exactly one run."""
    import asyncio
    import time

    route = f"storm-{uuid.uuid4().hex[:8]}"
    api = FaultyApi(failures=0, delay=0, latency=4.0)
    app = create_app(config([{"name": route, "alertname": "Storm", "deployment": target_deployment}],
                            respond_within=1.0), api.starter())
    bridge = app.state.bridge

    async def timed_post() -> tuple[float, dict[str, Any]]:
        started = time.monotonic()
        [answer] = await _post_all(app, [json.dumps(payload(alert("Storm", uuid.uuid4().hex))).encode()])
        return time.monotonic() - started, answer

    async def settle() -> None:
        while bridge._in_flight:
            await asyncio.sleep(0.05)

    async def post_later(delay: float) -> tuple[float, dict[str, Any]]:
        await asyncio.sleep(delay)
        return await timed_post()

    async def scenario() -> list[tuple[float, dict[str, Any]]]:
        try:
            # The first waits the whole window (creations were fast so far); the second, 0.1 s later, finds the
            # first's creation in flight and is answered at once.
            answers = list(await asyncio.gather(timed_post(), post_later(0.1)))
            await settle()
            answers.append(await timed_post())  # alone, but the last creations took 4 s: answered at once
            await settle()
            api.latency = 0.0
            for _ in range(8):  # fast creations bring the average back under the window
                answers.append(await timed_post())
                await settle()
                if answers[-1][1]["created"]:
                    break
            return answers
        finally:
            await bridge.starter.aclose()

    answers = asyncio.run(scenario())
    (first_s, first), (concurrent_s, concurrent), (after_s, after) = answers[:3]
    assert first["pending"] and first_s >= 1.0
    assert concurrent["pending"] and concurrent_s < 0.5
    assert after["pending"] and after_s < 0.5
    assert answers[-1][1]["created"], [a for _, a in answers]  # named its run again
    assert len(_runs(f"route:{route}")) == len(answers)
