"""Writing rendered units to a directory: every file or none, never half a pair.

Refuses to replace existing files unless asked (--force); each file is written to a
temporary name and renamed over the old one, mode 0644.
"""

import os

from forkproxy.errors import ForkproxyError


def write_units(files: dict[str, str], directory: str, force: bool) -> list[str]:
    """Write every file or none; return the paths written."""
    paths = {name: os.path.join(directory, name) for name in files}
    if not force:
        for path in paths.values():
            if os.path.lexists(path):
                raise ForkproxyError(f"'{path}' exists: remove it or pass --force")
    try:
        os.makedirs(directory, exist_ok=True)
        for name, text in files.items():
            temporary = paths[name] + ".tmp"
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, paths[name])
    except OSError as e:
        raise ForkproxyError(f"cannot write '{e.filename or directory}': {e.strerror}") from None
    return list(paths.values())
