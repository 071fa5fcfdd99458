"""User text in messages: escaped to one printable line, shortened, numbers bounded."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkproxy.errors import UsageError
from forkproxy.settings.quoting import digits_value, printable, quote, whole_number


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("/run/app.sock", "/run/app.sock"),
        ("caf\u00e9", "caf\u00e9"),  # printable non-ASCII stays
        ("0:\n", "0:\\n"),
        ("a\rb\tc", "a\\rb\\tc"),
        ("\x1b[31mred", "\\x1b[31mred"),  # no terminal escape gets through
        ("/tmp/\udcff.sock", "/tmp/\\xff.sock"),  # a byte that was not UTF-8 (surrogateescape)
        ("\u2028", "\\u2028"),
    ],
)
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_quote_shortens_what_would_drown_the_message() -> None:
    assert quote("5 minutess") == "'5 minutess'"
    assert quote("0:\n") == "'0:\\n'"
    long = "9" * 5000
    assert quote(long) == "'" + "9" * 100 + "...' (5000 characters)"
    path = "/" + "a" * 106  # the longest unix socket path shows whole
    assert quote(path) == f"'{path}'"


@given(st.text())
def test_quote_is_one_printable_line(text: str) -> None:
    quoted = quote(text)
    assert quoted.isprintable()
    assert len(quoted) < 200


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), (" 42 ", 42), ("0" * 5000 + "7", 7), ("9" * 19, 10**19 - 1)],
)
def test_whole_number(text: str, value: int) -> None:
    assert whole_number(text, "--workers= value") == value


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "invalid --workers= value '': expected a whole number"),
        ("-1", "invalid --workers= value '-1': expected a whole number"),
        ("\u0661", "invalid --workers= value '\u0661': expected a whole number"),  # not ASCII
        ("1" * 20, "invalid --workers= value '11111111111111111111': number too large"),
        ("9" * 5000, "invalid --workers= value '" + "9" * 100 + "...' (5000 characters): "),
    ],
)
def test_whole_number_errors(text: str, error: str) -> None:
    with pytest.raises(UsageError) as raised:
        whole_number(text, "--workers= value")
    assert str(raised.value).startswith(error)


def test_digits_value() -> None:
    assert digits_value("00065535", 5) == 65535
    assert digits_value("165535", 5) is None
    assert digits_value("1" * 100_000, 5) is None  # no int() of it at all
    assert digits_value("0" * 100_000, 5) == 0
