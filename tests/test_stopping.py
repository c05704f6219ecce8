"""Stop sequences over streamed chunks: never emitted, even across chunk boundaries; held text released."""

from hypothesis import given, settings
from hypothesis import strategies as st

from llama_pkg.stopping import StopMatcher


def run(stops, chunks):
    m = StopMatcher(stops)
    out = [m.feed(c) for c in chunks]
    if not m.stopped:
        out.append(m.flush())
    return out, m.stopped


def test_stop_split_across_chunks():
    out, stopped = run(["User:"], ["Hello ", "Us", "er", ": more"])
    assert stopped and "".join(out) == "Hello "
    assert out[1] == "" and out[2] == ""  # "Us", "Uer" held back while they could still match


def test_held_text_released_when_it_does_not_match():
    out, stopped = run(["User:"], ["a Us", "e it"])
    assert not stopped and out == ["a ", "Use it", ""]


def test_held_text_released_at_the_end():
    out, stopped = run(["</answer>"], ["done </ans"])
    assert not stopped and "".join(out) == "done </ans" and out[-1] == "</ans"


def test_earliest_of_several_stops_wins():
    out, stopped = run(["bb", "abc"], ["xxab", "cbb"])
    assert stopped and "".join(out) == "xx"


def test_stop_inside_one_chunk_and_nothing_after():
    m = StopMatcher(["\n\n"])
    assert m.feed("one\n\ntwo") == "one" and m.stopped
    assert m.feed("three") == "" and m.flush() == ""


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet="ab,\n", max_size=6), max_size=12),
       st.lists(st.text(alphabet="ab,\n", min_size=1, max_size=3), max_size=3))
def test_output_is_the_text_up_to_the_first_stop(chunks, stops):
    text = "".join(chunks)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[:min(hits)] if hits else text
    out, stopped = run(stops, chunks)
    assert "".join(out) == expected
    assert stopped == bool(hits)
    for s in stops:
        assert s not in "".join(out)


def test_a_longer_stop_that_starts_first_wins_over_a_shorter_one_completed_inside_it():
    """Found by the property test above: the text is cut where the first stop starts, even when a shorter
    stop completes while the longer one is still arriving (and when the stream ends inside it)."""
    assert run([",", "b,,"], ["b,", ","]) == (["", ""], True)
    assert run([",", "b,,"], ["b,", "a"]) == (["", "b"], True)
    assert run([",", "b,,"], ["b,"]) == (["", "b"], True)  # the stream ended inside "b,,": "," is the stop
