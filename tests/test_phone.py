"""Phone number normalisation: E.164 out, or a clear reason."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentstudio.phone import InvalidPhoneNumber, mask, normalize


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("+919876543210", "+919876543210"),
        ("+91 98765 43210", "+919876543210"),
        ("+91-98765-43210", "+919876543210"),
        ("+1 (415) 555-2671", "+14155552671"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+49.30.901820", "+4930901820"),
    ],
)
def test_separators_are_removed(raw: str, e164: str) -> None:
    assert normalize(raw) == e164


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("$Phone", "E.164"),
        ("9876543210", "E.164"),
        ("+1-800-FLOWERS", "only digits"),
        ("+91 98765", "not a valid number"),
        ("+", "only digits"),
        ("+999 1234567", "not"),
    ],
)
def test_invalid_numbers_say_why(raw: str, why: str) -> None:
    with pytest.raises(InvalidPhoneNumber, match=why):
        normalize(raw)


@given(st.text(max_size=40))
def test_any_text_is_normalised_or_refused_never_crashes(raw: str) -> None:
    try:
        out = normalize(raw)
    except InvalidPhoneNumber:
        return
    assert out.startswith("+") and out[1:].isdigit() and normalize(out) == out


def test_mask_keeps_only_the_last_four_digits() -> None:
    assert mask("+919876543210") == "*********3210"
