"""Silences through the real Alertmanager (Debian's prometheus-alertmanager, basic auth): matcher parsing,
a silence that always ends, expiring it, and the alerts it suppresses never reaching the receiver."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from blocks.errors import ConfigurationError
from tasks.alertmanager import (
    create_silence,
    expire_silence,
    list_alerts,
    matchers_of,
    parse_matcher,
    read_silence,
    silence_end,
    suppressed_by,
)
from tests.alertmanager_fixture import Alertmanager


def test_matchers_parse_as_amtool_writes_them() -> None:
    assert parse_matcher('alertname="HighErrorRate"') == {"name": "alertname", "value": "HighErrorRate",
                                                          "isRegex": False, "isEqual": True}
    assert parse_matcher("env!=staging") == {"name": "env", "value": "staging", "isRegex": False, "isEqual": False}
    assert parse_matcher('service=~"api|worker"')["isRegex"] is True
    assert parse_matcher('instance!~"db-.*"') == {"name": "instance", "value": "db-.*", "isRegex": True,
                                                  "isEqual": False}
    assert parse_matcher('msg="say \\"hi\\""')["value"] == 'say "hi"'
    for bad in ["", "alertname", "1abc=x", 'x=~"("']:
        with pytest.raises(ConfigurationError):
            parse_matcher(bad)


def test_a_silence_of_everything_is_refused() -> None:
    for texts in [[], ["env!=prod"], ['alertname=~".*"'], ['alertname=""']]:
        with pytest.raises(ConfigurationError):
            matchers_of(texts)
    assert len(matchers_of(["env!=prod", "service=api"])) == 2


def test_silence_end_is_bounded() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert silence_end(start, 30, 15) == start + timedelta(minutes=45)
    with pytest.raises(ConfigurationError):
        silence_end(start, 0, 15)
    with pytest.raises(ConfigurationError):
        silence_end(start, 24 * 60, 1)


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    am = Alertmanager(tmp_path_factory.mktemp("alertmanager")).start()
    yield am
    am.stop()


def test_silence_suppresses_until_expired(alertmanager: Alertmanager) -> None:
    am = alertmanager.block()
    labels = {"alertname": "AppDown", "service": "shop-" + str(time.monotonic_ns())}
    ends = datetime.now(UTC) + timedelta(minutes=20)
    silence = create_silence.fn(am, ["alertname=AppDown", f'service="{labels["service"]}"'], ends,
                                created_by="test", comment="window")
    assert silence.state == "active"
    assert abs((silence.ends_at - ends).total_seconds()) < 1  # never open-ended: the end we asked for
    alertmanager.post_alert(labels)
    other = {"alertname": "AppDown", "service": "other-" + str(time.monotonic_ns())}
    alertmanager.post_alert(other)
    deadline = time.monotonic() + 15
    while other["service"] not in {a["labels"].get("service") for n in alertmanager.receiver.notifications
                                   for a in n.get("alerts", [])}:
        assert time.monotonic() < deadline, "the unsilenced alert never reached the receiver"
        time.sleep(0.2)
    seen = list_alerts.fn(am, [f'service="{labels["service"]}"'])
    assert [a.labels["service"] for a in suppressed_by(seen, silence.id)] == [labels["service"]]
    served = {a["labels"].get("service") for n in alertmanager.receiver.notifications for a in n.get("alerts", [])}
    assert labels["service"] not in served

    expired = expire_silence.fn(am, silence.id)
    assert expired.state == "expired" and read_silence.fn(am, silence.id).state == "expired"
    assert expire_silence.fn(am, silence.id).state == "expired"  # idempotent
    deadline = time.monotonic() + 15
    while labels["service"] not in {a["labels"].get("service") for n in alertmanager.receiver.notifications
                                    for a in n.get("alerts", [])}:
        assert time.monotonic() < deadline, "after the silence expired the alert should be delivered"
        time.sleep(0.2)


def test_wrong_credentials_are_a_configuration_error_without_the_secret(alertmanager: Alertmanager) -> None:
    from blocks.alertmanager import AlertmanagerAPI

    wrong = "wrong-" + alertmanager.password[::-1]
    block = AlertmanagerAPI(url=alertmanager.url, username="runbooks", password=SecretStr(wrong))
    with pytest.raises(ConfigurationError) as info:
        create_silence.fn(block, ["alertname=X"], datetime.now(UTC) + timedelta(minutes=5), created_by="t",
                          comment="c")
    assert "401" in str(info.value) and wrong not in str(info.value)
    assert alertmanager.password not in repr(alertmanager.block())


def test_past_or_too_long_silence_is_refused_before_any_call(alertmanager: Alertmanager) -> None:
    am = alertmanager.block()
    with pytest.raises(ConfigurationError):
        create_silence.fn(am, ["alertname=X"], datetime.now(UTC) - timedelta(minutes=1), created_by="t", comment="c")
    with pytest.raises(ConfigurationError):
        create_silence.fn(am, ["alertname=X"], datetime.now(UTC) + timedelta(days=3), created_by="t", comment="c")
