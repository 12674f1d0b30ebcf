"""Conversation rules and stop strings without a model: which conversations are refused, and how the stop
matcher holds back text that may start a stop string."""

from __future__ import annotations

import pytest

from janus_core.errors import InvalidRequestError
from janus_core.text.conversation import Message, check_conversation
from janus_core.text.stops import StopMatcher


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "xy"])
    assert m.feed("abcE") == "abc"  # "E" may start "END"
    assert m.feed("Nope") == "ENope"
    assert m.feed("..EN") == ".."
    assert m.feed("D and more") == ""
    assert m.stopped and m.text == "abcENope.."
    assert m.feed("later") == ""


def test_stop_strings_count_only_from_the_first_armed_text():
    """Before a request's min_tokens the matcher shows everything; a stop string counts once armed, and
    never reaches back into text already shown."""
    m = StopMatcher(["END"])
    assert m.feed("an END", armed=False) == "an END"
    assert m.feed("EN", armed=False) == "EN"
    assert m.feed("D then ") == "D then "  # "EN" was shown: it cannot start a stop string now
    assert m.feed("END, done") == "" and m.stopped and m.text == "an ENDEND then "


@pytest.mark.parametrize(("messages", "message"), [
    ([], "must not be empty"),
    ([Message("user", "hi"), Message("assistant", "yo")], "last message must be from the user"),
    ([Message("user", "hi"), Message("system", "late"), Message("user", "x")], "system messages must come before"),
    ([Message("assistant", "hi", 1), Message("user", "x")], "only user messages may carry images"),
    ([Message("tool", "x")], "role is 'tool'"),
    ([Message("user", "  ")], "needs text or an image"),
    ([Message("user", "a <image_placeholder> b")], "reserved token"),
])
def test_conversation_rules(messages, message):
    with pytest.raises(InvalidRequestError, match=message):
        check_conversation(messages)
