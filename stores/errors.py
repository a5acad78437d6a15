"""The one exception every store refusal raises."""

from __future__ import annotations


class StoreError(Exception):
    """A store cannot be written or read as asked; the message names the store and the problem."""
