"""Errors shared across layers."""

from __future__ import annotations


class UsageError(Exception):
    """A command-line mistake; the message names the flag (printed as one line, exit 2)."""
