"""Calling hours: weekly windows in the callee's time zones (hours.py) and jurisdiction presets shipped
as data (presets.py, presets.yaml). Pure functions the ingest, the dialers and the operator call."""

from .hours import HORIZON, HolidayRule, TimeRange, WeeklyHours, is_open, next_opening, zones_of
from .presets import MAX_CAP_WINDOW, CallingRules, FrequencyCap, Preset, Resolved, preset_for, presets, resolve

__all__ = [
    "HORIZON",
    "MAX_CAP_WINDOW",
    "CallingRules",
    "FrequencyCap",
    "HolidayRule",
    "Preset",
    "Resolved",
    "TimeRange",
    "WeeklyHours",
    "is_open",
    "next_opening",
    "preset_for",
    "presets",
    "resolve",
    "zones_of",
]
