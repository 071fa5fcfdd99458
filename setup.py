"""Builds the compiled relay engine (forkproxy.relay._engine) when it can.

Everything else is in pyproject.toml. The extension is optional: without a C compiler or
Python's headers, or with FORKPROXY_NO_EXTENSION=1, forkproxy installs as pure Python and
runs its Python engine. The engine is built with -Wall -Wextra -Werror; CFLAGS and LDFLAGS
from the environment are added after them (a sanitizer build sets them).
"""

import os
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = [
    "csrc/module.c",
    "csrc/engine.c",
    "csrc/config.c",
    "csrc/hooks.c",
    "csrc/loop.c",
    "csrc/datagram.c",
    "csrc/admission.c",
    "csrc/accept.c",
    "csrc/connect.c",
    "csrc/relay.c",
    "csrc/proxy_header.c",
    "csrc/proxy_header_parse.c",
    "csrc/access_log.c",
    "csrc/log_lines.c",
]


class OptionalBuildExt(build_ext):
    """build_ext that warns and goes on when the extension cannot be compiled."""

    def finalize_options(self) -> None:
        super().finalize_options()
        # A wheel is always compiled afresh: an up-to-date object left in build/ by another
        # compiler or flags (a sanitizer build, say) is never what gets installed.
        if not self.inplace:
            self.force = True

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # noqa: BLE001  (distutils raises several kinds)
            self._skip(error)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            # Never install what an earlier build left in build/ (a sanitizer build, say).
            stale = self.get_ext_fullpath(ext.name)
            if os.path.exists(stale):
                os.remove(stale)
            self._skip(error)

    @staticmethod
    def _skip(error: Exception) -> None:
        print(
            f"warning: not building the compiled engine ({error}); "
            "forkproxy will run its Python engine",
            file=sys.stderr,
        )


def extensions() -> list[Extension]:
    if os.environ.get("FORKPROXY_NO_EXTENSION") == "1" or not sys.platform.startswith("linux"):
        return []
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.exists(os.path.join(include, "Python.h")):
        print("warning: Python.h not found; forkproxy will run its Python engine", file=sys.stderr)
        return []
    return [
        Extension(
            "forkproxy.relay._engine",
            sources=SOURCES,
            depends=["csrc/engine.h", "csrc/formats.h"],
            extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Werror"],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
