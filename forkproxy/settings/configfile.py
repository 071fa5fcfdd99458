"""A TOML configuration file (--config) to option texts, each with the line it came from.

Its keys are the command line's long option names without the dashes, read from the
argparse definition (`file_options`): an option added there can be set here as well.
A value is checked for its TOML type only, and turned into the text the command line
would carry (`5` -> "5", `true` -> the bare option), so the option's own parser
(option_values.py) decides what it means, here as on the command line. `[listeners.NAME]`
sections take the per-listener options. Every problem is one line,
`FILE:LINE: key 'KEY': reason`, and all are collected. Reads the one file; never
touches sockets.
"""

import argparse
import decimal
import difflib
import math
import re
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from forkproxy.errors import UsageError
from forkproxy.settings.address import is_listener_name
from forkproxy.settings.quoting import printable, quote
from forkproxy.settings.toml_lines import KeyPath, key_lines, line_of

LISTENERS = "listeners"  # the table of per-listener sections
# Options that say what to do with the settings, not what they are.
NOT_IN_FILE = frozenset({"help", "version", "config", "check"})
_TOML_ERROR = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)


class Kind(Enum):
    TEXT = "text"  # --option=VALUE
    OPTIONAL = "optional"  # --option[=VALUE]: a string, or true (bare) or false (off)
    FLAG = "flag"  # --option, --no-option
    LIST = "list"  # repeatable, or the positional targets


@dataclass(frozen=True, slots=True)
class FileOption:
    """A key the file may have: the option it sets and the TOML types it takes."""

    key: str
    dest: str
    kind: Kind
    bare: str = ""  # Kind.OPTIONAL: the text `true` stands for
    hidden: bool = False  # an old spelling, not offered in messages


@dataclass(frozen=True, slots=True)
class Where:
    """A key's place in the file, which prefixes every error about its value."""

    path: str
    line: int | None
    key: str
    section: str = ""  # the listener of a [listeners.NAME] key; "" at the top level

    def error(self, message: str) -> str:
        place = self.path if self.line is None else f"{self.path}:{self.line}"
        within = f" in {section_header(self.section)}" if self.section else ""
        return f"{place}: key {quote(self.key)}{within}: {message}"


@dataclass(frozen=True, slots=True)
class FileValue:
    """One setting as written: command-line text (texts for a list), or a flag's bool.
    `False` for a Kind.OPTIONAL option means off."""

    raw: str | bool | tuple[str, ...]
    where: Where


@dataclass(slots=True)
class FileListener:
    """A `[listeners.NAME]` section: its settings by dest (`listen`, `targets` too)."""

    name: str
    origin: str  # "FILE:LINE: section [listeners.NAME]", for messages about it
    values: dict[str, FileValue] = field(default_factory=dict)


@dataclass(slots=True)
class ConfigFile:
    path: str
    values: dict[str, FileValue] = field(default_factory=dict)  # top level, by dest
    listeners: list[FileListener] = field(default_factory=list)  # in the file's order
    errors: list[str] = field(default_factory=list)  # one line each


def file_options(parser: argparse.ArgumentParser, bare: Mapping[str, str]) -> dict[str, FileOption]:
    """The keys a configuration file may have, from the command line's definition.

    `bare` gives, by dest, what an optional-value option alone stands for."""
    options: dict[str, FileOption] = {}
    for action in parser._actions:
        if not action.option_strings:  # the positional targets
            options["targets"] = FileOption("targets", action.dest, Kind.LIST)
            continue
        if action.dest in NOT_IN_FILE:
            continue
        if action.nargs == 0:
            kind = Kind.FLAG
        elif isinstance(action, argparse._AppendAction):
            kind = Kind.LIST
        elif action.dest in bare:
            kind = Kind.OPTIONAL
        else:
            kind = Kind.TEXT
        for spelling in action.option_strings:
            negative = isinstance(action, argparse.BooleanOptionalAction) and (
                spelling.startswith("--no-")
            )
            if spelling.startswith("--") and not negative:
                key = spelling[2:]
                hidden = action.help == argparse.SUPPRESS
                bare_text = bare.get(action.dest, "")
                options[key] = FileOption(key, action.dest, kind, bare_text, hidden)
    return options


def read_config_text(path: str) -> str:
    """The text of the file at `path`; UsageError if it cannot be read or is not UTF-8."""
    if "\0" in path:  # open() would raise ValueError, not an OSError
        raise UsageError(f"cannot read configuration file {quote(path)}: a NUL byte in its name")
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise UsageError(
            f"cannot read configuration file {quote(path)}: {error.strerror or error}"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UsageError(f"{printable(path)}:{line}: invalid TOML: not UTF-8 text") from None


def read_config_file(
    path: str, text: str, options: Mapping[str, FileOption], per_listener: Collection[str]
) -> ConfigFile:
    """The settings in `text`, the file at `path` (`read_config_text`), with the problems
    found in it.

    Raises UsageError only when there is nothing to look at (not TOML); `per_listener`
    names the dests a [listeners.NAME] section may set."""
    shown = printable(path)  # every message starts with it: one printable line
    document = _parse_toml(text, shown)
    reader = _Reader(shown, options, per_listener, key_lines(text))
    reader.read(document)
    return reader.result


def section_header(name: str) -> str:
    """How the section of listener `name` is written: [listeners.web], [listeners."a.b"]."""
    quoted = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{printable(name)}"'
    return f"[{LISTENERS}.{quoted}]"


def _parse_toml(text: str, path: str) -> dict[str, Any]:
    if sys.version_info < (3, 11):
        raise UsageError(
            f"--config needs Python 3.11 or later (for its TOML reader, tomllib); "
            f"this is Python {sys.version.split()[0]}"
        )
    else:  # mypy, set to the oldest Python we run on, skips this branch
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            message = str(error)
            match = _TOML_ERROR.match(message)
            if match is not None:
                reason, line, column = match.groups()
                place = f"{path}:{line}:{column}"
            else:
                reason = message.removesuffix(" (at end of document)")
                place = f"{path}:{text.count(chr(10)) + 1}"
            lowered = reason[:1].lower() + reason[1:]
            raise UsageError(f"{place}: invalid TOML: {lowered}") from None
        except ValueError:  # an integer past Python's int-to-str digit limit
            digits = re.search(r"[0-9_]{1000,}", text)
            line = "" if digits is None else f":{text.count(chr(10), 0, digits.start()) + 1}"
            raise UsageError(f"{path}{line}: invalid TOML: a number with too many digits") from None


class _Reader:
    def __init__(
        self,
        path: str,
        options: Mapping[str, FileOption],
        per_listener: Collection[str],
        lines: dict[KeyPath, int],
    ) -> None:
        self.path = path
        self.options = options
        self.per_listener = per_listener
        self.lines = lines
        self.result = ConfigFile(path)

    def where(self, key: str, section: str = "") -> Where:
        path = (LISTENERS, section, key) if section else (key,)
        return Where(self.path, line_of(self.lines, path), key, section)

    def read(self, document: dict[str, Any]) -> None:
        for key, value in document.items():
            if key == LISTENERS:
                self.read_listeners(value)
            elif key in self.options or key in NOT_IN_FILE:
                self.setting(self.result.values, key, value, "")
            elif isinstance(value, dict):
                line = self.first_line((key,))
                place = self.path if line is None else f"{self.path}:{line}"
                hint = _did_you_mean(key, [LISTENERS]) or f" (sections are {LISTENERS}.NAME)"
                self.result.errors.append(f"{place}: unknown section [{printable(key)}]{hint}")
            else:
                hint = _did_you_mean(key, [*self.offered(""), LISTENERS])
                self.result.errors.append(self.where(key).error(f"no such option{hint}"))

    def read_listeners(self, sections: object) -> None:
        if not isinstance(sections, dict):
            self.result.errors.append(
                self.where(LISTENERS).error(
                    f"expected sections {LISTENERS}.NAME, got {_a(sections)}"
                )
            )
            return
        for name, values in sections.items():
            line = line_of(self.lines, (LISTENERS, name))
            place = self.path if line is None else f"{self.path}:{line}"
            origin = f"{place}: section {section_header(name)}"
            if not isinstance(values, dict):
                where = Where(self.path, line, name, "")
                self.result.errors.append(
                    where.error(f"expected a section {section_header(name)}, got {_a(values)}")
                )
            elif not is_listener_name(name):
                self.result.errors.append(
                    f"{origin}: invalid listener name {quote(name)}: it may only contain "
                    "letters, digits, '_', '.' and '-'"
                )
            elif name == "metrics":
                self.result.errors.append(
                    f"{origin}: the name 'metrics' is kept for the metrics socket"
                )
            else:
                listener = FileListener(name, origin)
                self.result.listeners.append(listener)
                for key, value in values.items():
                    self.setting(listener.values, key, value, name)

    def setting(self, into: dict[str, FileValue], key: str, value: object, section: str) -> None:
        where = self.where(key, section)
        errors = self.result.errors
        option = self.options.get(key)
        if option is None or (section and option.dest not in self.per_listener):
            if key in NOT_IN_FILE:
                errors.append(where.error("cannot be set in a configuration file"))
            elif option is None:
                hint = _did_you_mean(key, self.offered(section))
                errors.append(where.error(f"no such option{hint}"))
            else:
                these = ", ".join(self.offered(section))
                errors.append(where.error(f"not a per-listener option (these are: {these})"))
            return
        kind = option.kind
        if section and option.dest == "listen":
            kind = Kind.TEXT  # a listener has one address
        raw = _raw(option, kind, value)
        if isinstance(raw, _Wrong):
            errors.append(where.error(raw.message))
            return
        before = into.get(option.dest)
        if before is not None:
            line = "" if before.where.line is None else f" on line {before.where.line}"
            errors.append(where.error(f"the same option as {quote(before.where.key)}{line}"))
            return
        into[option.dest] = FileValue(raw, where)

    def offered(self, section: str) -> list[str]:
        """The keys a message suggests: those of a listener section, or all."""
        return [
            key
            for key, option in self.options.items()
            if not option.hidden and (not section or option.dest in self.per_listener)
        ]

    def first_line(self, prefix: KeyPath) -> int | None:
        found = [line for path, line in self.lines.items() if path[: len(prefix)] == prefix]
        return min(found) if found else None


@dataclass(frozen=True, slots=True)
class _Wrong:
    message: str


def _raw(option: FileOption, kind: Kind, value: object) -> str | bool | tuple[str, ...] | _Wrong:
    """A TOML value as the command line would carry it, or why it cannot be."""
    if kind is Kind.FLAG:
        if isinstance(value, bool):
            return value
        return _Wrong(f"expected true or false, got {_a(value)}")
    if kind is Kind.LIST:
        items = value if isinstance(value, list) else [value]
        texts = []
        for item in items:
            text = _text(item)
            if text is None:
                what = "a string or a list of strings"
                got = _a(value) if item is value else f"a list holding {_a(item)}"
                return _Wrong(f"expected {what}, got {got}")
            texts.append(text)
        return tuple(texts)
    if kind is Kind.OPTIONAL and isinstance(value, bool):
        return option.bare if value else False
    text = _text(value)
    if text is None:
        expected = "a string, true or false" if kind is Kind.OPTIONAL else "a string or a number"
        return _Wrong(f"expected {expected}, got {_a(value)}")
    return text


def _text(value: object) -> str | None:
    """A string or number as command-line text; None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) and value > 0:
            return "infinity"  # TOML's inf, for a time span
        if math.isfinite(value):
            return format(decimal.Decimal(repr(value)), "f")  # 1e-06 as 0.000001
        return repr(value)
    return None


def _a(value: object) -> str:
    """What a TOML value is, for messages: 'a string', 'a table'."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    for kind, name in names.items():
        if type(value) is kind:
            return name
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__.replace('datetime', 'date-time')}"


def _did_you_mean(key: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
