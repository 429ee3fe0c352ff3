"""The gateway's stop-string filter (services/gateway/stop_strings.py): the same text whatever
the chunking, nothing a stop string could start is sent early, and vLLM's search order."""

from __future__ import annotations

import itertools

import pytest

from services.gateway.stop_strings import StopStrings

TEXT = "Hello world.\n\nA second paragraph ends here.\n\nThird."


def run(stops: list[str], chunks: list[str], include: bool = False,
        finished: bool = True) -> tuple[str, str | None, list[str]]:
    f = StopStrings(stops, include)
    sent = [f.feed(c) for c in chunks]
    out = "".join(sent)
    if finished and f.matched is None:
        out += f.flush()
    return out, f.matched, sent


def splits(text: str, pieces: int) -> list[list[str]]:
    """Every way to cut `text` into `pieces` non-empty parts (short texts only)."""
    out = []
    for cuts in itertools.combinations(range(1, len(text)), pieces - 1):
        bounds = (0, *cuts, len(text))
        out.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return out


@pytest.mark.parametrize("stop", ["\n\n", "world", ".", "paragraph ends", "Third."])
def test_any_chunking_ends_at_the_first_occurrence(stop: str) -> None:
    want = TEXT[:TEXT.index(stop)]
    for chunks in splits(TEXT, 3)[::7]:
        out, matched, _ = run([stop], chunks)
        assert (out, matched) == (want, stop), chunks
        out, matched, _ = run([stop], chunks, include=True)
        assert (out, matched) == (want + stop, stop), chunks


def test_no_stop_string_in_the_text_sends_everything() -> None:
    for chunks in splits(TEXT, 3)[::11]:
        assert run(["nowhere", "\n\n\n"], chunks)[:2] == (TEXT, None)


def test_what_could_start_a_stop_string_is_held_back() -> None:
    f = StopStrings(["world"])
    assert f.feed("Hello wor") == "Hello"  # " wor": the 4 characters "world" could follow
    assert f.feed("m") == " "
    assert f.feed("s") == "w"
    assert f.flush() == "orms"


def test_nothing_is_held_back_when_the_stop_string_is_kept() -> None:
    f = StopStrings(["world"], include_in_output=True)
    assert f.feed("Hello wor") == "Hello wor"
    assert f.feed("ld and more") == "ld"
    assert f.matched == "world"
    assert f.feed("later text") == ""


def test_the_first_stop_string_in_request_order_wins_within_one_piece() -> None:
    # vLLM searches stop strings in the request's order, each over the new text
    assert run(["b", "a"], ["xab"])[:2] == ("xa", "b")
    assert run(["a", "b"], ["xab"])[:2] == ("x", "a")
    # a stop string completed by an earlier piece ends the text there
    assert run(["b", "a"], ["xa", "b"])[:2] == ("x", "a")


def test_unfinished_stream_keeps_the_held_text_until_flush() -> None:
    out, matched, sent = run(["\n\n"], ["line\n"], finished=False)
    assert (out, matched) == ("line", None)
    assert sent == ["line"]


def test_empty_stop_strings_are_ignored() -> None:
    assert run(["", "x"], ["abc", "xyz"])[:2] == ("abc", "x")
    assert run([""], ["abc"])[:2] == ("abc", None)
