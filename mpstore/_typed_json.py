"""A record's JSON, refused where a value does not fit its field's type, without GIL hand-overs.

pydantic refuses such a value (one set by ``model_construct()``, or assigned without validation)
when asked with ``warnings="error"``. Taking that string costs four hand-overs of the GIL per
call: pydantic-core reads the argument as ``bool | str``, tries ``bool`` first, and PyO3 releases
the GIL while it normalizes the failed attempt's error. Where one process's threads write at
once, each hand-over wakes a thread that takes the GIL only to give it back: 16 threads writing
upserts at once made 12 context switches per write instead of 5.

So the record is serialized with ``warnings=True`` (a ``bool``, read at once), under a warnings
filter of mpstore's own that turns pydantic's serializer warning, issued from this module and
nowhere else, into an exception. Any exception sends the record to pydantic's error mode, whose
outcome (the JSON, or the error) is the call's; so is every call made while another filter would
see those warnings first (``warnings.simplefilter("ignore")``, ``-W error``), or while the filters
changed during the call. The two modes refuse the same values (the tests compare them).

Left open: a thread that changes the filters and restores them, all while this call gives up the
GIL inside a Python serializer of the record, makes the change unseen here; a value that does not
fit is then stored, and reading it back fails.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

from pydantic_core import SchemaSerializer

__all__ = ["typed_json"]

#: pydantic-core's warning text for a value that does not fit (the start of it).
_WARNING = "Pydantic serializer warnings"
_HERE = re.escape(__name__) + r"\Z"
#: The filter as ``warnings.filterwarnings`` stores it: an error, for that warning from here only.
_OURS = ("error", re.compile(_WARNING, re.I), UserWarning, re.compile(_HERE), 0)

#: The filters list last looked at, its length and first item, and whether the fast path is safe
#: with it (a tuple, replaced whole, so a thread reads one consistent view).
_seen: tuple[Any, int, object, bool] = (None, 0, None, False)


def typed_json(serializer: SchemaSerializer, record: object, by_alias: bool | None) -> bytes:
    """``serializer.to_json(record, by_alias=by_alias, warnings="error")``, at less cost.

    :raises PydanticSerializationError: a value does not fit its field's type, or the record
        nests deeper than pydantic writes (as pydantic's error mode raises them).
    """
    filters: Any = warnings.filters
    first = filters[0] if filters else None
    seen = _seen
    if not (filters is seen[0] and len(filters) == seen[1] and first is seen[2]):
        seen = _look_at(filters)
    if seen[3]:
        try:
            data = serializer.to_json(record, by_alias=by_alias, warnings=True)
        except Exception:
            # A value that does not fit (the filter raised), or a serializer that failed:
            # pydantic's error mode decides, and says what it always says.
            return serializer.to_json(record, by_alias=by_alias, warnings="error")
        now: Any = warnings.filters
        if now is filters and len(now) == seen[1] and (now[0] if now else None) is seen[2]:
            return data
    return serializer.to_json(record, by_alias=by_alias, warnings="error")


def _look_at(filters: Any) -> tuple[Any, int, object, bool]:
    """Remember whether our filter sees pydantic's warnings from here before any other filter
    of ``filters`` could, putting it first if it is missing."""
    global _seen
    safe = False
    if not getattr(sys.flags, "context_aware_warnings", False):  # else the list is not the rule
        if _OURS not in filters:
            warnings.filterwarnings("error", message=_WARNING, category=UserWarning, module=_HERE)
            filters = warnings.filters
        for item in filters:
            if item == _OURS:
                safe = True
                break
            if _may_take(item):
                break
    seen = (filters, len(filters), filters[0] if filters else None, safe)
    _seen = seen
    return seen


def _may_take(item: Any) -> bool:
    """Whether the filter ``item`` could match pydantic's serializer warning issued from here
    (its text is not known in advance, so a text pattern counts as matching)."""
    try:
        _, _, category, module, _ = item
        if not issubclass(UserWarning, category):
            return False
        return module is None or module.match(__name__) is not None
    except (TypeError, ValueError, AttributeError):
        return True  # a filter of a shape the warnings module would not make: assume it could
