"""Where each key of a TOML document is: the lines file errors name."""

import pytest

from forkproxy.settings.toml_lines import key_lines, line_of

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

DOCUMENT = '''\
# a comment
connections-max = 1024   # trailing comment
targets = [
  "127.0.0.1:8080",  # first
  "/run/app.sock",
]
note = """a multi-line string
line = "not a key"
"""
literal = \'\'\'x = 1
\'\'\'
when = 1979-05-27 07:32:00Z
"quoted.key" = 1
a.b . c = 2
inline = { x = 1, y = { z = [1,
  2] } }

[listeners.web]
listen = "8080"
targets = ['x:1', "a#b"]

[ listeners . "api" ]
proxy-protocol = "v2"
[[array]]
k = 1
'''

EXPECTED = {
    ("connections-max",): 2,
    ("targets",): 3,
    ("note",): 7,
    ("literal",): 10,
    ("when",): 12,
    ("quoted.key",): 13,
    ("a",): 14,
    ("a", "b"): 14,
    ("a", "b", "c"): 14,
    ("inline",): 15,
    ("inline", "x"): 15,
    ("inline", "y"): 15,
    ("inline", "y", "z"): 15,
    ("listeners", "web"): 18,
    ("listeners", "web", "listen"): 19,
    ("listeners", "web", "targets"): 20,
    ("listeners", "api"): 22,
    ("listeners", "api", "proxy-protocol"): 23,
    ("array",): 24,
    ("array", "k"): 25,
}


def test_every_key_and_table_has_its_line() -> None:
    tomllib.loads(DOCUMENT)  # a document tomllib accepts, as key_lines is given
    assert key_lines(DOCUMENT) == EXPECTED


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (("listeners", "web", "listen"), 19),
        (("listeners", "web", "not-there"), 18),  # the table's header
        (("inline", "y", "z", "deeper"), 15),
        (("listeners",), None),  # only implied by [listeners.web]
        (("nowhere",), None),
    ],
)
def test_line_of_falls_back_to_the_enclosing_table(path: tuple[str, ...], line: int | None) -> None:
    assert line_of(EXPECTED, path) == line


def test_what_it_cannot_follow_ends_the_walk_with_what_was_found() -> None:
    assert key_lines("a = 1\nb = = 3\nc = 3") == {("a",): 1, ("b",): 2}
    assert key_lines("") == {}
