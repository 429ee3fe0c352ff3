"""A lookup's answer grouped by prefix length, so that a decision can take the holders of the
longest prefixes without visiting every holder.

:class:`PrefixDepths` is the plain ``{worker id: longest cached prefix (blocks)}`` mapping a
lookup returns, with its workers also listed per length, longest first (``levels``): the
shortlist (router/shortlist.py) reads the few it keeps off the deepest levels, where a
system prompt held by hundreds of workers would otherwise be sorted whole on every decision.
"""

from __future__ import annotations

__all__ = ["PrefixDepths"]


class PrefixDepths(dict[str, int]):
    """Worker id -> longest cached prefix, plus ``levels``: ``(blocks, [worker id, ...])``
    with blocks > 0, longest first; every worker of the mapping is in exactly one level.
    Only the lookup that made it fills it: a copy (``dict(x)``) or a changed one is a plain
    mapping to its readers again (they check ``levels_valid``)."""

    __slots__ = ("levels", "_size")

    def __init__(self) -> None:
        super().__init__()
        self.levels: list[tuple[int, list[str]]] = []
        self._size = 0

    def add_level(self, blocks: int, workers: list[str]) -> None:
        """Append the workers holding exactly ``blocks`` blocks (shorter than every level
        added before)."""
        if workers:
            self.levels.append((blocks, workers))
            self.update(dict.fromkeys(workers, blocks))
            self._size = len(self)

    def raise_all(self, depths: dict[str, int]) -> None:
        """Make each worker's prefix at least its ``blocks`` in ``depths`` (> 0) long,
        keeping ``levels`` valid: a worker that held less moves to (or joins) that level.
        The levels are rearranged once (each level workers leave is filtered once)."""
        valid = self.levels_valid
        gone: dict[int, set[str]] = {}  # level -> workers leaving it
        joining: dict[int, list[str]] = {}  # level -> workers joining it
        get = self.get
        for w, blocks in depths.items():
            old = get(w, 0)
            if blocks <= old:
                continue
            self[w] = blocks
            if old:
                gone.setdefault(old, set()).add(w)
            joining.setdefault(blocks, []).append(w)
        if not joining or not valid:  # nothing moved, or already a plain mapping
            return
        by_blocks = dict(self.levels)
        for b, ws in gone.items():
            by_blocks[b] = [w for w in by_blocks[b] if w not in ws]
        for b, ws in joining.items():
            by_blocks[b] = by_blocks[b] + ws if b in by_blocks else ws
        self.levels = [(b, by_blocks[b]) for b in sorted(by_blocks, reverse=True)
                       if by_blocks[b]]
        self._size = len(self)

    @property
    def levels_valid(self) -> bool:
        """Whether ``levels`` still lists exactly the mapping (no entry added or removed
        since the lookup; an entry changed in place is not detected: don't)."""
        return self._size == len(self)
