"""Warnings attributed to the user's line, however deep inside source_fast they are raised."""

from __future__ import annotations

import sys
import warnings


def warn(message: str) -> None:
    """warnings.warn at the first frame outside source_fast: a fixed stacklevel points into the library
    when the same check is reached through another path (the kronfluence shim's stages, a fit's passes)."""
    frame, level = sys._getframe(1), 2  # level 2 is warn's caller
    # contextlib's frames are those of source_fast's own context managers (a `with` leaving one).
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("source_fast", "contextlib"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
