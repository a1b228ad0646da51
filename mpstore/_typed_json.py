"""A record's JSON, refused where a value does not fit its field's type, without GIL hand-overs.

pydantic refuses such a value (one set by ``model_construct()``, or assigned without validation)
when asked with ``warnings="error"``. Taking that string costs four hand-overs of the GIL per
call: pydantic-core reads the argument as ``bool | str``, tries ``bool`` first, and PyO3 releases
the GIL while it normalizes the failed attempt's error. Where one process's threads write at
once, each hand-over wakes a thread that takes the GIL only to give it back: 16 threads writing
upserts at once made 12 context switches per write instead of 5.

So the record is serialized with ``warnings=True`` (a ``bool``, read at once), under a warnings
filter of mpstore's own, put first in ``warnings.filters``, that turns pydantic's serializer
warning, issued from this module and nowhere else, into an exception: the refusal pydantic's
error mode makes, with the same message. Where another filter would see that warning first
(``warnings.simplefilter("ignore")`` after mpstore's filter, say), where the filters are not a
list or may change at any moment (a build without the GIL, context-aware warnings), the record
goes to pydantic's error mode instead. If the filters changed while the record was serialized,
error mode is asked again and must agree. The tests compare the two modes over many values.

Left open: Python documents changing the warnings filters while other threads run as unsafe
(``catch_warnings`` is not thread-safe), and here too. A thread that changes them and restores
them while this call runs (Python code runs inside it: a serializer function, a computed field,
an enum's value, the warning's own display) can make pydantic's warning meet its filter unseen;
a value that does not fit is then stored, and reading it back fails.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

from pydantic_core import PydanticSerializationError, SchemaSerializer

__all__ = ["typed_json"]

#: pydantic-core's warning text for a value that does not fit (the start of it).
_WARNING = "Pydantic serializer warnings"
_HERE = re.escape(__name__) + r"\Z"
#: The filter as ``warnings.filterwarnings`` stores it: an error, for that warning from here only.
_OURS = ("error", re.compile(_WARNING, re.I), UserWarning, re.compile(_HERE), 0)

#: The filters list last looked at, a copy of its items, and whether the fast path is safe with
#: them (a tuple, replaced whole, so a thread reads one consistent view).
_seen: tuple[Any, list[Any], bool] = (None, [], False)


def typed_json(serializer: SchemaSerializer, record: object, by_alias: bool | None) -> bytes:
    """``serializer.to_json(record, by_alias=by_alias, warnings="error")``, at less cost.

    :raises PydanticSerializationError: a value does not fit its field's type, the record nests
        deeper than pydantic writes, or it serialised to different JSON when asked twice (only
        where the filters changed during the first call).
    """
    filters: Any = warnings.filters
    seen = _seen
    if not (filters is seen[0] and filters == seen[1]):
        seen = _look_at(filters)
    if not seen[2]:
        return serializer.to_json(record, by_alias=by_alias, warnings="error")
    try:
        data = serializer.to_json(record, by_alias=by_alias, warnings=True)
    except UserWarning as exc:
        if type(exc) is UserWarning and str(exc).startswith(_WARNING):  # our filter raised it
            raise PydanticSerializationError(str(exc)) from None
        raise
    if warnings.filters is filters and filters == seen[1]:
        return data
    # The filters changed during the call, so a warning may have met another filter than ours.
    # Asking again is the answer, if the record says the same the second time (an iterator in
    # it would say less).
    again = serializer.to_json(record, by_alias=by_alias, warnings="error")
    if again != data:
        raise PydanticSerializationError(
            "the record's JSON changed between two serialisations, so whether its values fit "
            "their fields' types is not known"
        )
    return data


def _look_at(filters: Any) -> tuple[Any, list[Any], bool]:
    """Remember whether our filter sees pydantic's warnings from here before any other filter
    of ``filters`` could, putting it first if it is missing."""
    global _seen
    safe = False
    gil = getattr(sys, "_is_gil_enabled", None)
    if (
        type(filters) is list
        and not getattr(sys.flags, "context_aware_warnings", False)  # else the list is not the rule
        and (gil is None or gil())  # else the filters can change at any moment of the call
    ):
        if _OURS not in filters:
            # Not through filterwarnings(), which would also reset which warnings the process has
            # already shown once, everywhere; the only registry that matters to ours is ours.
            filters.insert(0, _OURS)
        for item in filters:
            if item == _OURS:
                safe = True
                break
            if _may_take(item):
                break
        # Any warning from here the registry remembers would be skipped before any filter.
        globals().pop("__warningregistry__", None)
    seen = (filters, list(filters) if type(filters) is list else [], safe)
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
