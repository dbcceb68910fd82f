"""Alert routing, templates, dedup keys and the routes file: pure functions, no service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deployments.routes import (
    Matcher,
    Notification,
    RoutesError,
    Skip,
    Trigger,
    compile_routes,
    cooldown_key,
    dedup_key,
    load_routes,
    parse_duration,
    plan,
    registry_destructive,
)

ROOT = Path(__file__).resolve().parent.parent


def alert(name: str = "BackupMissing", status: str = "firing", fingerprint: str = "f1",
          starts: str = "2026-11-20T02:00:00Z", **labels: str) -> dict[str, Any]:
    return {"status": status, "labels": {"alertname": name, **labels},
            "annotations": {"summary": "no backup for 26h"}, "startsAt": starts,
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom/graph", "fingerprint": fingerprint}


def notification(*alerts: dict[str, Any], status: str = "firing") -> Notification:
    return Notification.model_validate({
        "version": "4", "groupKey": '{}:{alertname="x"}', "truncatedAlerts": 0, "status": status,
        "receiver": "runbooks", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://am", "alerts": list(alerts)})


def routes(*entries: dict[str, Any], defaults: dict[str, Any] | None = None, destructive: bool | None = False):
    data: dict[str, Any] = {"routes": list(entries)}
    if defaults:
        data["defaults"] = defaults
    return compile_routes(data, lambda _name: destructive)


def test_matchers_follow_alertmanager_semantics() -> None:
    labels = {"severity": "critical", "env": "prod", "job": "api-7"}
    assert Matcher.parse('severity="critical"').matches(labels)
    assert not Matcher.parse('severity!="critical"').matches(labels)
    assert Matcher.parse('severity=~"critical|page"').matches(labels)
    assert not Matcher.parse('job=~"api"').matches(labels)  # anchored: a partial match is no match
    assert Matcher.parse('job=~"api-[0-9]+"').matches(labels)
    assert Matcher.parse('job!~"db.*"').matches(labels)
    assert Matcher.parse('missing=""').matches(labels)  # an absent label is the empty string
    assert not Matcher.parse('missing=~".+"').matches(labels)
    assert Matcher.parse(r'note="say \"hi\""').matches({"note": 'say "hi"'})
    for bad in ("severity", 'severity=="x"', "severity=critical", 'x=~"("', '1abc="x"'):
        with pytest.raises(ValueError):
            Matcher.parse(bad)


def test_first_match_wins_unless_continue() -> None:
    table = routes(
        {"name": "a", "alertname": "BackupMissing", "deployment": "backup/nightly", "continue": True},
        {"name": "b", "matchers": ['alertname=~"Backup.*"'], "deployment": "verify-backup/after-nightly"},
        {"name": "c", "alertname": "BackupMissing", "deployment": "backup/nightly"},
    )
    steps = plan(notification(alert()), table)
    assert [s.route.name for s in steps if isinstance(s, Trigger)] == ["a", "b"]
    steps = plan(notification(alert("Other")), table)
    assert steps == [Skip("f1", "Other", "no route matches")]


def test_on_firing_resolved_both() -> None:
    table = routes(
        {"name": "fire", "alertname": "A", "deployment": "x/y", "on": "firing", "continue": True},
        {"name": "res", "alertname": "A", "deployment": "x/y", "on": "resolved", "continue": True},
        {"name": "both", "alertname": "A", "deployment": "x/y", "on": "both"},
    )
    fired = plan(notification(alert("A")), table)
    assert [s.route.name for s in fired if isinstance(s, Trigger)] == ["fire", "both"]
    assert [s.route for s in fired if isinstance(s, Skip)] == ["res"]
    resolved = plan(notification(alert("A", status="resolved"), status="resolved"), table)
    assert [s.route.name for s in resolved if isinstance(s, Trigger)] == ["res", "both"]
    skip = next(s for s in resolved if isinstance(s, Skip))
    assert skip.route == "fire" and "acts on firing" in skip.reason


def test_parameters_are_templated_from_labels_annotations_and_alert() -> None:
    table = routes({
        "name": "rb", "alertname": "HighErrorRate", "deployment": "rollback/rollback",
        "parameters": {
            "deployment": "{{ labels.deployment }}",
            "namespace": "{{labels.namespace|default('default')}}",
            "reason": "{{ annotations.summary }} ({{ alert.fingerprint }}, {{ alert.startsAt }})",
            "nested": {"list": ["{{ labels.alertname }}", 3, True]},
            "plain": 42,
        },
    })
    [step] = plan(notification(alert("HighErrorRate", deployment="api")), table)
    assert isinstance(step, Trigger)
    assert step.parameters == {
        "deployment": "api", "namespace": "default",
        "reason": "no backup for 26h (f1, 2026-11-20T02:00:00+00:00)",
        "nested": {"list": ["HighErrorRate", 3, True]}, "plain": 42,
    }
    [missing] = plan(notification(alert("HighErrorRate")), table)  # no deployment label, no default
    assert isinstance(missing, Skip) and "no label 'deployment'" in missing.reason


def test_templates_are_checked_when_the_file_loads() -> None:
    for bad in ("{{ labels.x | upper }}", "{{ config.secret }}", "{{ alert.nope }}", "{% if x %}y{% endif %}x{{"):
        with pytest.raises(RoutesError):
            routes({"name": "r", "alertname": "A", "deployment": "x/y", "parameters": {"p": bad}})


def test_dedup_key_is_fingerprint_status_starts_at_and_route() -> None:
    a = Notification.model_validate(notification(alert()).model_dump(mode="json")).alerts[0]
    same = notification(alert(starts="2026-11-20T03:00:00+01:00")).alerts[0]  # same instant, other offset
    assert dedup_key("r", a) == dedup_key("r", same)
    assert dedup_key("r", a) != dedup_key("r2", a)
    assert dedup_key("r", a) != dedup_key("r", notification(alert(status="resolved")).alerts[0])
    assert dedup_key("r", a) != dedup_key("r", notification(alert(starts="2026-11-21T02:00:00Z")).alerts[0])
    assert dedup_key("r", a) != dedup_key("r", notification(alert(fingerprint="f2")).alerts[0])
    assert len(dedup_key("r", a)) <= 64
    assert cooldown_key("r", {"a": 1, "b": 2}) == cooldown_key("r", {"b": 2, "a": 1})
    assert cooldown_key("r", {"a": 1}) != cooldown_key("r", {"a": 2})


def test_approval_defaults_to_destructive_and_unknown_deployments_must_say() -> None:
    entry = {"name": "r", "alertname": "A", "deployment": "rollback/rollback"}
    assert routes(entry, destructive=True)[0].require_approval is True
    assert routes(entry, destructive=False)[0].require_approval is False
    assert routes({**entry, "require_approval": False}, destructive=True)[0].require_approval is False
    with pytest.raises(RoutesError, match="not in the runbook registry"):
        routes(entry, destructive=None)
    assert routes({**entry, "require_approval": True}, destructive=None)[0].require_approval is True
    assert registry_destructive("rollback/rollback") is True
    assert registry_destructive("backup/nightly") is False
    assert registry_destructive("custom/thing") is None


def test_durations_and_defaults() -> None:
    assert parse_duration(90) == 90 and parse_duration("90s") == 90 and parse_duration("10m") == 600
    assert parse_duration("2h") == 7200 and parse_duration("1d") == 86400 and parse_duration("250ms") == 0.25
    for bad in ("ten minutes", "-5", -1, True, "5w"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    [r] = routes({"name": "r", "alertname": "A", "deployment": "x/y"}, defaults={"cooldown": "5m"})
    assert r.cooldown == 300 and r.approval_timeout == 86400
    [r] = routes({"name": "r", "alertname": "A", "deployment": "x/y", "cooldown": 0, "approval_timeout": "1h"},
                 defaults={"cooldown": "5m"})
    assert r.cooldown == 0 and r.approval_timeout == 3600


@pytest.mark.parametrize("entries, message", [
    ([{"name": "r", "deployment": "x/y"}], "would match all"),
    ([{"name": "r", "alertname": "A", "deployment": "nodeployment"}], "deployment"),
    ([{"name": "r", "alertname": "A", "deployment": "x/y", "on": "sometimes"}], "on"),
    ([{"name": "r", "alertname": "A", "deployment": "x/y", "colldown": "5m"}], "colldown"),
    ([{"name": "r", "alertname": "A", "deployment": "x/y"}, {"name": "r", "alertname": "B", "deployment": "x/y"}],
     "used twice"),
    ([{"name": "r", "alertname": "A", "deployment": "x/y", "matchers": ["sev=critical"]}], "matcher"),
])
def test_bad_routes_files_say_what_is_wrong(entries: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(RoutesError, match=message):
        routes(*entries)


def test_yaml_on_key_and_the_shipped_example() -> None:
    text = "routes:\n  - name: r\n    alertname: A\n    deployment: x/y\n    on: resolved\n"
    [r] = load_routes(text, lambda _n: False)
    assert r.on == "resolved"  # YAML 1.1 reads a bare `on` as True; the loader gives it back
    with pytest.raises(RoutesError, match="YAML"):
        load_routes("routes: [", lambda _n: False)
    example = load_routes((ROOT / "deployments/routes.example.yaml").read_text(), registry_destructive)
    by_name = {r.name: r for r in example}
    assert by_name["backup-missing"].deployment == "backup/nightly"
    assert by_name["backup-missing"].require_approval is False
    assert by_name["high-error-rate-after-deploy"].deployment == "rollback/rollback"
    assert by_name["high-error-rate-after-deploy"].require_approval is True
    assert by_name["connection-pool-exhausted"].deployment == "db-integrity-check/weekly"
    [step] = plan(notification(alert("HighErrorRate", deployment="api", severity="critical")), example)
    assert isinstance(step, Trigger) and step.parameters["deployment"] == "api"


def test_payload_validation_rejects_what_alertmanager_never_sends() -> None:
    good = notification(alert()).model_dump(mode="json")
    Notification.model_validate(good)
    for broken in (
        {**good, "version": "3"},
        {**good, "alerts": [{**good["alerts"][0], "fingerprint": ""}]},
        {**good, "alerts": [{**good["alerts"][0], "labels": {"alertname": 5}}]},
        {**good, "alerts": [{**good["alerts"][0], "startsAt": "yesterday"}]},
        {**good, "alerts": [{**good["alerts"][0], "startsAt": "2026-11-20T02:00:00"}]},  # no timezone
        {**good, "status": "pending"},
        {k: v for k, v in good.items() if k != "alerts"},
    ):
        with pytest.raises(ValueError):
            Notification.model_validate(broken)
