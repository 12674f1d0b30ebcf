"""Differences between the library versions the project's range allows, in one place.

transformers renamed the cache argument of its models' `forward` from `past_key_values` to `cache`
(the old name warns from 5.2x and goes away in 5.40); `cache_arg` names whichever the installed
version takes, so no call warns and none breaks on either side of the rename.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any


@cache
def _takes_cache(forward: Any) -> bool:
    return "cache" in inspect.signature(forward).parameters


def cache_arg(module: Any, value: Any) -> dict[str, Any]:
    """`{"cache": value}` or `{"past_key_values": value}` for `module(...)`, as its version expects."""
    return {"cache" if _takes_cache(type(module).forward) else "past_key_values": value}
