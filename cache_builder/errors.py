"""The builder's user error: bad input for a cache build, or a teacher misbehaving."""
from __future__ import annotations

from shared.errors import CitUserError


class BuildError(CitUserError):
    """Bad input for a cache build (or a teacher misbehaving); the message names the culprit."""
