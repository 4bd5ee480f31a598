"""Atomic file writes for the study's outputs: a killed process leaves the old file or the new
one, never a torn one (results, tables, reports, checkpoints)."""

from __future__ import annotations

import os
import tempfile
from typing import Union

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: str, data: Union[str, bytes]) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically: a temporary file in the same
    directory, flushed and fsync-ed, then ``os.replace``-d into place."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
