"""Each marketing platform's body templating, as that platform does it, for tests.

These stand in for the platforms' own renderers (which run in their clouds): text substitution
without JSON escaping, and each platform's documented behaviour for a missing attribute.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import liquid

TEMPLATES = Path(__file__).resolve().parent.parent / "examples" / "platforms"


class NotSent(Exception):
    """The platform would not send the webhook at all."""


def template(platform: str) -> str:
    return (TEMPLATES / f"{platform}.json").read_text()


def clevertap(profile: dict[str, str]) -> str:
    """`$Attribute` is replaced by the profile's value; an attribute the profile lacks stays as the
    literal token (so a missing phone arrives as "$Phone")."""
    return re.sub(
        r"\$([A-Za-z_][A-Za-z0-9_]*)", lambda m: profile.get(m.group(1), m.group(0)), template("clevertap")
    )


def moengage(attributes: dict[str, str], campaign_id: str) -> str:
    """Jinja-style `{{UserAttribute['x']}}`; a missing attribute without a default means MoEngage does
    not send the message."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    try:
        return env.from_string(template("moengage")).render(UserAttribute=attributes, CampaignId=campaign_id)
    except jinja2.UndefinedError as exc:
        raise NotSent(str(exc)) from None


def braze(attributes: dict[str, Any], campaign: dict[str, str]) -> str:
    """Braze Liquid: `{{${first_name}}}` reads a standard attribute; a missing one renders as ""."""
    source = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", r"\1", template("braze"))
    return liquid.Template(source).render(**attributes, campaign=campaign)


def webengage(user: dict[str, str], journey: dict[str, str]) -> str:
    """`${user.x}` / `${journey.x}`; a missing attribute renders as ""."""
    scopes = {"user": user, "journey": journey}

    def value(m: re.Match[str]) -> str:
        scope, _, name = m.group(1).partition(".")
        return str(scopes.get(scope, {}).get(name, ""))

    return re.sub(r"\$\{([A-Za-z_.]+)\}", value, template("webengage"))
