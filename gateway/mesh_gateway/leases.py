"""The counts one gateway drew from Redis ahead of need, to hand out itself.

A *lease* is a run of counts of one counter, drawn in one call; the gateway
hands them out in order until they run out (decision 4 in docs/decisions).
Leases last one window: in the next, what is left of them is void.
"""

from __future__ import annotations

from dataclasses import dataclass

LEASE_MAX = 32  # counts drawn ahead for one counter, at most
LEASE_SHARE = 16  # and at most this fraction of what was left under its limit
LEASES_KEPT = 50_000  # counters with a lease, per window; past that, draws are exact


@dataclass(slots=True)
class _Lease:
    """``next`` to ``end`` are still to hand out."""

    next: int
    end: int


class Leases:
    """This gateway's leases in the current window, by counter."""

    def __init__(self) -> None:
        self.window_end = 0  # of the window the leases were drawn in, Unix ms
        self._table: dict[str, _Lease] = {}
        # Whether a draw in this window has reached a counter's limit: until
        # one has, no counter can be past its limit, and nobody asks which.
        self.capped = False

    def enter(self, window_end: int) -> None:
        """Move to the window ending at ``window_end``, if it is a new one."""
        if window_end != self.window_end:
            self.window_end, self._table, self.capped = window_end, {}, False

    def take(self, key: str, cap: int) -> int:
        """The next count of the lease in hand, or 0 if there is none."""
        lease = self._table.get(key)
        # Past the limit, every further count is refused anyway: no need to draw it.
        if lease is None or (lease.next > lease.end and lease.end < cap):
            return 0
        lease.next += 1
        return lease.next - 1

    def past(self, key: str, cap: int) -> bool:
        """Whether the counts in hand for ``key`` are already past ``cap``."""
        lease = self._table.get(key)
        return lease is not None and lease.next > cap

    def ahead(self, draws: dict[str, int], caps: dict[str, int]) -> set[str]:
        """Raises each draw to a lease where the counter may keep one; those counters.

        Only counters that can keep a lease draw one: what a full table
        could not keep would be lost, and its client refused early.
        """
        room = LEASES_KEPT - len(self._table)
        kept: set[str] = set()
        for key, needed in draws.items():
            lease = self._table.get(key)
            if lease is None:
                if room <= 0:
                    continue
                room -= 1
            kept.add(key)
            drawn = lease.end if lease is not None else 0
            draws[key] = max(needed, 1, min(LEASE_MAX, (caps[key] - drawn) // LEASE_SHARE))
        return kept

    def keep(self, key: str, window_end: int, kept: set[str], first: int, last: int, cap: int) -> None:
        """Keeps counts ``first`` to ``last``, drawn for ``window_end``, if that is still this window.

        ``cap`` is the counter's limit: a draw that reaches it marks the window ``capped``.
        """
        if window_end == self.window_end:
            self.capped = self.capped or last >= cap
            if key in kept or key in self._table:
                self._table[key] = _Lease(first, last)
