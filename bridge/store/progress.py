"""Per-kiosk delivery progress: the highest contiguous sequence number stored.

A kiosk releases a message from its outbox only once the bridge confirms that its
sequence number is at or below ``through``. Gaps are expected: messages arrive out of
order after a replay, and a kiosk may drop messages under its outbox policy, which it
announces through the ``floor`` of later messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# A kiosk that leaves a gap open forever must not make the bridge hold an unbounded
# set of seqs above it; past this many, the oldest gap is skipped and logged.
MAX_PENDING_SEQS = 100_000


@dataclass(slots=True)
class Progress:
    """Contiguous high-water mark plus the stored seqs above it."""

    through: int = -1
    above: set[int] = field(default_factory=set)

    def advanced(self, seqs: Iterable[int], floor: int = 0) -> Progress:
        """Return the progress after storing ``seqs``; ``self`` is left unchanged.

        ``floor`` is the kiosk's lowest still-held seq: everything below it is settled.
        """
        through = max(self.through, floor - 1)
        above = {s for s in self.above if s > through}
        above.update(s for s in seqs if s > through)
        while through + 1 in above:
            through += 1
            above.discard(through)
        if len(above) > MAX_PENDING_SEQS:
            # Give up on the oldest gap rather than grow without bound.
            through = min(above)
            above.discard(through)
            while through + 1 in above:
                through += 1
                above.discard(through)
        return Progress(through, above)
