"""Stop strings with hold-back of partial matches."""

from lmkernel.kernel._stops import StopMatcher


def feed_all(stops, pieces):
    matcher = StopMatcher(stops)
    out = [matcher.feed(p) for p in pieces]
    if not matcher.stopped:
        out.append(matcher.flush())
    return out, matcher


def test_partial_match_is_held_back_then_released():
    out, matcher = feed_all(["END"], ["abc E", "N", "x"])
    assert out == ["abc ", "", "ENx", ""]
    assert not matcher.stopped


def test_stop_spanning_pieces_is_cut_and_never_emitted():
    out, matcher = feed_all(["END"], ["abc E", "N", "D more"])
    assert out == ["abc ", "", ""]
    assert matcher.stopped and matcher.matched == "END"


def test_earliest_of_several_stops_wins():
    out, matcher = feed_all(["zz", "$"], ["ls -l\n$ z", "z"])
    assert out == ["ls -l\n", ""] and matcher.matched == "$"


def test_only_genuine_prefixes_are_held():
    out, _ = feed_all(["\n\n"], ["a\n", "b", "\n", "\nc"])
    assert out == ["a", "\nb", "", ""]
    assert "".join(out) == "a\nb"


def test_no_stop_strings_passes_through():
    out, _ = feed_all([], ["a", "b"])
    assert out == ["a", "b", ""]
