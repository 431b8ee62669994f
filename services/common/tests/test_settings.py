"""A setting that cannot be used stops the instance at start, naming it, rather than later or quietly."""

from __future__ import annotations

import socket

import pytest

from mesh_common.settings import ServiceSettings, SettingsError, env_float


def settings(**env: str) -> ServiceSettings:
    return ServiceSettings.from_env(env, name="svc", version="test")


def test_the_defaults_are_usable() -> None:
    s = settings()
    assert (s.log_format, s.check_interval, s.deregister_after) == ("console", "1s", "1m")


@pytest.mark.parametrize("raw", ["json", "JSON", " Json "])
def test_a_log_format_is_read_in_any_case(raw: str) -> None:
    assert settings(LOG_FORMAT=raw).log_format == "json"


def test_an_unknown_log_format_is_refused_not_taken_for_console() -> None:
    with pytest.raises(SettingsError, match="LOG_FORMAT must be one of console, json, got 'jsonl'"):
        settings(LOG_FORMAT="jsonl")


@pytest.mark.parametrize("raw", ["1s", "1000ms", "1s500ms", "1.5s", "10s", "0.1m", "1000000us", "1000000µs"])
def test_check_intervals_in_gos_syntax_are_taken(raw: str) -> None:
    assert settings(CONSUL_CHECK_INTERVAL=raw).check_interval == raw


@pytest.mark.parametrize("raw", ["500ms", "0.9s", "999ms", "10us", "3µs"])
def test_a_check_interval_consul_would_raise_to_its_minimum_is_refused(raw: str) -> None:
    # Consul would take it, and call the checks every second all the same.
    with pytest.raises(
        SettingsError, match=f"CONSUL_CHECK_INTERVAL must be at least 1s, Consul's minimum, got '{raw}'"
    ):
        settings(CONSUL_CHECK_INTERVAL=raw)


@pytest.mark.parametrize("raw", ["11s", "30s", "1m"])
def test_a_check_interval_too_long_for_a_re_registration_to_pass_is_refused(raw: str) -> None:
    # A re-registration after an agent's restart would start the checks critical.
    with pytest.raises(SettingsError, match=f"CONSUL_CHECK_INTERVAL must be at most 10s .*, got '{raw}'"):
        settings(CONSUL_CHECK_INTERVAL=raw)


@pytest.mark.parametrize("raw", ["-1", "65536", "70000"])
def test_a_port_out_of_range_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match="SERVICE_PORT must be a port number, 0 to 65535"):
        settings(SERVICE_PORT=raw)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e999"])
def test_a_number_that_is_not_finite_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match=f"X must be a finite number, got '{raw}'"):
        env_float({"X": raw}, "X")


@pytest.mark.parametrize("raw", ["1m", "60s", "60000ms", "1m30s", "1.5m", "2h"])
def test_a_deregistration_delay_of_a_minute_or_more_is_taken(raw: str) -> None:
    assert settings(CONSUL_DEREGISTER_AFTER=raw).deregister_after == raw


@pytest.mark.parametrize("raw", ["59s", "10s", "500ms", "0.9m", "59999ms"])
def test_a_deregistration_delay_consul_would_raise_to_its_minimum_is_refused(raw: str) -> None:
    # Consul would take it, and reap a dead instance after a minute all the same.
    message = f"CONSUL_DEREGISTER_AFTER must be at least 1m, Consul's minimum, got '{raw}'"
    with pytest.raises(SettingsError, match=message):
        settings(CONSUL_DEREGISTER_AFTER=raw)


@pytest.mark.parametrize("name", ["CONSUL_CHECK_INTERVAL", "CONSUL_DEREGISTER_AFTER"])
@pytest.mark.parametrize("raw", ["10", "1 m", "1min", "s", "-1s", "0s", "1m-", "ten seconds"])
def test_a_duration_consul_cannot_read_is_refused(name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=name):
        settings(**{name: raw})


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("http://consul:8500", "http://consul:8500"),
        ("https://consul.example.test:8501", "https://consul.example.test:8501"),
        # Without a port, Consul's (8500, or 8501 over TLS): a URL's own default would be 80 (or 443).
        ("http://consul", "http://consul:8500"),
        ("http://consul/", "http://consul:8500"),
        ("https://consul", "https://consul:8501"),
        # The Consul CLI's usual form, without a scheme, is plain http.
        ("127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("consul", "http://consul:8500"),
        ("[::1]:8500", "http://[::1]:8500"),
        ("http://[::1]", "http://[::1]:8500"),
        (" HTTP://Consul:8500 ", "http://consul:8500"),
    ],
)
def test_the_consul_address_takes_the_clis_form_and_consuls_own_ports(raw: str, url: str) -> None:
    assert settings(CONSUL_HTTP_ADDR=raw).consul_url == url


@pytest.mark.parametrize(
    "raw",
    [
        "ftp://consul:8500",
        "unix:///var/run/consul.sock",
        "http://",
        "http://:8500",
        "http://consul:port",
        "http://consul:99999",
        "http://consul:0",
        "http://con sul:8500",
        "http://consul:8500/v1",
        "http://user:secret@consul:8500",
        "http://consul:8500?dc=x",
        "consul:8500:1",
    ],
)
def test_a_consul_address_that_is_not_one_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match="CONSUL_HTTP_ADDR must be an http or https address"):
        settings(CONSUL_HTTP_ADDR=raw)


def test_a_wildcard_host_whose_name_does_not_resolve_asks_for_an_advertised_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As in a container with IPv6 only: its name has no IPv4 address.
    def no_ipv4(name: str) -> str:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "gethostbyname", no_ipv4)
    with pytest.raises(SettingsError, match="SERVICE_ADVERTISE_ADDRESS must be set: SERVICE_HOST=:: listens"):
        settings(SERVICE_HOST="::")
    # Named, it is never looked up.
    assert settings(SERVICE_HOST="::", SERVICE_ADVERTISE_ADDRESS="fd00::5").advertise_address == "fd00::5"


def test_loopback_is_advertised_as_it_is() -> None:
    # The native stack registers every instance on 127.0.0.1.
    assert settings(SERVICE_HOST="127.0.0.1").advertise_address == "127.0.0.1"


def test_the_consul_token_is_read_and_kept_out_of_the_repr() -> None:
    assert settings().consul_token is None
    s = settings(CONSUL_HTTP_TOKEN="c0ffee-secret")
    assert s.consul_token == "c0ffee-secret"
    assert "c0ffee-secret" not in repr(s)
