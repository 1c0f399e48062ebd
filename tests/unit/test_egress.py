"""Webhook URLs must not reach genq's own network (SSRF): what is refused at submit, in every form
the resolver reads, what GENQ_WEBHOOK_ALLOW_NETWORKS lets through, and the 400 the API answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from genq.services.egress import AddressPolicy
from genq.services.webhooks import validate_subscription
from genq.shared.config import ConfigError, build_settings
from tests.support.app import api_client
from tests.support.resolver import fake_resolver

INTERNAL = [
    "http://127.0.0.1:6379/", "http://localhost:5432/", "http://LOCALHOST/", "http://[::1]:8000/",
    "http://0.0.0.0/", "http://2130706433/", "http://127.1/", "http://0177.0.0.1/", "http://0x7f.0.0.1/",
    "http://user:pw@127.0.0.1/", "http://evil.example\\@127.0.0.1/",
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/",  # link-local: the metadata service
    "http://10.0.0.1/", "http://172.16.5.4/", "http://192.168.1.1/", "http://100.64.0.1/", "http://[fd00::1]/",
    "http://224.0.0.1/", "http://[ff02::1]/", "http://240.0.0.1/", "http://255.255.255.255/", "http://[::]/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:a9fe:a9fe]/", "http://[64:ff9b::7f00:1]/",
    "http://[2002:a9fe:a9fe::1]/", "https://198.51.100.7/",  # a documentation block: reserved
]


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_addresses_are_refused_in_every_form(url: str) -> None:
    with pytest.raises(ValueError, match="is not allowed: webhooks are not sent to loopback") as err:
        validate_subscription(url, None)
    assert f"host '{urlsplit(url).hostname}'" in str(err.value)  # the URL's host, not what it resolved to


def test_names_that_resolve_to_internal_addresses_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(monkeypatch, {"metadata.example": ["169.254.169.254"], "mixed.example": ["93.184.216.34", "10.0.0.7"],
                                "public.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    for url in ("https://metadata.example/h", "https://mixed.example/h"):  # one bad answer is enough
        with pytest.raises(ValueError, match=r"host '\w+\.example' is not allowed") as err:
            validate_subscription(url, None)
        assert "169.254" not in str(err.value) and "10.0.0.7" not in str(err.value)
    public = "https://public.example/h"
    assert validate_subscription(public, ["completed"]) == (public, ["completed"])


def test_public_addresses_and_names_that_do_not_resolve_yet_are_accepted() -> None:
    for url in ("https://93.184.216.34/h", "http://[2606:2800:220:1::1]:8080/h", "https://hooks.invalid/h"):
        assert validate_subscription(url, None) == (url, None)  # the last is checked again at delivery


@pytest.mark.parametrize(("url", "message"), [
    ("http://a..b/h", "host 'a..b' is not a valid host name"),
    (f"http://{'a' * 64}.example/h", "is not a valid host name"),
    ("http://xn--/h", "not a URL webhooks can be sent to"),
])
def test_hosts_that_cannot_be_looked_up_are_refused_clearly(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        validate_subscription(url, None)
    assert "idna" not in str(err.value)


def test_allowed_networks_let_their_addresses_through_and_nothing_else() -> None:
    settings = build_settings(webhook_allow_networks="10.1.0.0/16, 127.0.0.0/8  fd00:1::/32")
    policy = AddressPolicy(allow=settings.webhook_allow_networks)
    for url in ("http://10.1.2.3:8080/h", "http://127.0.0.1/h", "http://127.1/h", "http://[::ffff:127.0.0.1]/h",
                "http://localhost/h", "http://[fd00:1::5]/h"):
        assert validate_subscription(url, None, policy)[0] == url
    for url in ("http://10.2.0.1/h", "http://169.254.169.254/", "http://[::1]/h", "http://192.168.0.1/"):
        with pytest.raises(ValueError, match="is not allowed"):
            validate_subscription(url, None, policy)


@pytest.mark.parametrize("value", ["10.1.0.1/16", "not-a-network", "10.1.0.0/33"])
def test_a_bad_allowed_network_stops_the_process_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError, match="GENQ_WEBHOOK_ALLOW_NETWORKS"):
        build_settings(webhook_allow_networks=value)


def _line(**extra: Any) -> dict[str, Any]:
    return {"custom_id": "a", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "x"}, **extra}


SUBMISSIONS: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
    ("/v1/jobs", lambda url: _line(webhook_url=url)),
    ("/v1/batches", lambda url: {"requests": [_line()], "webhook_url": url}),
    ("/v1/batches", lambda url: {"requests": [_line(webhook_url=url)]}),  # a batch line's own
]


def test_the_api_refuses_internal_webhook_urls_with_a_400(tmp_path: Path) -> None:
    with api_client(tmp_path) as c:
        for path, body in SUBMISSIONS:
            r = c.post(path, json=body("http://169.254.169.254/latest/meta-data/"))
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_request", "webhook_url")
            assert "'169.254.169.254' is not allowed" in error["message"]


def test_the_allow_setting_admits_an_in_cluster_receiver(tmp_path: Path) -> None:
    with api_client(tmp_path, webhook_allow_networks="10.1.0.0/16") as c:
        for path, body in SUBMISSIONS[:2]:
            assert c.post(path, json=body("http://10.1.0.9:8080/hook")).status_code == 202
        assert c.post("/v1/jobs", json=_line(webhook_url="http://10.2.0.9/hook")).status_code == 400


def test_a_batch_looks_each_webhook_host_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_resolver(monkeypatch, {"hooks.example": ["93.184.216.34"], "inside.example": ["10.0.0.3"]})
    lines = [{**_line(webhook_url=f"https://hooks.example/h/{i}"), "custom_id": f"c{i}"} for i in range(200)]
    with api_client(tmp_path) as c:
        assert c.post("/v1/batches", json={"requests": lines}).status_code == 202
        assert asked == ["hooks.example"]
        bad = [*lines[:3], {**_line(webhook_url="https://inside.example/h"), "custom_id": "x"}]
        r = c.post("/v1/batches", json={"requests": bad})
    assert r.status_code == 400 and r.json()["error"]["line"] == 4, r.text
    assert asked == ["hooks.example", "hooks.example", "inside.example"]  # a new batch asks again
