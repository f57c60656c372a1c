"""Length-prefixed frames for the socket transport, split I/O-free."""

import pytest

from lmkernel.kernel import messages as m


def test_frames_split_across_any_chunking():
    payloads = [b"", b"a", b"x" * 70_000, m.encode(m.ListLoaded(id=3))]
    wire = b"".join(m.frame(p) for p in payloads)
    for chunk in (1, 3, 4096, len(wire)):
        decoder, got = m.FrameDecoder(), []
        for i in range(0, len(wire), chunk):
            got += decoder.feed(wire[i : i + chunk])
        assert got == payloads


def test_oversized_frames_are_refused():
    with pytest.raises(ValueError, match="over the limit"):
        m.FrameDecoder().feed((m.MAX_FRAME + 1).to_bytes(4, "big"))
