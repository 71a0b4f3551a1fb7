"""Sub-commands of `rt-mindeye` (replay)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add this module's sub-commands (none yet)."""
