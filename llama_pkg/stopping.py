"""Stop sequences over streamed text: emit what can no longer be part of a match, hold back the rest."""


class StopMatcher:
    def __init__(self, stops):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text):
        """Add streamed text; return the text that is now safe to emit. Sets `stopped` on a match: the
        match that starts first, so a complete stop waits while a longer one that starts before it may
        still complete."""
        if self.stopped:
            return ""
        buf = self._held + text
        cut = self._first_match(buf)
        partial = len(buf) - self._longest_partial_match(buf)  # where the earliest unfinished match starts
        if cut >= 0 and cut <= partial:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        self._held = buf[partial:]
        return buf[:partial]

    def flush(self):
        """The end of generation: held-back text that holds a complete stop ends there; the rest did not
        turn into a match and is released."""
        held, self._held = self._held, ""
        if self.stopped:
            return ""
        cut = self._first_match(held)
        self.stopped = cut >= 0
        return held[:cut] if cut >= 0 else held

    def _first_match(self, buf):
        """Where the first complete stop in buf starts, or -1."""
        return min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)

    def _longest_partial_match(self, buf):
        """Length of the longest suffix of buf that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
