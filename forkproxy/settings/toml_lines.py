"""Where each key of a TOML document is written: key path to line number.

tomllib gives values, not positions, and an error about a value must name its line.
`key_lines` walks a document tomllib has already accepted, just far enough to see
statements: table headers, `key = value` lines (dotted keys too), the keys of inline
tables, and values long enough to skip (strings of all four kinds, arrays over several
lines). It returns the line of every table and key it saw. Never raises on a document
tomllib accepted; on anything it does not follow it stops and returns what it found,
and a caller falls back to the line of the enclosing table.
"""

import json

KeyPath = tuple[str, ...]

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_BLANK = " \t"
_SCALAR_END = frozenset(" \t\r\n,]}#")


class _Stop(Exception):
    """The walk met something it does not follow: keep what was found so far."""


def key_lines(text: str) -> dict[KeyPath, int]:
    """The 1-based line of each table header and key, by its full key path."""
    walk = _Walk(text)
    try:
        walk.document()
    except (_Stop, IndexError):
        pass
    return walk.lines


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    """The line of `path`, else of the nearest enclosing table or key found, else None."""
    for end in range(len(path), 0, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


class _Walk:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[KeyPath, int] = {}

    def document(self) -> None:
        table: KeyPath = ()
        while True:
            self.skip_space(newlines=True)
            if self.pos >= len(self.text):
                return
            if self.text[self.pos] == "[":
                double = self.text.startswith("[[", self.pos)
                self.pos += 2 if double else 1
                table = self.key()
                self.lines.setdefault(table, self.line)
                self.expect("]]" if double else "]")
            else:
                self.key_value(table)
            self.skip_space(newlines=False)
            if self.pos < len(self.text) and self.text[self.pos] not in "\r\n":
                raise _Stop

    def key_value(self, table: KeyPath) -> None:
        path = table + self.key()
        for end in range(len(table) + 1, len(path) + 1):  # a.b.c = 1 defines a and a.b
            self.lines.setdefault(path[:end], self.line)
        self.expect("=")
        self.value(path)

    def key(self) -> KeyPath:
        parts = []
        while True:
            self.skip_space(newlines=False)
            parts.append(self.simple_key())
            self.skip_space(newlines=False)
            if not self.text.startswith(".", self.pos):
                return tuple(parts)
            self.pos += 1

    def simple_key(self) -> str:
        text, start = self.text, self.pos
        if text[start] in "\"'":
            self.string()
            return _unquote(text[start : self.pos])
        while self.pos < len(text) and text[self.pos] in _BARE_KEY:
            self.pos += 1
        if self.pos == start:
            raise _Stop
        return text[start : self.pos]

    def value(self, path: KeyPath) -> None:
        self.skip_space(newlines=False)
        char = self.text[self.pos]
        if char in "\"'":
            self.string()
        elif char == "[":
            self.array(path)
        elif char == "{":
            self.inline_table(path)
        else:
            self.scalar()

    def array(self, path: KeyPath) -> None:
        self.pos += 1
        while True:
            self.skip_space(newlines=True)
            if self.text[self.pos] == "]":
                self.pos += 1
                return
            self.value(path)
            self.skip_space(newlines=True)
            if self.text[self.pos] == ",":
                self.pos += 1

    def inline_table(self, path: KeyPath) -> None:
        self.pos += 1
        while True:
            self.skip_space(newlines=False)
            if self.text[self.pos] == "}":
                self.pos += 1
                return
            self.key_value(path)
            self.skip_space(newlines=False)
            if self.text[self.pos] == ",":
                self.pos += 1

    def scalar(self) -> None:
        text, start = self.text, self.pos
        while self.pos < len(text) and text[self.pos] not in _SCALAR_END:
            self.pos += 1
        # A date and a time may be separated by one space: 1979-05-27 07:32:00.
        if (
            self.pos - start == 10
            and text[start + 4 : start + 5] == "-"
            and text[self.pos : self.pos + 1] == " "
            and text[self.pos + 1 : self.pos + 2].isdigit()
        ):
            self.pos += 1
            self.scalar()
        elif self.pos == start:
            raise _Stop

    def string(self) -> None:
        text = self.text
        quote = text[self.pos]
        if text.startswith(quote * 3, self.pos):
            self.pos += 3
            end = self.find_closing(quote * 3, escapes=quote == '"')
            self.pos = end + 3
            while text.startswith(quote, self.pos) and self.pos < end + 5:
                self.pos += 1  # up to two quotes may end the content: """a"""""
            return
        self.pos += 1
        self.pos = self.find_closing(quote, escapes=quote == '"') + 1

    def find_closing(self, delimiter: str, escapes: bool) -> int:
        text = self.text
        index = self.pos
        while not text.startswith(delimiter, index):
            if text[index] == "\\" and escapes:
                index += 1
            if text[index] == "\n":
                self.line += 1
            index += 1
        return index

    def skip_space(self, newlines: bool) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in _BLANK:
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            elif newlines and char in "\r\n":
                if char == "\n":
                    self.line += 1
                self.pos += 1
            else:
                return

    def expect(self, token: str) -> None:
        self.skip_space(newlines=False)
        if not self.text.startswith(token, self.pos):
            raise _Stop
        self.pos += len(token)


def _unquote(quoted: str) -> str:
    """A quoted key's text. JSON reads TOML's escapes but \\U; listener names, the only
    keys we locate that may need quotes, have no escapes anyway."""
    content = quoted[1:-1]
    if quoted[0] == "'" or "\\" not in content:
        return content
    try:
        return str(json.loads(quoted))
    except ValueError:
        return content
