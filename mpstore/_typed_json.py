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
(``warnings.simplefilter("ignore")`` after mpstore's filter, say), where a filter is of a shape
Python's own lookup would fail on, where the filters are not a list or may change at any moment
(a build without the GIL, context-aware warnings), the record goes to pydantic's error mode
instead. If the filters changed during the call, or this module's warning registry remembers a
warning (a filter that showed it once), error mode is asked again and must give the same JSON.
The tests compare the two modes over many values and filter set-ups.

Left open, all of them corners:
- Python documents changing the warnings filters while other threads run as unsafe
  (``catch_warnings`` is not thread-safe), and here too. A thread that puts an "ignore" or
  "always" filter first and takes it out again while this call runs (Python code runs inside
  it: a serializer function, a computed field, an enum's value) can make pydantic's warning
  unseen; a value that does not fit is then stored, and reading it back fails.
- Asked again, a record holding an iterator the first call used up is refused, though it fits.
- A serializer function of the record that issues its own warning starting "Pydantic
  serializer warnings", pointed at this module's frame, gets the record refused.
- A value whose description holds a NUL character is refused with a message of mpstore's own
  (pydantic cannot issue a warning with such a text).
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
_GLOBALS = globals()


def typed_json(serializer: SchemaSerializer, record: object, by_alias: bool | None) -> bytes:
    """``serializer.to_json(record, by_alias=by_alias, warnings="error")``, at less cost.

    :raises PydanticSerializationError: a value does not fit its field's type, the record nests
        deeper than pydantic writes, or it serialised to different JSON when asked twice (only
        where something may have seen pydantic's warning before our filter).
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
    except ValueError as exc:
        if str(exc).startswith("nul byte found"):  # pydantic could not issue its warning's text
            raise PydanticSerializationError(
                f"{_WARNING}: a value does not fit its field's type, and its description holds "
                f"a NUL character ({exc})"
            ) from None
        raise
    registry = _GLOBALS.get("__warningregistry__")
    remembered = registry is not None and len(registry) > 1 and _forget_ours(registry)
    if not remembered and warnings.filters is filters and filters == seen[1]:
        return data
    # The filters changed during the call, or pydantic's warning was remembered (a remembered
    # warning is skipped before any filter sees it): it may have gone unseen.
    # Asking again is the answer, if the record says the same the second time (an iterator in
    # it would say less, and a record whose iterator was used up is refused).
    again = serializer.to_json(record, by_alias=by_alias, warnings="error")
    if again != data:
        raise PydanticSerializationError(
            "the record's JSON changed between two serialisations, so whether its values fit "
            "their fields' types is not known"
        )
    return data


def _forget_ours(registry: dict[Any, Any]) -> bool:
    """Take pydantic's serializer warnings out of this module's warning registry (Python keeps
    there, by text, category and line, the warnings a filter showed once); whether there were
    any. Other warnings issued from here (a serializer function's own) are left as they are."""
    ours = [
        key
        for key in registry
        if type(key) is tuple
        and len(key) == 3
        and key[1] is UserWarning
        and isinstance(key[0], str)
        and key[0].startswith(_WARNING)
    ]
    for key in ours:
        registry.pop(key, None)
    return bool(ours)


def _look_at(filters: Any) -> tuple[Any, list[Any], bool]:
    """Remember whether our filter sees pydantic's warnings from here before any other filter
    of ``filters`` could, putting it first if it is missing."""
    global _seen
    safe = False
    snapshot: list[Any] = []
    gil = getattr(sys, "_is_gil_enabled", None)
    if (
        type(filters) is list
        and not getattr(sys.flags, "context_aware_warnings", False)  # else the list is not the rule
        and (gil is None or gil())  # else the filters can change at any moment of the call
    ):
        try:
            if not any(item is _OURS or _is_ours(item) for item in filters):
                # Not through filterwarnings(), which would also reset which warnings the
                # process has already shown once, everywhere.
                filters.insert(0, _OURS)
            # Decided over a copy, the one remembered: the list may change meanwhile.
            snapshot = list(filters)
            for item in snapshot:
                if _is_ours(item):
                    safe = True
                    break
                if _may_take(item):
                    break
        except Exception:
            # An item the warnings module would not make (its own lookup would raise on it):
            # pydantic's error mode does not consult the filters.
            safe = False
    seen = (filters, snapshot, safe)
    _seen = seen
    return seen


def _is_ours(item: object) -> bool:
    return type(item) is tuple and item == _OURS


def _may_take(item: Any) -> bool:
    """Whether the filter ``item`` could match pydantic's serializer warning issued from here,
    or make Python's lookup of a filter fail before ours is reached. Its text is not known in
    advance, so a text pattern counts as matching."""
    if type(item) is not tuple or len(item) != 5:
        return True
    action, message, category, module, lineno = item
    if not (
        type(action) is str
        and (message is None or type(message) is str or isinstance(message, re.Pattern))
        and (module is None or type(module) is str or isinstance(module, re.Pattern))
        and type(lineno) is int
        and (isinstance(category, type) or type(category) is tuple)
    ):
        return True
    if not issubclass(UserWarning, category):
        return False
    if module is None:
        return True
    if isinstance(module, str):  # compared whole, as Python's own lookup compares a string
        return module == __name__
    return module.match(__name__) is not None
