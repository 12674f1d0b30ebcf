"""Stop strings: end an answer when its text contains one of them, and never show that text.

`StopMatcher.feed(delta)` takes each newly decoded piece of text and returns what may be shown
now; `feed(delta, armed=False)` shows it all and looks for nothing (before a request's `min_tokens`).
Text that could still turn out to be the start of a stop string is held back until the next piece
settles it. Once a stop string appears, `stopped` is set, `text` is everything before it,
and every later feed returns "". The matcher knows text, not tokens or the model.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything accepted so far (shown or held back), minus a stop string
        self._shown = 0  # characters of `text` already returned
        self.stopped = False

    def feed(self, delta: str, armed: bool = True) -> str:
        """The text that may be shown now (possibly empty). Unarmed, all of it: stop strings count only
        from the first text fed armed."""
        if self.stopped or not delta:
            return ""
        # A stop string may start in held-back text (never in text shown), so search from where the new
        # text could meet it.
        start = max(len(self.text) - self._longest + 1, self._shown)
        self.text += delta
        if not armed:
            return self._release(len(self.text))
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held())

    def _held(self) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        for n in range(min(self._longest - 1, len(self.text) - self._shown), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        out = self.text[self._shown:upto]
        self._shown = max(self._shown, upto)
        return out
