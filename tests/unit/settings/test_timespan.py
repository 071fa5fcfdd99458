"""systemd time spans: the table from systemd.time(7), exact errors, and a differential
check against systemd's own parser (`systemd-analyze timespan`)."""

import math
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkproxy.errors import UsageError
from forkproxy.settings.timespan import format_timespan, parse_timespan


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("30", 30.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("5min 20s", 320.0),
        ("5min20s", 320.0),
        ("2h", 7200.0),
        ("1h 30min", 5400.0),
        (" 2 h ", 7200.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1M", 2629800.0),
        ("1y", 31557600.0),
        ("10us", 0.00001),
        ("1µs", 0.000001),
        (".5s", 0.5),
        ("+3", 3.0),
        ("12.34s.56", 12.9),
        ("infinity", math.inf),
        (" infinity ", math.inf),
    ],
)
def test_valid_spans(text: str, seconds: float) -> None:
    assert parse_timespan(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "invalid time span '': empty"),
        ("   ", "invalid time span '   ': empty"),
        ("-1", "invalid time span '-1': negative spans are not allowed"),
        ("5 minutess", "invalid time span '5 minutess': unknown unit 'minutess'"),
        ("5mins", "invalid time span '5mins': unknown unit 'mins'"),
        ("5x", "invalid time span '5x': unknown unit 'x'"),
        ("3.", "invalid time span '3.': a '.' must be followed by digits"),
        ("1.2.3", "invalid time span '1.2.3': unknown unit '.'"),
        ("+.5", "invalid time span '+.5': expected a number at '+.5'"),
        ("infinity5", "invalid time span 'infinity5': nothing may follow 'infinity'"),
        ("99999999999999999999y", "invalid time span '99999999999999999999y': too large"),
    ],
)
def test_invalid_spans_quote_the_input(text: str, error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_timespan(text)
    assert str(raised.value) == error


def test_error_names_the_option() -> None:
    with pytest.raises(UsageError, match="^invalid --exit-idle-time= value 'soon': "):
        parse_timespan("soon", "--exit-idle-time= value")


@pytest.mark.parametrize("seconds", [0.0, 0.5, 1.0, 90.0, 5400.5, 86400 * 3 + 1, math.inf])
def test_format_parses_back(seconds: float) -> None:
    assert parse_timespan(format_timespan(seconds)) == pytest.approx(seconds)


def test_format_reads_like_systemd() -> None:
    assert format_timespan(90) == "1min 30s"
    assert format_timespan(0.5) == "500ms"
    assert format_timespan(math.inf) == "infinity"


_SPAN_PIECES = st.lists(
    st.one_of(
        st.from_regex(r"\A[0-9]{1,6}(\.[0-9]{0,4})?\Z"),
        st.sampled_from(
            [
                "s",
                "sec",
                "ms",
                "min",
                "m",
                "h",
                "d",
                "w",
                "us",
                "M",
                "y",
                "mins",
                "x",
                " ",
                ".",
                "+",
                "-",
                "infinity",
                "hour",
                "msec",
                "5",
                "0",
            ]
        ),
    ),
    max_size=6,
)


def _systemd_usec(text: str) -> int | None:
    result = subprocess.run(
        ["systemd-analyze", "timespan", "--", text], capture_output=True, text=True, timeout=10
    )
    if result.returncode != 0:
        return None
    for line in result.stdout.splitlines():
        if line.strip().startswith("μs:"):
            return int(line.split(":")[1])
    raise AssertionError(result.stdout)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@settings(max_examples=150, deadline=None)
@given(_SPAN_PIECES.map("".join))
def test_accepts_exactly_what_systemd_accepts(text: str) -> None:
    expected = _systemd_usec(text)
    try:
        seconds = parse_timespan(text)
    except UsageError:
        assert expected is None, f"systemd accepts {text!r} as {expected}us"
        return
    assert expected is not None, f"systemd rejects {text!r}, we gave {seconds}"
    if math.isinf(seconds):
        assert expected == 2**64 - 1
    else:  # exact in microseconds; the float in seconds rounds above 2**53 us
        assert seconds == pytest.approx(expected / 1_000_000, rel=1e-12, abs=1e-7)


@given(st.text(max_size=30))
def test_any_text_parses_or_raises_usage_error(text: str) -> None:
    try:
        parse_timespan(text)
    except UsageError as error:
        assert "\n" not in str(error).replace(text, "")


# -- round trips -------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**15))
def test_any_span_formats_and_parses_back_to_the_microsecond(usec: int) -> None:
    text = format_timespan(usec / 1_000_000)
    assert round(parse_timespan(text) * 1_000_000) == usec, text


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=10**6),
            st.sampled_from([("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("min", 60.0), ("h", 3600.0)]),
        ),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from([" ", "", "  "]),
)
def test_parts_add_up(parts: list[tuple[int, tuple[str, float]]], separator: str) -> None:
    text = separator.join(f"{count}{unit}" for count, (unit, _) in parts)
    expected = sum(count * size for count, (_, size) in parts)
    assert parse_timespan(text) == pytest.approx(expected, rel=1e-12, abs=1e-6)
