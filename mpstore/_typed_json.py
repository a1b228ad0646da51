"""A record's JSON, refused where a value does not fit its field's type, without GIL hand-overs.

pydantic refuses such a value (one set by ``model_construct()``, or assigned without validation)
when asked with ``warnings="error"``. Taking that string costs four hand-overs of the GIL per
call: pydantic-core reads the argument as ``bool | str``, tries ``bool`` first, and PyO3 releases
the GIL while it normalizes the failed attempt's error. Where one process's threads write at
once, each hand-over wakes a thread that takes the GIL only to give it back: 16 threads writing
upserts at once made 12 context switches per write instead of 5.

So the record is serialized with ``warnings=True`` (a ``bool``, read at once), under a warnings
filter of mpstore's own, put first in ``warnings.filters``, that turns pydantic's serializer
warning into an exception when it is issued inside that call (by pydantic at its end, or by a
wrap serializer's handler, however deep in the serializer), but not by a pydantic dump of some
other model met on the way, and leaves it alone everywhere else: the refusal pydantic's error
mode makes, with the same message. Error mode is asked instead for a model with a wrap
serializer or a ``SerializeAsAny`` field (a handler issues the warnings of what it serialized
from the serializer's own frame, with that frame's warning registry), and where another filter
could see the warning first (``warnings.simplefilter("ignore")`` after mpstore's, a filter for
some module's warnings), where a filter is of a shape Python's own lookup would fail on, or
where the filters are not a list or may change at any moment (a build without the GIL,
context-aware warnings). If the filters changed during the call, or this module's warning
registry remembers pydantic's warning (a filter that showed it once), error mode is asked again
and must give the same JSON. The tests compare the two modes over many values and filter
set-ups.

Left open, all of them corners:
- Python documents changing the warnings filters while other threads run as unsafe
  (``catch_warnings`` is not thread-safe), and here too. A thread that puts an "ignore" or
  "always" filter first and takes it out again while this call runs (Python code runs inside
  it: a serializer function, a computed field, an enum's value) can make pydantic's warning
  unseen; a value that does not fit is then stored, and reading it back fails.
- A model with a wrap serializer held in a field typed ``Any`` is known only when the record
  is. A value in it that does not fit is refused with a message that names the serializer; and
  it is stored if the same warning was shown once before from the same line of that serializer
  (under a "default" filter, outside mpstore: Python skips it), or if the serializer runs its
  handler in another thread or greenlet (its warning is then issued outside this call).
- Asked again, a record holding an iterator the first call used up is refused, though it fits.
- A serializer function or computed field of the record that issues its own warning starting
  "Pydantic serializer warnings", or serializes some other mistyped value with a pydantic
  serializer's ``to_python`` or ``to_json`` itself (an override of ``model_dump`` or of
  ``TypeAdapter.dump_python`` that does so included), gets the record refused.
- A value whose description holds a NUL character is refused with a message of mpstore's own
  (pydantic cannot issue a warning with such a text).
"""

from __future__ import annotations

import contextvars
import itertools
import re
import sys
import warnings
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic_core import PydanticSerializationError, SchemaSerializer

__all__ = ["typed_json"]

#: pydantic-core's warning text for a value that does not fit (the start of it).
_WARNING = "Pydantic serializer warnings"


#: Whether this context (thread, greenlet) may be inside :func:`_fast`: a cheap first answer
#: for the warnings issued anywhere else.
_in_call: contextvars.ContextVar[bool] = contextvars.ContextVar("mpstore_typed_json", default=False)


class _ThisCall:
    """The module pattern of mpstore's filter. It matches a warning issued inside
    :func:`typed_json`'s own call to pydantic (:func:`_fast`): by pydantic at its end, or by a
    function pydantic called, such as a wrap serializer's handler, however deep in that
    function. Not one issued by a pydantic dump of some other model met on the way (a computed
    field's ``model_dump_json()``, a serializer that is ``Other.model_dump``). Python's lookup
    asks it about every warning issued in the process, so it answers first what is cheapest to
    know."""

    __slots__ = ()

    def match(self, module: str) -> bool | None:
        if not _in_call.get():
            return None
        frame: Any = sys._getframe(1)  # the frame that issued the warning
        while frame is not None:
            code = frame.f_code
            if code is _FAST:
                return True
            if code in _DUMPS:
                return None
            frame = frame.f_back
        return None


#: mpstore's filter: pydantic's serializer warning, issued during mpstore's call, is an error.
_OURS = ("error", re.compile(_WARNING), UserWarning, _ThisCall(), 0)

#: The filters list last looked at, a copy of its items, and whether the fast path is safe with
#: them (a tuple, replaced whole, so a thread reads one consistent view).
_seen: tuple[Any, list[Any], bool] = (None, [], False)
_GLOBALS = globals()
#: This module's warning registry as last looked at by _forget_ours: the dict, the filters'
#: version it held (Python empties it when the filters change) and its size then.
_registry_seen: tuple[object, object, int] = (None, None, 0)


def typed_json(
    serializer: SchemaSerializer, record: object, by_alias: bool | None, error_mode: bool
) -> bytes:
    """``serializer.to_json(record, by_alias=by_alias, warnings="error")``, at less cost.
    ``error_mode``: ask that way in any case (the record's class may call a serializer's
    handler from Python: see ``mpstore._collection.calls_back``).

    :raises PydanticSerializationError: a value does not fit its field's type, the record nests
        deeper than pydantic writes, or it serialised to different JSON when asked twice (only
        where something may have seen pydantic's warning before our filter).
    """
    if error_mode:
        return serializer.to_json(record, by_alias=by_alias, warnings="error")
    filters: Any = warnings.filters
    seen = _seen
    if not _unchanged(filters, seen):
        seen = _look_at(filters)
    if not seen[2]:
        return serializer.to_json(record, by_alias=by_alias, warnings="error")
    try:
        data = _fast(serializer, record, by_alias)
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
    if not remembered and warnings.filters is filters and _unchanged(filters, seen):
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


def _fast(serializer: SchemaSerializer, record: object, by_alias: bool | None) -> bytes:
    """The call under mpstore's filter: its frame is what :class:`_ThisCall` looks for."""
    token = _in_call.set(True)
    try:
        return serializer.to_json(record, by_alias=by_alias, warnings=True)
    finally:
        _in_call.reset(token)


def _forget_ours(registry: dict[Any, Any]) -> bool:
    """Take pydantic's serializer warnings out of this module's warning registry (Python keeps
    there, by text, category and line, the warnings a filter showed once); whether there were
    any. Other warnings issued from here (a serializer function's own) are left as they are.
    Only keys added since the last look are read (the registry keeps its order), each read in
    one step that no other thread can interleave."""
    global _registry_seen
    size = len(registry)
    version = registry.get("version")
    last, last_version, last_size = _registry_seen
    same = last is registry and version == last_version
    if same and size == last_size:
        return False
    if same and size > last_size:
        keys: tuple[Any, ...] = tuple(itertools.islice(reversed(registry), size - last_size))
    else:
        keys = tuple(registry)
    ours = [
        key
        for key in keys
        if type(key) is tuple
        and len(key) == 3
        and key[1] is UserWarning
        and isinstance(key[0], str)
        and key[0].startswith(_WARNING)
    ]
    for key in ours:
        registry.pop(key, None)
    # Not len(registry): a key another thread added meanwhile must be read next time.
    _registry_seen = (registry, version, size - len(ours))
    return bool(ours)


def _unchanged(filters: Any, seen: tuple[Any, list[Any], bool]) -> bool:
    """Whether ``filters`` is the list last looked at, holding the same items."""
    try:
        # Equal items are the same objects, which a list compares without asking them.
        return filters is seen[0] and filters == seen[1]
    except Exception:
        return False  # an item that cannot be compared: the list changed


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
            if not any(_is_ours(item) for item in filters):
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
    return type(item) is tuple and len(item) == 5 and item[3] is _OURS[3]


def _may_take(item: Any) -> bool:
    """Whether the filter ``item`` could match pydantic's serializer warning, or make Python's
    lookup of a filter fail before ours is reached. Its text is not known in advance, so a text
    pattern counts as matching; nor is the module it comes from (a wrap serializer's, in an
    ``Any`` field), so a module pattern does too."""
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
    return issubclass(UserWarning, category)


_FAST = _fast.__code__
#: pydantic's own dumps: a warning issued inside one is about the model it dumps.
_DUMPS = frozenset(
    f.__code__
    for f in (
        BaseModel.model_dump,
        BaseModel.model_dump_json,
        TypeAdapter.dump_python,
        TypeAdapter.dump_json,
    )
)
