"""What each marketing platform does with a webhook, as its documentation says: the form a
personalisation tag takes when the profile lacks the attribute, and the HTTP status it counts as
success. The bundle compiler reads these into each ApiKey's key entry by the key's `platform`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

SuccessStatus = Literal[200, 201]

# The whole value a platform sends in place of an attribute the profile lacks.
UNFILLED: dict[str, str] = {
    # CleverTap replaces `$Attribute` by the profile's value and leaves the token as it is when the
    # profile has none (the body arrives with "$Name"); a `$` followed by a letter or underscore, so
    # "$5" stays a price. We found no CleverTap page that states it (its docs describe Liquid
    # tags, docs.clevertap.com/docs/liquid-tags); it is how CleverTap bodies were seen to arrive
    # (issue 10) and what the project's CleverTap template assumes (tests/platforms.py).
    "clevertap": r"\$[A-Za-z_][A-Za-z0-9_]*",
    # Braze Liquid: "If a default value isn't provided and the field is missing or not set on the
    # user, the field will be blank in the message."
    # (braze.com/docs/user_guide/personalization_and_dynamic_content/liquid/setting_default_values/)
    "braze": "",
    # WebEngage: its documentation does not say what a missing attribute renders as, so no form is
    # assumed; a top-level "" counts as absent for every key anyway.
    # MoEngage has no unfilled form: "Personalization failure occurs when you use a user attribute
    # ... that is not present ... and do not configure a fallback", and the message is counted as
    # Failed to Send (help.moengage.com/hc/en-us/articles/30958502449300).
}

# WebEngage: "Responses with HTTP Status 200 will be treated as successful posts, everything else
# will be logged as failed webhook posts" (docs.webengage.com/docs/webhooks, "Response"), so a 201
# would be retried. Every other platform takes any 2xx.
SUCCESS_STATUS: dict[str, SuccessStatus] = {"webengage": 200}
DEFAULT_SUCCESS_STATUS: SuccessStatus = 201


def unfilled(platform: str | None) -> re.Pattern[str] | None:
    """The platform's unfilled-tag form as a whole-value pattern; None when it has none."""
    source = UNFILLED.get(platform) if platform else None
    return re.compile(source) if source is not None else None


def success_status(platform: str | None, declared: SuccessStatus | None) -> SuccessStatus:
    """The status an accepted call is answered with: the key's own choice, else its platform's."""
    if declared is not None:
        return declared
    return SUCCESS_STATUS.get(platform or "", DEFAULT_SUCCESS_STATUS)


def is_unfilled(form: re.Pattern[str], value: Any) -> bool:
    return isinstance(value, str) and form.fullmatch(value) is not None


def without_unfilled(form: re.Pattern[str], value: Any) -> Any:
    """`value` with every unfilled string inside its objects and arrays left out, at any depth:
    platforms substitute text anywhere in a body, and a tag left unfilled says nothing wherever it is."""
    # On every request of such a key: strings (nearly every value) cost one match and no call.
    match = form.fullmatch
    if isinstance(value, dict):
        return {
            k: without_unfilled(form, v) if isinstance(v, (dict, list)) else v
            for k, v in value.items()
            if not (isinstance(v, str) and match(v))
        }
    if isinstance(value, list):
        return [
            without_unfilled(form, v) if isinstance(v, (dict, list)) else v
            for v in value
            if not (isinstance(v, str) and match(v))
        ]
    return value
