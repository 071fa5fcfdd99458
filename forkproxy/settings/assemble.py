"""The command line and a --config file, merged into one checked `Config`.

Precedence, from the strongest: the command line, then the file's top level, then the
defaults; a `[listeners.NAME]` value applies to its listener whatever the global value
(it is the more specific), and `--route NAME=TARGET` on the command line replaces the
targets the file gives NAME. Positional targets replace the file's `targets`;
`--listen` addresses add to the file's, and replace one the file gives the same NAME.

Every value, wherever it was written, is read by its option's parser (option_values.py)
and then checked alone against the `Config`'s own checks, the other fields left at
their defaults, so a bad value's error names its key and line; every error is collected
and raised together (`UsageErrors`). What only fails in combination is the `Config`'s
to say. Reads the --config file; never touches sockets.
"""

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from forkproxy.errors import UsageError, UsageErrors
from forkproxy.settings.address import ListenAddress, TargetAddress, parse_target
from forkproxy.settings.config import (
    RELAY_OPTIONS,
    Config,
    ListenerSettings,
    default_workers,
)
from forkproxy.settings.configfile import (
    ConfigFile,
    FileValue,
    Where,
    file_options,
    read_config_file,
    read_config_text,
)
from forkproxy.settings.option_values import VALUES, command_line_what

_PER_LISTENER = frozenset({*RELAY_OPTIONS, "targets", "listen"})
_DEFAULTS = {
    field.name: field.default
    for field in dataclasses.fields(Config)
    if field.default is not dataclasses.MISSING
}
# Values no single check can refuse: lists, and what Config checks only with others.
_NOT_CHECKED_ALONE = frozenset(
    {"targets", "listen", "route", "metrics", "inetd", "log_level", "backup"}
)
_TRIAL_TARGETS = (parse_target("127.0.0.1:1"),)
_BAD = object()  # a value that was refused; its error is collected


@dataclass(frozen=True, slots=True)
class _Given:
    raw: str | bool | tuple[str, ...]
    where: Where | None  # None: the command line


def assemble_config(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    bare: Mapping[str, str],
    config_text: str | None = None,
) -> Config:
    """The Config of the parsed command line `args` and the --config file it names, whose
    text is `config_text` (read from the file if None).

    `bare` gives, by dest, what an optional-value option alone stands for."""
    file = None
    if args.config is not None:
        options = file_options(parser, bare)
        if config_text is None:
            config_text = read_config_text(args.config)
        file = read_config_file(args.config, config_text, options, _PER_LISTENER)
    return _Assembly(args, parser, file).config()


class _Assembly:
    def __init__(
        self, args: argparse.Namespace, parser: argparse.ArgumentParser, file: ConfigFile | None
    ) -> None:
        self.args = args
        self.file = file
        self.errors: list[str] = [] if file is None else list(file.errors)
        self.command_line: dict[str, _Given] = {}
        for dest, value in vars(args).items():
            if value in (None, []) or value == parser.get_default(dest):
                continue  # not given
            if dest in ("config", "check"):
                continue
            raw = tuple(value) if isinstance(value, list) else value
            self.command_line[dest] = _Given(raw, None)

    def config(self) -> Config:
        values: dict[str, Any] = {}
        for dest in VALUES.keys() | {"nodelay", "inetd", "accept_proxy"}:
            if dest in ("targets", "listen", "route"):
                continue
            given = self.given(dest)
            if given is not None:
                values[dest] = self.value(dest, given)
        targets = self.targets()
        listen = self.listen()
        listeners = self.listeners(targets, values)
        if values.get("inetd") is True:
            self.refuse_with_inetd(values, listeners)
        if not self.errors and not targets and not listeners:
            raise UsageError("missing target: give HOST:PORT or a unix socket path (see --help)")
        if self.errors:
            raise UsageErrors(sorted(self.errors, key=self._line))
        values.setdefault("workers", default_workers())
        return Config(targets=targets, listen=listen, listeners=listeners, **values)

    def refuse_with_inetd(
        self, values: dict[str, Any], listeners: tuple[ListenerSettings, ...]
    ) -> None:
        sections = self.file is not None and bool(self.file.listeners)
        route = "[listeners.NAME] sections" if sections else "--route"
        for option, given in (("--metrics", "metrics" in values), (route, bool(listeners))):
            if given:
                raise UsageError(
                    f"{option} cannot be used with --inetd: a connection on standard "
                    "input has no listener to route, nor a master to serve metrics"
                )

    def _line(self, error: str) -> int:
        """Where an error is in the file, to list them in its order (command line first)."""
        if self.file is None or not error.startswith(self.file.path + ":"):
            return 0
        line = error[len(self.file.path) + 1 :].partition(":")[0]
        return int(line) if line.isdigit() else 0

    # -- one value -----------------------------------------------------------------------

    def given(self, dest: str) -> _Given | None:
        given = self.command_line.get(dest)
        if given is None and self.file is not None:
            return self.file_given(self.file.values.get(dest))
        return given

    @staticmethod
    def file_given(value: FileValue | None) -> _Given | None:
        return None if value is None else _Given(value.raw, value.where)

    def value(self, dest: str, given: _Given) -> Any:
        """The typed value of `given`, or _BAD (its error collected)."""
        raw = given.raw
        if raw is False and dest in VALUES:  # `false` for an optional value: off
            return _DEFAULTS[dest]
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, tuple):  # a repeatable option (--backup, --accept-proxy-from)
            parsed = [self.parse(dest, text, given.where) for text in raw]
            return _BAD if any(one is _BAD for one in parsed) else tuple(parsed)
        assert isinstance(raw, str)
        value = self.parse(dest, raw, given.where)
        if value is not _BAD and dest not in _NOT_CHECKED_ALONE:
            try:
                Config(targets=_TRIAL_TARGETS, **{dest: value})
            except UsageError as error:
                self.fail(given.where, str(error), dest)
                return _BAD
        return value

    def parse(self, dest: str, text: str, where: Where | None) -> Any:
        syntax = VALUES[dest]
        try:
            return syntax.parse(text, command_line_what(dest) if where is None else syntax.noun)
        except UsageError as error:
            self.fail(where, str(error), dest)
            return _BAD

    def fail(self, where: Where | None, message: str, dest: str = "") -> None:
        if where is None:
            self.errors.append(message)
            return
        # "--workers= must be in 1-128": the key is named already.
        self.errors.append(where.error(message.removeprefix(f"--{dest.replace('_', '-')}= ")))

    def texts(self, given: _Given | None) -> list[tuple[str, Where | None]]:
        if given is None:
            return []
        raw = given.raw
        texts = raw if isinstance(raw, tuple) else (str(raw),)
        return [(text, given.where) for text in texts]

    # -- targets, listeners and routes ---------------------------------------------------

    def targets(self) -> tuple[TargetAddress, ...]:
        parsed = [
            self.parse("targets", text, where) for text, where in self.texts(self.given("targets"))
        ]
        return tuple(target for target in parsed if target is not _BAD)

    def listen(self) -> tuple[ListenAddress, ...]:
        """The file's addresses (top level, then sections), then the command line's; one
        named like a file's replaces it."""
        merged: list[ListenAddress] = []
        by_name: dict[str, tuple[int, Where | None]] = {}
        file = self.file
        if file is not None:
            found = [
                (self.parse("listen", text, where), where)
                for text, where in self.texts(self.file_given(file.values.get("listen")))
            ]
            for listener in file.listeners:
                value = listener.values.get("listen")
                if value is None:
                    continue
                assert isinstance(value.raw, str)
                address = self.parse("listen", value.raw, value.where)
                if address is not _BAD and address.name:
                    self.fail(value.where, "give the address alone: the section names it")
                    address = _BAD
                elif address is not _BAD:
                    address = dataclasses.replace(address, name=listener.name)
                found.append((address, value.where))
            for address, where in found:
                if address is _BAD:
                    continue
                before = by_name.get(address.name) if address.name else None
                if before is not None:
                    line = before[1].line if before[1] is not None else None
                    on = f" on line {line}" if line is not None else ""
                    self.fail(where, f"listener '{address.name}' has an address already{on}")
                    continue
                if address.name:
                    by_name[address.name] = (len(merged), where)
                merged.append(address)
        for text in self.args.listen:
            address = self.parse("listen", text, None)
            if address is _BAD:
                continue
            before = by_name.get(address.name) if address.name else None
            if before is not None and before[1] is not None:
                merged[before[0]] = address  # the command line moves a file's listener
                by_name[address.name] = (before[0], None)
            else:
                merged.append(address)
        return tuple(merged)

    def routes(self, given: _Given | None) -> dict[str, tuple[list[TargetAddress], Where | None]]:
        """--route NAME=TARGET values by NAME, in order; a repeated NAME adds targets."""
        routes: dict[str, tuple[list[TargetAddress], Where | None]] = {}
        for text, where in self.texts(given):
            route = self.parse("route", text, where)
            if route is not _BAD:
                routes.setdefault(route[0], ([], where))[0].append(route[1])
        return routes

    def listeners(
        self, targets: tuple[TargetAddress, ...], values: dict[str, Any]
    ) -> tuple[ListenerSettings, ...]:
        """Settings for each listener named by a section or a route."""
        file = self.file
        command_routes = self.routes(self.command_line.get("route"))
        file_routes = self.routes(self.file_given(file.values.get("route")) if file else None)
        global_options = {dest: values.get(dest, _DEFAULTS[dest]) for dest in RELAY_OPTIONS}
        result: dict[str, ListenerSettings] = {}
        sections = file.listeners if file is not None else []
        for section in sections:
            options = dict(global_options)
            for dest in RELAY_OPTIONS:
                given = self.file_given(section.values.get(dest))
                if given is not None:
                    options[dest] = self.value(dest, given)
            own = self.file_given(section.values.get("targets"))
            listener_targets = tuple(
                target
                for target in (
                    self.parse("targets", text, where) for text, where in self.texts(own)
                )
                if target is not _BAD
            )
            if own is not None and section.name in file_routes:
                self.fail(own.where, f"listener '{section.name}' has targets in 'route' too")
            if section.name in command_routes:
                listener_targets = tuple(command_routes[section.name][0])
            elif own is None and section.name in file_routes:
                listener_targets = tuple(file_routes[section.name][0])
            elif own is None:
                listener_targets = targets
            if not listener_targets and own is None:
                self.errors.append(
                    f"{section.origin}: no targets for listener '{section.name}': give "
                    "targets = [...] here or at the top of the file"
                )
            result[section.name] = self.settings(
                section.name, listener_targets, options, section.origin
            )
        for name in [*file_routes, *command_routes]:
            if name in result:
                continue  # a section's, or given both ways: the command line's targets won
            route_targets, where = command_routes.get(name) or file_routes[name]
            origin = f"--route={name}=..." if where is None else where.error("").rstrip(": ")
            result[name] = self.settings(name, tuple(route_targets), global_options, origin)
        return tuple(result.values())

    @staticmethod
    def settings(
        name: str, targets: tuple[TargetAddress, ...], options: dict[str, Any], origin: str
    ) -> ListenerSettings:
        # A refused value's error is collected already: the default stands in for it.
        checked = {dest: value for dest, value in options.items() if value is not _BAD}
        return ListenerSettings(name, targets, origin=origin, **checked)
