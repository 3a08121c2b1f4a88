"""Small file helpers shared by the layers."""

from __future__ import annotations

import os


def new_file_mode() -> int:
    """0666 less the umask: the mode open() gives a new file (mkstemp's is a private 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
