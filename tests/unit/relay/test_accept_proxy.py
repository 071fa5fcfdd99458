"""Whom --accept-proxy trusts to send a header, and the settings that say so."""

import socket

import pytest

from forkproxy.errors import UsageError
from forkproxy.relay.accept_proxy import DIRECT, METRIC_REASONS, READ_HEADER, REJECT, AcceptProxy
from forkproxy.relay.proxy_header import REASONS
from forkproxy.settings.arguments import parse_args
from forkproxy.shared.layout import PROXY_HEADER_REASONS_MAX


def _policy(*args: str) -> AcceptProxy:
    return AcceptProxy(parse_args(["--accept-proxy", *args, "127.0.0.1:9"]).global_settings())


@pytest.mark.parametrize(
    ("args", "family", "peer", "decision"),
    [
        ((), socket.AF_INET, ("192.0.2.1", 5), READ_HEADER),
        ((), socket.AF_UNIX, "", READ_HEADER),
        (("--accept-proxy-from=10.0.0.0/8",), socket.AF_INET, ("10.1.2.3", 5), READ_HEADER),
        (("--accept-proxy-from=10.0.0.0/8",), socket.AF_INET, ("192.0.2.1", 5), REJECT),
        (("--accept-proxy-from=10.0.0.0/8",), socket.AF_UNIX, "", REJECT),
        (
            ("--accept-proxy-from=10.0.0.0/8",),
            socket.AF_INET6,
            ("::ffff:10.0.0.1", 5, 0, 0),
            READ_HEADER,
        ),
        (("--accept-proxy-from=2001:db8::/32",), socket.AF_INET6, ("2001:db8::1", 5, 0, 0), 0),
        (
            ("--accept-proxy-from=10.0.0.0/8", "--accept-proxy-untrusted=direct"),
            socket.AF_INET,
            ("192.0.2.1", 5),
            DIRECT,
        ),
        (
            ("--accept-proxy-from=10.0.0.0/8", "--accept-proxy-from=192.0.2.1"),
            socket.AF_INET,
            ("192.0.2.1", 5),
            READ_HEADER,
        ),
    ],
)
def test_who_may_send_a_header(
    args: tuple[str, ...], family: int, peer: object, decision: int
) -> None:
    assert _policy(*args).decide(family, peer) == decision


@pytest.mark.parametrize(
    ("arg", "error"),
    [
        (
            "--accept-proxy-from=10.0.0/33",
            "invalid --accept-proxy-from= value '10.0.0/33': expected an IP network such as "
            "10.0.0.0/8 or an address",
        ),
        (
            "--accept-proxy-untrusted=maybe",
            "invalid --accept-proxy-untrusted= value 'maybe': expected reject or direct",
        ),
        ("--accept-proxy-timeout=0", "--accept-proxy-timeout= must be longer than 0"),
        (
            "--access-log-format=xml",
            "invalid --access-log-format= value 'xml': expected logfmt or json",
        ),
        ("--access-log=", "invalid --access-log= value '': expected a file's path or -"),
    ],
)
def test_bad_values(arg: str, error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_args([arg, "127.0.0.1:9"])
    assert str(raised.value) == error


def test_every_reason_has_a_word() -> None:
    assert METRIC_REASONS[: len(REASONS)] == REASONS
    assert len(METRIC_REASONS) <= PROXY_HEADER_REASONS_MAX
