"""Phone numbers: E.164 normalisation of what callers send, and masking for logs."""

from __future__ import annotations

import re

import phonenumbers

# Separators people and platforms put in numbers; anything else (letters, unsubstituted
# tokens such as CleverTap's `$Phone`) makes the number invalid rather than being guessed at.
_SEPARATORS = re.compile(r"[\s\-().]")
_DIGITS_AFTER_PLUS = re.compile(r"^\+[0-9]{2,17}$")


class InvalidPhoneNumber(ValueError):
    """The value is not a valid international number."""


def normalize(raw: str) -> str:
    """Return `raw` as E.164 (`+919876543210`) or raise InvalidPhoneNumber saying why."""
    compact = _SEPARATORS.sub("", raw)
    if not compact.startswith("+"):
        raise InvalidPhoneNumber("must be in E.164 format, starting with + and the country code")
    if not _DIGITS_AFTER_PLUS.match(compact):
        raise InvalidPhoneNumber("must contain only digits after the +")
    try:
        parsed = phonenumbers.parse(compact, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhoneNumber(f"is not a phone number ({exc._msg})") from None
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidPhoneNumber("is not a valid number for its country")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def mask(number: str) -> str:
    """All but the last four digits hidden, for logs."""
    return "*" * max(len(number) - 4, 0) + number[-4:]
