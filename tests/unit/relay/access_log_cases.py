"""Access-log records with the lines each format must give, and a Hypothesis strategy for
records: shared by the formatter's tests and the Python-versus-C differential tests."""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from forkproxy.relay.access_log_format import END_REASONS, AccessRecord

INT64 = st.integers(-(2**63), 2**63 - 1)
END_NS = 1796650301123456789  # 2026-12-07T13:31:41.123456789Z

WEB = AccessRecord(
    end_ns=END_NS,
    listener="web",
    client="127.0.0.1:5555",
    target="127.0.0.1:8080",
    worker=0,
    connect_ns=213_999,
    duration_ns=12_504_000,
    bytes_from_client=78,
    bytes_to_client=615,
    end="target-closed",
)
REFUSED = dataclasses.replace(
    WEB, client="[::1]:40000", target="", worker=3, connect_ns=-1, duration_ns=0,
    bytes_from_client=0, bytes_to_client=0, end="refused-cap",
)  # fmt: skip
ODD = dataclasses.replace(
    WEB, listener='my "web" = \\ front\n', client="", target="/run/app.sock",
    end="client-reset", worker=-1,
)  # fmt: skip
CONTROL = dataclasses.replace(WEB, listener="a\x00\x1b\x7f\x85\u2028é\U0001f600\udcff")

LOGFMT = [
    (
        WEB,
        "time=2026-12-07T13:31:41.123Z listener=web client=127.0.0.1:5555 "
        "target=127.0.0.1:8080 worker=0 connect_ms=0.213 duration_ms=12.504 "
        "bytes_from_client=78 bytes_to_client=615 end=target-closed\n",
    ),
    (
        REFUSED,
        "time=2026-12-07T13:31:41.123Z listener=web client=[::1]:40000 target= worker=3 "
        "connect_ms= duration_ms=0.000 bytes_from_client=0 bytes_to_client=0 end=refused-cap\n",
    ),
    (
        ODD,
        'time=2026-12-07T13:31:41.123Z listener="my \\"web\\" = \\\\ front\\n" client= '
        "target=/run/app.sock worker=-1 connect_ms=0.213 duration_ms=12.504 "
        "bytes_from_client=78 bytes_to_client=615 end=client-reset\n",
    ),
    (
        CONTROL,
        'time=2026-12-07T13:31:41.123Z listener="a\\u0000\\u001b\\u007f\\u0085\u2028é'
        '\U0001f600\\udcff" client=127.0.0.1:5555 target=127.0.0.1:8080 worker=0 '
        "connect_ms=0.213 duration_ms=12.504 bytes_from_client=78 bytes_to_client=615 "
        "end=target-closed\n",
    ),
]

JSON = [
    (
        WEB,
        '{"time":"2026-12-07T13:31:41.123Z","listener":"web","client":"127.0.0.1:5555",'
        '"target":"127.0.0.1:8080","worker":0,"connect_ms":0.213,"duration_ms":12.504,'
        '"bytes_from_client":78,"bytes_to_client":615,"end":"target-closed"}\n',
    ),
    (
        REFUSED,
        '{"time":"2026-12-07T13:31:41.123Z","listener":"web","client":"[::1]:40000",'
        '"target":"","worker":3,"connect_ms":null,"duration_ms":0.000,'
        '"bytes_from_client":0,"bytes_to_client":0,"end":"refused-cap"}\n',
    ),
    (
        ODD,
        '{"time":"2026-12-07T13:31:41.123Z","listener":"my \\"web\\" = \\\\ front\\n",'
        '"client":"","target":"/run/app.sock","worker":-1,"connect_ms":0.213,'
        '"duration_ms":12.504,"bytes_from_client":78,"bytes_to_client":615,'
        '"end":"client-reset"}\n',
    ),
]


names = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
records = st.builds(
    AccessRecord,
    end_ns=INT64,
    listener=names,
    client=st.one_of(names, st.just("[fe80::1%eth0]:443")),
    target=names,
    worker=INT64,
    connect_ns=INT64,
    duration_ns=INT64,
    bytes_from_client=INT64,
    bytes_to_client=INT64,
    end=st.sampled_from(END_REASONS),
)
