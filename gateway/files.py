"""Files that hold secrets or that a server reads while we change them."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` in one step, with permissions `mode` from the first byte.

    A reader sees the old file or the new one, never half of it; a key is never
    readable by others, not even for a moment.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    # The umask may have narrowed `mode` at creation; a certificate must stay readable.
    temporary.chmod(mode)
    temporary.replace(path)
