"""Hypothesis strategies for hostile forkproxy command lines.

Options come from the real parser (so an option added later is fuzzed too), with values
a careless admin or a hostile user could pass: numbers past Python's 4300-digit limit,
control characters, bytes that are not UTF-8 (as argv decodes them: surrogateescape),
the getopt spellings forkproxy must refuse. argv cannot hold a NUL (exec passes C
strings), so none is generated.
"""

from hypothesis import strategies as st

from forkproxy.settings.arguments import _build_parser

# --check answers with exit status 2 and checks no further (tests/integration/
# test_config_file.py): the fuzzed command lines are those meant to run.
OPTIONS = sorted(
    option
    for action in _build_parser()._actions
    for option in action.option_strings
    if option not in ("-h", "--help", "--version", "--check")
)
# Spellings at the edges of the syntax: optional values, prefixes, attached short values.
SPELLINGS = (
    *("-p", "-pv1", "-pv2", "-pv3", "-p=v2", "--proxy", "--conn", "--exit-idle", "--c"),
    *("--inet", "--keep", "--list", "--", "-", "-c5", "-w0", "-x", "--=x", "v2", "v3"),
)
PLAIN_VALUES = (
    *("0", "1", "-1", "65536", "99999999999999999999", "5min", "infinity", "1.5", "x", ""),
    *("=", ",", "30,5,3", "60s,10s,6", "64K", "1M", "2G", "v1", "v2", "queue", "refuse"),
    *("web=h:1", "web=127.0.0.1:80", "127.0.0.1:0", "127.0.0.1:9100", "[::1]:80", "/p"),
    *("@a", "debug", "0777", "0o777", "1_0", "\u0661", "[fe80::1%eth0]:80", "vsock:2:80"),
)
_HUGE = st.integers(4301, 6000)


def _no_nul(text: str) -> bool:
    return "\0" not in text


VALUES = st.one_of(
    st.sampled_from(PLAIN_VALUES),
    _HUGE.map(lambda digits: "9" * digits),
    _HUGE.map(lambda digits: "0" * digits + "7"),
    _HUGE.map(lambda digits: "1." + "5" * digits),
    st.from_regex(r"\A[0-9]{1,25}[KMsm]?\Z"),
    st.text(st.characters(max_codepoint=0x9F, blacklist_characters="\0"), max_size=6),
    st.binary(max_size=8).map(lambda raw: raw.decode("utf-8", "surrogateescape")).filter(_no_nul),
    st.text(max_size=10).filter(_no_nul),
)
TARGETS = st.one_of(
    st.sampled_from(["h:1", "127.0.0.1:80", "[::1]:80", "/run/app.sock", "@app", "vsock:2:80"]),
    VALUES.map(lambda value: "h:" + value),
    VALUES.map(lambda value: "/" + value),
    VALUES.map(lambda value: "vsock:" + value),
    VALUES,
)
_WORDS = st.one_of(
    st.sampled_from(OPTIONS).map(lambda option: [option]),
    st.sampled_from(SPELLINGS).map(lambda word: [word]),
    st.tuples(st.sampled_from(OPTIONS), VALUES).map(lambda pair: ["=".join(pair)]),
    st.tuples(st.sampled_from(OPTIONS), VALUES).map(list),  # --option VALUE
    TARGETS.map(lambda target: [target]),
)
ARGVS = st.lists(_WORDS, max_size=7).map(lambda words: [word for pair in words for word in pair])
