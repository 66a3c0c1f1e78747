"""Jurisdiction presets (shipped as data in presets.yaml, each citing its source), which one applies to
a callee's number, and resolving a policy's choice of preset and its overrides into the rules to apply."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Annotated, Literal

import phonenumbers
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, TypeAdapter, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic.alias_generators import to_camel

from .hours import WeeklyHours

AUTO = "auto"
NONE = "none"
# The longest window a frequency cap may count over, and so how long the frequency bucket keeps a number's
# placements after its last one: a quarter, past the longest shipped rule (France: 4 calls in 30 days)
# and the monthly or quarterly caps compliance teams set themselves.
MAX_CAP_WINDOW = 90 * 86400
STORED = "stored"  # validation context key: reading what an earlier version compiled, not a manifest


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


class FrequencyCap(_Model):
    """At most `count` placed calls to one number per `window_seconds`."""

    count: PositiveInt
    window_seconds: Annotated[PositiveInt, Field(json_schema_extra={"maximum": MAX_CAP_WINDOW})]

    @field_validator("window_seconds")
    @classmethod
    def _kept_long_enough(cls, value: int, info: ValidationInfo) -> int:
        # Refused in manifests (the CRD's maximum says the same); a bundle compiled before the limit
        # still loads, so an upgrade stops no tenant: its longer window counts the 90 days kept.
        if value > MAX_CAP_WINDOW and not (info.context or {}).get(STORED):
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}",
                                      {"le": MAX_CAP_WINDOW})
        return value


class Preset(_Model):
    """A jurisdiction's rules as shipped: where it applies, its hours, its cap, its source."""

    source: str = Field(min_length=1)
    countries: tuple[str, ...] = Field(min_length=1)
    area_codes: tuple[int, ...] = ()
    hours: WeeklyHours
    cap: FrequencyCap | None = None


@functools.cache
def presets() -> dict[str, Preset]:
    """The shipped presets by name."""
    text = resources.files(__package__).joinpath("presets.yaml").read_text(encoding="utf-8")
    return TypeAdapter(dict[str, Preset]).validate_python(yaml.safe_load(text))


def preset_for(number: str) -> str | None:
    """The preset that applies to a callee's number: by its country, and for the US by the area code
    a state's law presumes residence by (else US federal); None when no preset covers the country."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    country = phonenumbers.region_code_for_number(parsed)
    national = str(parsed.national_number)
    area_code = int(national[:3]) if parsed.country_code == 1 and len(national) == 10 else None
    by_country = None
    for name, preset in presets().items():
        if country not in preset.countries:
            continue
        if not preset.area_codes:
            by_country = by_country or name
        elif area_code in preset.area_codes:
            return name
    return by_country


class CallingRules(_Model):
    """What a policy says about calling hours: a preset by name, `auto` (the one for the callee's
    number) or `none`, and overrides: its own `hours` replace the preset's, its own `cap` the preset's."""

    preset: str = AUTO
    hours: WeeklyHours | None = None
    cap: FrequencyCap | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        if name not in (AUTO, NONE) and name not in presets():
            raise ValueError(f"{name!r} is not a preset: one of {AUTO}, {NONE}, {', '.join(presets())}")
        return name


class Resolved(_Model):
    """The rules for one call: `hours` None means no calling-hours restriction, `cap` None no cap."""

    preset: str | None
    hours: WeeklyHours | None
    cap: FrequencyCap | None
    hours_from: Literal["policy", "preset", "none"]


def resolve(rules: CallingRules, number: str) -> Resolved:
    """The hours and cap that apply to calling `number` under `rules`."""
    name = preset_for(number) if rules.preset == AUTO else None if rules.preset == NONE else rules.preset
    preset = presets()[name] if name else None
    if rules.hours is not None:
        hours, hours_from = rules.hours, "policy"
    elif preset is not None:
        hours, hours_from = preset.hours, "preset"
    else:
        hours, hours_from = None, "none"
    cap = rules.cap if rules.cap is not None else preset.cap if preset else None
    return Resolved(preset=name, hours=hours, cap=cap, hours_from=hours_from)
