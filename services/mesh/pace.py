"""Pacing for long background loops that share an event loop with requests.

A checkpoint's walk or a listing over thousands of keys costs its process a fraction of a
millisecond of CPU per read, all of it on the loop that also answers requests; run back to
back it holds those requests up for as long as it runs. Paced, it pauses briefly every few
reads, so the same work is spread thin and nothing waits on it.
"""

from __future__ import annotations

import asyncio

EVERY = 25
"""A paced loop pauses after this many steps."""


class Pace:
    """Counts a loop's steps and pauses ``pause_s`` after every :data:`EVERY` (none if 0)."""

    def __init__(self, pause_s: float) -> None:
        self._pause_s = pause_s
        self._steps = 0

    def __repr__(self) -> str:
        return f"Pace(pause_s={self._pause_s}, steps={self._steps})"

    @property
    def paced(self) -> bool:
        return self._pause_s > 0

    async def step(self) -> None:
        """Count one step; pause if it completes a stretch."""
        self._steps += 1
        if self._pause_s > 0 and self._steps % EVERY == 0:
            await asyncio.sleep(self._pause_s)
