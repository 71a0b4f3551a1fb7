"""Sub-commands of `rt-mindeye` (phantom)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add this module's sub-commands (none yet)."""
