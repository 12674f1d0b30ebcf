"""Webhook signatures and the URL checks made at submit time (server.webhooks), and the shared address policy
(server.netcheck). Names resolve from /etc/hosts only (`localhost`) or are IP literals: no DNS, no sockets."""

from __future__ import annotations

import hashlib
import hmac
from ipaddress import ip_address
from urllib.parse import urlsplit

import pytest

from server import netcheck
from server.service import BadRequest
from server.settings import Settings
from server.webhooks import check_webhook_url, delivery_id, sign, verify_signature

SECRET = "whsec-test"
BODY = b'{"id":"job-1","status":"succeeded"}'
T = 1_700_000_000


# --- signatures ----------------------------------------------------------------------------------------------


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, T, BODY) == f"t={T},v1={expected}"


def test_signature_round_trip():
    header = sign(SECRET, T, BODY)
    assert verify_signature(SECRET, header, BODY, now=T)
    assert verify_signature(SECRET, header, BODY, now=T + 299)
    assert verify_signature(SECRET, header.replace(",", ", "), BODY, now=T)  # spaces after commas are fine


@pytest.mark.parametrize("tamper", ["body", "secret", "mac", "timestamp"])
def test_a_tampered_delivery_fails(tamper):
    header, body, secret = sign(SECRET, T, BODY), BODY, SECRET
    if tamper == "body":
        body = BODY.replace(b"succeeded", b"failed")
    elif tamper == "secret":
        secret = SECRET + "x"
    elif tamper == "mac":
        header = header[:-1] + ("0" if header[-1] != "0" else "1")
    else:  # a fresh timestamp on an old signature
        header = header.replace(f"t={T}", f"t={T + 1}")
    assert not verify_signature(secret, header, body, now=T)


def test_stale_and_future_timestamps_fail():
    header = sign(SECRET, T, BODY)
    assert not verify_signature(SECRET, header, BODY, now=T + 301)
    assert not verify_signature(SECRET, header, BODY, now=T - 301)
    assert verify_signature(SECRET, header, BODY, now=T + 3000, tolerance=3600)


@pytest.mark.parametrize("header", ["", "garbage", f"t={T}", "v1=abc", f"t=x{T},v1=abc", f"t=-{T},v1=abc",
                                    f"t={T},t={T},v1=abc"])
def test_malformed_headers_fail(header):
    assert not verify_signature(SECRET, header, BODY, now=T)


def test_any_of_several_macs_may_match():
    good = sign(SECRET, T, BODY).rpartition("v1=")[2]
    assert verify_signature(SECRET, f"t={T},v1={'0' * 64},v1={good}", BODY, now=T)


def test_delivery_id_is_stable():
    assert delivery_id("abc") == delivery_id("abc") == "whd_abc"


# --- URL checks ----------------------------------------------------------------------------------------------


def settings(hosts: list[str], secret: str | None = SECRET) -> Settings:
    return Settings(allowed_webhook_hosts=hosts, webhook_secret=secret, webhook_timeout=2.0)


async def refused(url: str, s: Settings) -> str:
    with pytest.raises(BadRequest) as info:
        await check_webhook_url(url, s)
    assert info.value.status == 400
    return str(info.value)


async def test_webhooks_off_without_hosts_or_secret():
    off = await refused("https://93.184.215.14/h", settings([]))
    assert "turned off" in off and "JANUS_ALLOWED_WEBHOOK_HOSTS" in off
    assert "JANUS_WEBHOOK_SECRET" in await refused("https://93.184.215.14/h", settings(["93.184.215.14"], None))
    assert "JANUS_WEBHOOK_SECRET" in await refused("https://93.184.215.14/h", settings(["93.184.215.14"], ""))


@pytest.mark.parametrize(("url", "problem"), [
    ("https://93.184.215.14/" + "a" * 2048, "longer than 2048"),
    ("https://[::1/x", "not a valid URL"),
    ("https://93.184.215.14:99999/x", "not a valid URL"),
    ("https://93.184.215.14:0/x", "port"),
    ("https://93.184.215.14/a b", "ASCII without spaces"),
    ("https://93.184.215.14/\n", "ASCII without spaces"),
    ("https://b\u00fccher.example/x", "ASCII"),
    ("93.184.215.14/hook", "https:// URL"),
    ("ftp://93.184.215.14/hook", "https:// URL (got scheme 'ftp')"),
    ("https:///hook", "no host"),
    ("https://user:pw@93.184.215.14/hook", "credentials"),
    ("https://user@93.184.215.14/hook", "credentials"),
    ("https://@93.184.215.14/hook", "credentials"),
    ("https://93.184.215.15/hook", "'93.184.215.15' is not in JANUS_ALLOWED_WEBHOOK_HOSTS"),
    ("https://evil.example/hook", "'evil.example' is not in JANUS_ALLOWED_WEBHOOK_HOSTS"),
])
async def test_malformed_and_unlisted_urls_are_refused(url, problem):
    assert problem in await refused(url, settings(["93.184.215.14", "localhost"]))


async def test_plain_http_only_to_a_listed_ip_literal():
    s = settings(["localhost", "127.0.0.1", "::1"])
    assert "must use https" in await refused("http://localhost:8080/hook", s)
    assert await check_webhook_url("http://127.0.0.1:8080/hook", s) == "http://127.0.0.1:8080/hook"
    assert await check_webhook_url("http://[::1]:8080/hook", s) == "http://[::1]:8080/hook"
    assert "'127.0.0.2' is not in" in await refused("http://127.0.0.2:8080/hook", s)


async def test_a_listed_name_resolving_inside_is_refused_unless_the_address_is_listed():
    message = await refused("https://localhost/hook", settings(["localhost"]))
    assert "'localhost' resolves to the internal address" in message and "JANUS_ALLOWED_WEBHOOK_HOSTS" in message
    # localhost may also resolve to ::1: list both addresses it may answer with
    assert await check_webhook_url("https://localhost/hook", settings(["localhost", "127.0.0.1", "::1"])) \
        == "https://localhost/hook"


async def test_an_unresolvable_listed_name_is_refused():
    message = await refused("https://nothing-here.invalid/hook", settings(["nothing-here.invalid"]))
    assert "cannot resolve" in message or "took over" in message


async def test_the_url_comes_back_normalised():
    s = settings(["93.184.215.14", "LocalHost", "127.0.0.1", "::1"])
    assert await check_webhook_url("HTTPS://93.184.215.14:443?x=1#frag", s) == "https://93.184.215.14/?x=1"
    assert await check_webhook_url("https://LOCALHOST:8443/A/b?c=D", s) == "https://localhost:8443/A/b?c=D"


# --- the shared address policy -------------------------------------------------------------------------------


def test_listed_hosts_compare_names_case_blind_and_addresses_by_value():
    assert netcheck.is_listed("example.com", ["Example.COM"]) and netcheck.is_listed("EXAMPLE.com", ["example.com"])
    assert netcheck.is_listed("::1", ["0:0::1"]) and netcheck.is_listed("::1", ["[::1]"])
    assert not netcheck.is_listed("127.0.0.2", ["127.0.0.1", "localhost"])
    assert not netcheck.is_listed("evil.example.com", ["example.com"])


async def test_resolve_checked_refuses_unlisted_internal_addresses():
    with pytest.raises(netcheck.AddressRefused, match="internal address 127.0.0.1; list that address in X"):
        await netcheck.resolve_checked("127.0.0.1", 80, [], "X")
    assert await netcheck.resolve_checked("127.0.0.1", 80, ["127.0.0.1"], "X") == ip_address("127.0.0.1")
    assert await netcheck.resolve_checked("93.184.215.14", 443, [], "X") == ip_address("93.184.215.14")
    with pytest.raises(netcheck.HostUnresolved):
        await netcheck.resolve_checked("nothing-here.invalid", 443, ["nothing-here.invalid"], "X")


@pytest.mark.parametrize(("address", "embeds"), [
    ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
    ("64:ff9b::a00:1", "10.0.0.1"),  # NAT64's well-known prefix
    ("64:ff9b:1::a9fe:a9fe", "169.254.169.254"),  # NAT64's local-use prefix: a cloud metadata address
    ("2002:a00:1::1", "10.0.0.1"),  # 6to4
])
async def test_ipv6_addresses_that_reach_an_internal_ipv4_host_are_internal(address, embeds):
    with pytest.raises(netcheck.AddressRefused, match=f"internal address {ip_address(address)};"):
        await netcheck.resolve_checked(address, 443, [], "X")
    assert ip_address(embeds) in netcheck._embedded_ipv4(ip_address(address))
    assert await netcheck.resolve_checked("64:ff9b::808:808", 443, [], "X") == ip_address("64:ff9b::808:808")


@pytest.mark.parametrize(("url", "address", "pinned", "host_header"), [
    ("https://example.com/a?b=1", "93.184.215.14", "https://93.184.215.14:443/a?b=1", "example.com"),
    ("http://example.com:8080/a", "2001:db8::1", "http://[2001:db8::1]:8080/a", "example.com:8080"),
    ("https://u:p@[::1]:8443/", "::1", "https://[::1]:8443/", "[::1]:8443"),
])
def test_pin_connects_to_the_address_and_names_the_host(url, address, pinned, host_header):
    target = netcheck.pin(urlsplit(url), ip_address(address))
    assert (target.url, target.host_header) == (pinned, host_header)
    assert target.headers == {"Host": host_header}
    assert target.extensions == {"sni_hostname": urlsplit(url).hostname}
