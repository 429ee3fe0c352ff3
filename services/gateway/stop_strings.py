"""Stop strings, applied by the gateway to the text a request streams.

The gateway, not the engine, holds back the characters that could start a stop string. An
engine that held them would take them along when it dies, and the next decode worker, whose
prompt already contains their tokens, would never stream them: a migrated request would lose
text. The gateway also sees a stop string that starts on one worker and ends on the next.

The decode worker still gets the stop strings, so the engine stops generating at one it sees
itself, but it is asked to stream them (``include_stop_str_in_output``), which turns its own
hold-back off. The search follows vLLM's: each new piece of text is searched, with the
characters before it that a stop string could span, for each stop string in the request's
order; the first found ends the request.
"""

from __future__ import annotations

from typing import Sequence


class StopStrings:
    """Filters one request's text stream: what to send now, and whether a stop string ended it."""

    def __init__(self, stops: Sequence[str], include_in_output: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include = include_in_output
        longest = max((len(s) for s in self.stops), default=0)
        self._span = max(longest - 1, 0)  # characters before new text a stop string may cover
        self._hold = 0 if include_in_output else self._span
        self._held = ""  # text not sent yet (could be the start of a stop string)
        self._tail = ""  # the last characters seen (sent or not), for spanning matches
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Take the next piece of text; return what may be sent. After a match (`matched` is
        set) the text ends: later pieces return nothing."""
        if self.matched is not None or not text:
            return ""
        window = self._tail + text
        start = len(self._tail)  # where the new text begins in `window`
        for stop in self.stops:
            at = window.find(stop, max(start - len(stop) + 1, 0))
            if at != -1:
                self.matched = stop
                end = at + len(stop) if self.include else at
                # `window` ends with the held text; send what is before `end` and not sent yet
                unsent_from = len(window) - len(self._held) - len(text)
                out = window[max(unsent_from, 0):end] if end > unsent_from else ""
                self._held = ""
                return out
        self._tail = window[-self._span:] if self._span else ""
        pending = self._held + text
        if self._hold and len(pending) > self._hold:
            out, self._held = pending[:-self._hold], pending[-self._hold:]
        elif self._hold:
            out, self._held = "", pending
        else:
            out, self._held = pending, ""
        return out

    def flush(self) -> str:
        """The held-back text, when the request ends for another reason."""
        out, self._held = self._held, ""
        return out
