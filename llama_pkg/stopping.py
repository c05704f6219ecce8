"""Stop sequences over streamed text: emit what can no longer be part of a match, hold back the rest."""


class StopMatcher:
    def __init__(self, stops):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text):
        """Add streamed text; return the text that is now safe to emit. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._longest_partial_match(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self):
        """The end of generation: held-back text did not turn into a match, release it."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_match(self, buf):
        """Length of the longest suffix of buf that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
