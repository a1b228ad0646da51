"""A record's JSON is refused exactly where pydantic's ``warnings="error"`` mode refuses it,
whatever the process's warnings filters say, and mpstore's own filter touches no other warning."""

from __future__ import annotations

import datetime
import operator
import sqlite3
import sys
import threading
import types
import warnings
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import (
    BaseModel,
    PlainSerializer,
    SerializeAsAny,
    WrapSerializer,
    computed_field,
    field_serializer,
    model_serializer,
)
from pydantic_core import PydanticSerializationError

import mpstore
from mpstore import _typed_json
from mpstore._collection import calls_back
from mpstore._typed_json import typed_json


class Part(BaseModel):
    x: int = 0
    y: str = ""


class Cat(BaseModel):
    kind: Literal["cat"] = "cat"
    lives: int = 9


class Dog(BaseModel):
    kind: Literal["dog"] = "dog"
    name: str = ""


class Wrapped(BaseModel):
    id: str = "a"
    count: int = 0

    @field_serializer("count", mode="wrap")
    def _count(self, value: Any, handler: Any) -> Any:
        return handler(value)


class WrappedWhole(BaseModel):
    id: str = "a"
    count: int = 0

    @model_serializer(mode="wrap")
    def _whole(self, handler: Any) -> Any:
        return handler(self)


class WrappedType(BaseModel):
    id: str = "a"
    count: Annotated[int, WrapSerializer(lambda value, handler: handler(value))] = 0


class HoldsAny(BaseModel):
    value: Any = None


FIELD_TYPES: list[Any] = [
    int,
    str,
    float,
    bool,
    int | None,
    int | str,
    list[int],
    dict[str, int],
    tuple[int, str],
    set[int],
    datetime.datetime,
    Literal["a", "b"],
    Part,
    list[Part],
    Cat | Dog,
    Any,
    Annotated[int, PlainSerializer(lambda v: v * 2, return_type=int)],
    Annotated[int, WrapSerializer(lambda v, handler: handler(v))],
    Wrapped,
]

VALUES: list[Any] = [
    0,
    -7,
    "x",
    "1",
    1.5,
    True,
    None,
    b"ab",
    [1, 2],
    ["a", 1],
    {"a": 1},
    {"a": "b"},
    (1, "a"),
    {1, 2},
    datetime.datetime(2020, 1, 1),
    "a",
    Part(),
    Part.model_construct(x="not an int"),
    [Part(), Part.model_construct(y=3)],
    Cat(),
    Dog.model_construct(name=5),
    object(),
    Wrapped(),
    Wrapped.model_construct(count="not an int"),
]

MODELS = [
    type(
        f"Holder{i}",
        (BaseModel,),
        {"__annotations__": {"f": tp}, "model_config": {"arbitrary_types_allowed": True}},
    )
    for i, tp in enumerate(FIELD_TYPES)
]


def dump(record: BaseModel, by_alias: bool | None = None) -> bytes:
    """The record's JSON as a collection makes it."""
    model = type(record)
    return typed_json(model.__pydantic_serializer__, record, by_alias, calls_back(model))


def error_mode(
    model: type[BaseModel], record: BaseModel, by_alias: bool | None
) -> tuple[str, object]:
    try:
        return (
            "json",
            model.__pydantic_serializer__.to_json(record, by_alias=by_alias, warnings="error"),
        )
    except PydanticSerializationError as exc:
        return ("refused", str(exc))


def ours(model: type[BaseModel], record: BaseModel, by_alias: bool | None) -> tuple[str, object]:
    try:
        return ("json", dump(record, by_alias))
    except PydanticSerializationError as exc:
        return ("refused", str(exc))


@pytest.fixture
def own_filters() -> Iterator[None]:
    """The process's filters as a program that configured none has them: mpstore's goes first."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        yield


#: Filter set-ups, added after mpstore's own filter, and whether it still decides first.
AFTER_OURS: dict[str, tuple[Any, bool]] = {
    "none": (lambda: None, True),
    "deprecations ignored": (lambda: warnings.simplefilter("ignore", DeprecationWarning), True),
    "all errors": (lambda: warnings.simplefilter("error"), False),
    "all ignored": (lambda: warnings.simplefilter("ignore"), False),
    "user warnings shown": (lambda: warnings.simplefilter("always", UserWarning), False),
}


@settings(max_examples=400, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    value=st.sampled_from(VALUES),
    by_alias=st.sampled_from([None, True, False]),
    setup=st.sampled_from(sorted(AFTER_OURS)),
)
def test_refuses_what_error_mode_refuses(
    model: type[BaseModel], value: Any, by_alias: bool | None, setup: str
) -> None:
    install, fast = AFTER_OURS[setup]
    with warnings.catch_warnings():
        warnings.resetwarnings()
        dump(Part())  # mpstore's filter goes first
        install()
        record = model.model_construct(f=value)
        mine, theirs = ours(model, record, by_alias), error_mode(model, record, by_alias)
        if isinstance(value, Wrapped) and not calls_back(model) and theirs[0] == "refused":
            assert mine[0] == "refused"  # with a message that names the serializer
        else:
            assert mine == theirs
        if not calls_back(model):
            assert _typed_json._seen[2] is fast, "the call took the other path"


class Recorder:
    """Stands in for a model's serializer: records each ``warnings`` it is asked with."""

    def __init__(
        self,
        on_bool: Any = None,
        raise_on_bool: BaseException | None = None,
        strict: bytes = b"json",
    ) -> None:
        self.asked: list[object] = []
        self.on_bool = on_bool
        self.raise_on_bool = raise_on_bool
        self.strict = strict

    def to_json(self, record: object, *, by_alias: bool | None, warnings: object) -> bytes:
        self.asked.append(warnings)
        if warnings is not True:
            return self.strict
        if self.on_bool is not None:
            self.on_bool()
        if self.raise_on_bool is not None:
            raise self.raise_on_bool
        return b"json"


def ask(recorder: Recorder) -> bytes:
    return typed_json(recorder, Part(), None, False)  # type: ignore[arg-type]


def test_no_filter_before_ours_takes_the_bool(own_filters: None) -> None:
    recorder = Recorder()
    assert ask(recorder) == b"json"
    assert recorder.asked == [True]
    assert warnings.filters[0] == _typed_json._OURS


@pytest.mark.parametrize(
    ("install", "asked"),
    [
        (lambda: warnings.simplefilter("ignore"), ["error"]),
        (lambda: warnings.simplefilter("always"), ["error"]),
        (lambda: warnings.filterwarnings("ignore", category=UserWarning), ["error"]),
        (lambda: warnings.filterwarnings("ignore", module="mpstore"), ["error"]),
        (lambda: warnings.filterwarnings("ignore", message="Pydantic"), ["error"]),
        (lambda: warnings.filterwarnings("ignore", category=DeprecationWarning), [True]),
        (lambda: warnings.filterwarnings("ignore", module="elsewhere"), ["error"]),
    ],
    ids=["ignore", "always", "user", "mpstore", "text", "deprecation", "other"],
)
def test_a_filter_that_could_see_the_warning_first_sends_it_to_error_mode(
    own_filters: None, install: Any, asked: list[object]
) -> None:
    ask(Recorder())
    install()  # after mpstore's: ahead of it
    recorder = Recorder()
    ask(recorder)
    assert recorder.asked == asked


def test_a_filter_changed_in_place_is_seen(own_filters: None) -> None:
    filters: Any = warnings.filters
    deprecations = ("ignore", None, DeprecationWarning, None, 0)
    filters[:] = [deprecations, _typed_json._OURS, ("default", None, ImportWarning, None, 0)]
    recorder = Recorder()
    ask(recorder)
    assert recorder.asked == [True]  # the first filter cannot take a UserWarning
    filters[1], filters[2] = ("ignore", None, Warning, None, 0), _typed_json._OURS
    recorder = Recorder()
    ask(recorder)  # the same list, length and first item: only the items say
    assert recorder.asked == ["error"]


def test_filters_that_are_not_a_list_send_it_to_error_mode(own_filters: None) -> None:
    warnings.filters = tuple(warnings.filters)
    recorder = Recorder()
    assert ask(recorder) == b"json"
    assert recorder.asked == ["error"]


def test_without_the_gil_it_goes_to_error_mode(
    own_filters: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    monkeypatch.setattr(_typed_json, "_seen", (None, [], False))
    recorder = Recorder()
    ask(recorder)
    assert recorder.asked == ["error"]


def test_our_filters_error_is_pydantics_refusal_asked_once(own_filters: None) -> None:
    recorder = Recorder(raise_on_bool=UserWarning("Pydantic serializer warnings:\n  stand-in"))
    with pytest.raises(PydanticSerializationError) as raised:
        ask(recorder)
    assert str(raised.value) == "Pydantic serializer warnings:\n  stand-in"
    assert recorder.asked == [True]


@pytest.mark.parametrize(
    "error", [ValueError("a serializer failed"), UserWarning("said by a serializer")]
)
def test_any_other_error_passes_through_asked_once(own_filters: None, error: BaseException) -> None:
    recorder = Recorder(raise_on_bool=error)
    with pytest.raises(type(error)) as raised:
        ask(recorder)
    assert raised.value is error
    assert recorder.asked == [True]


def test_filters_changed_during_the_call_ask_error_mode_again(own_filters: None) -> None:
    recorder = Recorder(on_bool=lambda: warnings.simplefilter("ignore"))
    assert ask(recorder) == b"json"
    assert recorder.asked == [True, "error"]


def test_a_second_answer_that_differs_is_a_refusal(own_filters: None) -> None:
    recorder = Recorder(on_bool=lambda: warnings.simplefilter("ignore"), strict=b"other")
    with pytest.raises(PydanticSerializationError, match="changed between two serialisations"):
        ask(recorder)


class Item(BaseModel):
    id: str
    count: int = 0


class Stream(BaseModel):
    id: str
    counts: Iterable[int] = ()


def stored(db_path: str, table: str) -> list[tuple[str]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(f"SELECT value FROM {table}").fetchall()


@pytest.mark.parametrize("before", [True, False], ids=["mpstore-first", "user-first"])
@pytest.mark.parametrize("action", ["default", "ignore", "always", "error", "once", "module"])
def test_a_value_that_does_not_fit_is_refused_whatever_the_filters(
    store: mpstore.Store, db_path: str, action: Any, before: bool
) -> None:
    items = store.collection("items", Item, key="id")
    with warnings.catch_warnings():
        warnings.resetwarnings()
        if before:  # mpstore's filter is added ahead of it, on the first write
            warnings.simplefilter(action)
        items.upsert(Item(id="a", count=1))
        if not before:
            warnings.simplefilter(action)
        for _ in range(2):  # again, where "once" or "default" would stay quiet
            with pytest.raises(mpstore.RecordTypeError, match="does not fit its field's type"):
                items.upsert(Item.model_construct(id="a", count="many"))
            assert _typed_json._seen[2] is before  # the path taken: without the string or with
    assert stored(db_path, "items") == [('{"id":"a","count":1}',)]


def test_a_value_that_does_not_fit_in_an_iterator_is_refused(
    store: mpstore.Store, db_path: str, own_filters: None
) -> None:
    streams = store.collection("streams", Stream, key="id")
    with pytest.raises(mpstore.RecordTypeError, match="does not fit its field's type"):
        streams.upsert(Stream.model_construct(id="a", counts=iter(["not an int", 2])))
    assert stored(db_path, "streams") == []


def shown_once() -> None:
    warnings.warn("shown once where the filters say default", UserWarning, stacklevel=1)


def test_adding_the_filter_leaves_what_was_shown_once_as_it_was() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        shown_once()
        dump(Item(id="a"))  # adds mpstore's filter
        assert warnings.filters[0] == _typed_json._OURS
        shown_once()
    assert [str(w.message) for w in seen] == ["shown once where the filters say default"]


def test_other_warnings_are_untouched(own_filters: None) -> None:
    warnings.simplefilter("always")
    dump(Item(id="a"))
    assert warnings.filters[0] == _typed_json._OURS
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("Pydantic serializer warnings: said by the caller", UserWarning, stacklevel=1)
        Item.model_construct(id="a", count="many").model_dump_json()  # pydantic warns the caller
    assert [str(w.message).splitlines()[0] for w in seen] == [
        "Pydantic serializer warnings: said by the caller",
        "Pydantic serializer warnings:",
    ]


def test_filters_changed_while_they_are_looked_at_are_looked_at_again(own_filters: None) -> None:
    """Another thread puts an "ignore" filter first just after mpstore found its own filter
    first: the decision stands for the filters it judged, and the next call sees a list that
    differs from them."""
    code = _typed_json._look_at.__code__
    injected: list[bool] = []

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None

        def step(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_locals.get("safe") is True and not injected:
                injected.append(True)
                other = threading.Thread(target=warnings.simplefilter, args=("ignore",))
                other.start()
                other.join()
            return step

        return step

    sys.settrace(trace)
    try:
        dump(Item(id="a"))
    finally:
        sys.settrace(None)
    assert injected
    assert warnings.filters[0] == ("ignore", None, Warning, None, 0)
    for _ in range(2):
        with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
            dump(Item.model_construct(id="a", count="x"))
    assert not _typed_json._seen[2]


class Odd:
    """A filter item whose comparison fails."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("cannot compare")

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    "item",
    [
        ["ignore", None, ImportWarning, None, 0],
        ("ignore", None, ImportWarning, None, None),
        ("ignore", 5, ImportWarning, None, 0),
        ("ignore", None, ImportWarning, None, 0, "sixth"),
        ("ignore", None, (ImportWarning, 5), None, 0),
        Odd(),
    ],
    ids=["list", "lineno-none", "message-int", "six-items", "category-not-a-class", "odd"],
)
def test_filters_python_would_fail_on_send_it_to_error_mode(own_filters: None, item: Any) -> None:
    dump(Item(id="a"))  # mpstore's filter goes first
    filters: Any = warnings.filters
    filters.insert(0, item)
    assert dump(Item(id="a")) == b'{"id":"a","count":0}'
    with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
        dump(Item.model_construct(id="a", count="x"))
    assert not _typed_json._seen[2]


class NulRepr(str):
    def __repr__(self) -> str:
        return "'a\x00b'"


def test_a_value_whose_description_holds_a_nul_is_refused(
    store: mpstore.Store, db_path: str, own_filters: None
) -> None:
    items = store.collection("items", Item, key="id")
    with pytest.raises(mpstore.RecordTypeError, match="does not fit its field's type"):
        items.upsert(Item.model_construct(id="a", count=NulRepr("many")))
    assert stored(db_path, "items") == []


def test_a_warning_that_met_another_filter_during_the_call_is_noticed(
    own_filters: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the module leaves open, played in one thread: during the call a "default"
    filter goes first and comes out again, all in place. Showing the warning leaves it in
    this module's registry, which gives it away: error mode is asked again. The registry is
    emptied of it, so the same record is then refused by mpstore's filter at the first ask.
    (Asked of typed_json itself: a collection would also read such a record back, as its
    model has a serializer function.)"""
    shown_first = ("default", None, Warning, None, 0)
    filters: Any = warnings.filters
    asked: list[str] = []

    def put_first(value: str) -> str:
        asked.append(value)
        if value == "race" and asked.count("race") == 1:
            filters.insert(0, shown_first)
        return value

    def shown(*args: Any, **kwargs: Any) -> None:
        filters.remove(shown_first)

    class Racy(BaseModel):
        count: int = 0
        note: Annotated[str, PlainSerializer(put_first)] = ""

    monkeypatch.setattr(warnings, "showwarning", shown)
    assert dump(Racy()) == b'{"count":0,"note":""}'
    for race, asks in (("race", 2), ("again", 1)):
        asked.clear()
        assert _typed_json._seen[2]  # no filter is in the way before the call
        with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
            dump(Racy.model_construct(count="many", note=race))
        assert len(asked) == asks
        assert filters[0] == _typed_json._OURS  # the "default" filter came out again


@pytest.mark.parametrize("model", [Wrapped, WrappedWhole, WrappedType])
def test_a_wrap_serializer_sends_its_records_to_error_mode(
    store: mpstore.Store, db_path: str, own_filters: None, model: type[BaseModel]
) -> None:
    """A wrap serializer's handler issues the warnings of what it serialized from that Python
    function, not from mpstore's call: such records are asked with the string."""
    assert calls_back(model)
    assert not calls_back(HoldsAny) and not calls_back(Item)
    bad = model.model_construct(count="many")
    assert ours(model, bad, None) == error_mode(model, bad, None)
    assert ours(model, model(), None) == error_mode(model, model(), None)
    collection = store.collection("wrapped", model, key="id")
    with pytest.raises(mpstore.RecordTypeError, match="does not fit its field's type"):
        collection.upsert(bad)
    assert stored(db_path, "wrapped") == []


@pytest.mark.parametrize("action", ["default", "ignore", "always"])
def test_a_wrapped_model_in_an_any_field_is_refused_where_error_mode_refuses(
    own_filters: None, action: Any
) -> None:
    """Held in a field typed ``Any``, the model is known only when the record is: its handler's
    warning comes from its serializer's frame, during mpstore's call, and is an error there
    (the message names the serializer, as error mode's does not)."""
    dump(Part())  # mpstore's filter goes first
    warnings.simplefilter(action, DeprecationWarning)  # ahead of it, and in nobody's way
    bad = HoldsAny(value=Wrapped.model_construct(count="many"))
    assert error_mode(HoldsAny, bad, None)[0] == "refused"
    with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
        dump(bad)
    assert _typed_json._seen[2]
    good = HoldsAny(value=Wrapped(count=2))
    assert dump(good) == b'{"value":{"id":"a","count":2}}'


def test_outside_mpstores_call_pydantics_warning_is_the_callers(own_filters: None) -> None:
    dump(Part())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Wrapped.model_construct(count="many").model_dump_json()
        HoldsAny(value=Wrapped.model_construct(count="many")).model_dump_json()
    assert [str(w.message).splitlines()[0] for w in seen] == ["Pydantic serializer warnings:"] * 2


@pytest.mark.parametrize(
    ("category", "text"),
    [
        (UserWarning, "count is negative"),
        (DeprecationWarning, "old_style is deprecated"),
        (DeprecationWarning, "Pydantic serializer warnings: said by a serializer"),
    ],
    ids=["user-warning", "deprecation", "pydantic-text"],
)
def test_a_serializers_own_warnings_are_left_in_the_registry(
    own_filters: None, category: type[Warning], text: str
) -> None:
    """A serializer function's warning, pointed one frame up, is issued from mpstore's frame.
    Under "default" it is shown once, as without mpstore, and stays remembered; no record is
    asked twice for it."""
    calls: list[int] = []

    def says(value: int) -> int:
        calls.append(value)
        warnings.warn(text, category, stacklevel=2)
        return value

    class Saying(BaseModel):
        count: Annotated[int, PlainSerializer(says)] = 0

    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for _ in range(3):
            assert dump(Saying()) == b'{"count":0}'
        assert _typed_json._seen[2]
    assert [str(w.message) for w in seen] == [text]
    assert seen[0].filename == _typed_json.__file__
    assert calls == [0, 0, 0]


class CountingDict(dict[Any, Any]):
    """A warning registry that says how it was read."""

    def __init__(self) -> None:
        super().__init__()
        self.whole = 0
        self.newest = 0

    def __iter__(self) -> Any:
        self.whole += 1
        return super().__iter__()

    def __reversed__(self) -> Any:
        self.newest += 1
        return super().__reversed__()


def test_the_registry_is_read_whole_once_then_only_what_was_added() -> None:
    registry = CountingDict()
    registry["version"] = 1
    for n in range(100):
        registry[(f"said {n}", UserWarning, 1)] = True
    assert not _typed_json._forget_ours(registry)
    assert (registry.whole, registry.newest) == (1, 0)
    assert not _typed_json._forget_ours(registry)  # nothing added: nothing read
    assert (registry.whole, registry.newest) == (1, 0)
    registry[(f"{_typed_json._WARNING}:\n  x", UserWarning, 63)] = True
    assert _typed_json._forget_ours(registry)
    assert (registry.whole, registry.newest) == (1, 1)
    assert len(registry) == 101
    # Python empties the registry when the filters change, and fills it again, maybe to the
    # same size: the version it holds says so.
    keys = list(registry)[2:]
    registry.clear()
    registry["version"] = 2
    registry[(f"{_typed_json._WARNING}:\n  y", UserWarning, 63)] = True
    for key in keys:
        registry[key] = True
    assert len(registry) == 101
    whole = registry.whole
    assert _typed_json._forget_ours(registry)
    assert registry.whole == whole + 1


def test_a_filter_for_mpstores_module_by_name_is_in_the_way(own_filters: None) -> None:
    dump(Part())
    filters: Any = warnings.filters
    filters.insert(0, ("ignore", None, UserWarning, "mpstore._typed_json", 0))
    recorder = Recorder()
    ask(recorder)
    assert recorder.asked == ["error"]


def test_context_aware_warnings_go_to_error_mode(
    own_filters: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "flags", types.SimpleNamespace(context_aware_warnings=True))
    monkeypatch.setattr(_typed_json, "_seen", (None, [], False))
    recorder = Recorder()
    ask(recorder)
    assert recorder.asked == ["error"]


class OwnWarning(UserWarning):
    pass


def test_a_warning_subclass_with_pydantics_text_passes_through(own_filters: None) -> None:
    error = OwnWarning("Pydantic serializer warnings: said by a serializer")
    recorder = Recorder(raise_on_bool=error)
    with pytest.raises(OwnWarning) as raised:
        ask(recorder)
    assert raised.value is error


def test_a_filter_that_cannot_be_compared_is_never_compared(own_filters: None) -> None:
    dump(Part())
    filters: Any = warnings.filters
    filters.append(("ignore", None, ImportWarning, None, 0))
    dump(Part())
    filters[-1] = Odd()  # the same length, an item moved in place
    assert dump(Item(id="a")) == b'{"id":"a","count":0}'
    with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
        dump(Item.model_construct(id="a", count="x"))
    assert _typed_json._seen[2]


class Other(BaseModel):
    n: int = 0


class Noting(BaseModel):
    id: str = "a"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def note(self) -> str:
        return Other.model_construct(n="x").model_dump_json()


class NotingField(BaseModel):
    id: str = "a"
    note: Annotated[
        str, PlainSerializer(lambda v: Other.model_construct(n=v).model_dump_json())
    ] = "x"


@pytest.mark.parametrize("model", [Noting, NotingField])
def test_another_models_warning_during_the_call_is_left_to_its_caller(
    own_filters: None, model: type[BaseModel]
) -> None:
    """Code of the record that dumps some other mistyped model gets pydantic's warning, as it
    would without mpstore; the record itself fits, and is written."""
    dump(Part())
    with warnings.catch_warnings(record=True) as seen:  # no other filter: shown once
        mine = ours(model, model(), None)
        assert _typed_json._seen[2]
        assert mine == error_mode(model, model(), None)
    assert mine[0] == "json"
    assert seen and all(str(w.message).startswith("Pydantic serializer warnings") for w in seen)


def written_on_the_fast_path(serialize: Any, quiet: str) -> None:
    """A record whose one field ``serialize`` serializes is written, on the path without the
    string. Warnings whose text starts with ``quiet`` are hidden by a filter after mpstore's,
    so not in its way."""

    class Noted(BaseModel):
        note: Annotated[str, PlainSerializer(serialize)] = ""

    dump(Part())
    warnings.filterwarnings("ignore", message=quiet, append=True)
    assert dump(Noted()) == b'{"note":""}'
    assert _typed_json._seen[2]


def test_another_threads_warning_during_the_call_is_left_to_it(own_filters: None) -> None:
    raised: list[BaseException | None] = []

    def elsewhere() -> None:
        try:
            Other.model_construct(n="x").model_dump_json()  # meets mpstore's filter first
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    def meanwhile(value: str) -> str:
        other = threading.Thread(target=elsewhere)
        other.start()
        other.join()
        return value

    written_on_the_fast_path(meanwhile, "Pydantic serializer warnings")
    assert raised == [None]


class Base(BaseModel):
    id: str = "a"


class WrappedChild(Base):
    count: int = 0

    @model_serializer(mode="wrap")
    def _whole(self, handler: Any) -> Any:
        return handler(self)


class HoldsBase(BaseModel):
    id: str = "a"
    part: SerializeAsAny[Base] = Base()


def test_serialize_as_any_takes_error_mode(store: mpstore.Store, db_path: str) -> None:
    assert calls_back(HoldsBase)
    bad = HoldsBase(part=WrappedChild.model_construct(count="many"))
    assert ours(HoldsBase, bad, None) == error_mode(HoldsBase, bad, None)
    with pytest.raises(mpstore.RecordTypeError, match="does not fit its field's type"):
        store.collection("holders", HoldsBase, key="id").upsert(bad)
    assert stored(db_path, "holders") == []


def test_a_class_not_built_yet_is_asked_again() -> None:
    class Late:
        __pydantic_core_schema__: Any = object()  # as a MockCoreSchema stands in

    assert calls_back(Late)
    Late.__pydantic_core_schema__ = {"type": "int"}
    assert not calls_back(Late)


class AddsWhilePopped(dict[Any, Any]):
    """A registry to which another thread adds a key while mpstore takes its own out."""

    def pop(self, *args: Any) -> Any:
        result = super().pop(*args)
        self[(f"{_typed_json._WARNING}:\n  added meanwhile", UserWarning, 63)] = True
        return result


def test_a_key_added_while_the_registry_is_looked_at_is_read_next_time() -> None:
    registry = AddsWhilePopped()
    registry["version"] = 7
    registry[(f"{_typed_json._WARNING}:\n  first", UserWarning, 63)] = True
    assert _typed_json._forget_ours(registry)
    assert len(registry) == 2  # the version, and the key added meanwhile
    assert _typed_json._forget_ours(registry)


def test_filters_replaced_during_the_call_are_seen(own_filters: None) -> None:
    def replace(value: str) -> str:
        warnings.filters = [("ignore", None, Warning, None, 0), *warnings.filters]
        return value

    class Replacing(BaseModel):
        count: int = 0
        note: Annotated[str, PlainSerializer(replace)] = ""

    dump(Part())
    with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
        dump(Replacing.model_construct(count="many", note=""))


def test_on_error_modes_path_mpstores_filter_matches_nothing(own_filters: None) -> None:
    """A record asked with the string (its model has a wrap serializer) whose serializer issues
    a warning with pydantic's text: it stays a warning, as in error mode alone."""

    def says(value: str) -> str:
        warnings.warn("Pydantic serializer warnings: said by a serializer", stacklevel=1)
        return value

    class Saying(Wrapped):
        note: Annotated[str, PlainSerializer(says)] = ""

    dump(Part())
    warnings.filterwarnings("ignore", message="Pydantic serializer warnings", append=True)
    assert calls_back(Saying)
    assert ours(Saying, Saying(), None) == error_mode(Saying, Saying(), None)
    assert ours(Saying, Saying(), None)[0] == "json"


class WrappedItem(Item):
    @field_serializer("count", mode="wrap")
    def _count(self, value: Any, handler: Any) -> Any:
        return handler(value)


def test_a_subclass_records_own_serializers_decide_how_it_is_asked(
    store: mpstore.Store, own_filters: None
) -> None:
    """The collection's model has no wrap serializer, the record's class has one: the record is
    asked as its own class says, with error mode's refusal and message."""
    items = store.collection("items", Item, key="id")
    bad = WrappedItem.model_construct(id="a", count="many")
    kind, message = error_mode(WrappedItem, bad, None)
    assert kind == "refused"
    with pytest.raises(mpstore.RecordTypeError) as refused:
        items.upsert(bad)
    assert str(message) in str(refused.value)


def test_a_schema_whose_default_holds_itself_is_looked_at_once() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop

    class Looping(BaseModel):
        value: Any = loop

    assert not calls_back(Looping)


def handler_in_a_comprehension(self: Any, value: Any, handler: Any) -> Any:
    return [handler([item])[0] for item in value]


def handler_in_a_generator(self: Any, value: Any, handler: Any) -> Any:
    return list(handler([item])[0] for item in value)


def handler_through_a_helper(self: Any, value: Any, handler: Any) -> Any:
    def helper() -> Any:
        return handler(value)

    return helper()


@pytest.mark.parametrize(
    "serialize", [handler_in_a_comprehension, handler_in_a_generator, handler_through_a_helper]
)
def test_a_handler_called_deeper_in_a_wrap_serializer_is_still_seen(
    own_filters: None, serialize: Any
) -> None:
    class Deep(BaseModel):
        counts: list[int] = []
        _counts = field_serializer("counts", mode="wrap")(serialize)

    dump(Part())
    bad = HoldsAny(value=Deep.model_construct(counts=["not an int"]))
    assert error_mode(HoldsAny, bad, None)[0] == "refused"
    with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
        dump(bad)
    assert _typed_json._seen[2]
    assert dump(HoldsAny(value=Deep(counts=[1]))) == b'{"value":{"counts":[1]}}'


class DumpsOther(BaseModel):
    by_method: Annotated[Any, PlainSerializer(operator.methodcaller("model_dump", mode="json"))] = (
        None
    )
    by_function: Annotated[Any, PlainSerializer(Other.model_dump_json)] = None


def test_a_pydantic_dump_used_as_a_serializer_warns_its_caller(own_filters: None) -> None:
    dump(Part())
    other = Other.model_construct(n="x")
    record = DumpsOther(by_method=other, by_function=other)
    with warnings.catch_warnings(record=True) as seen:
        mine = ours(DumpsOther, record, None)
        assert _typed_json._seen[2]
        assert mine == error_mode(DumpsOther, record, None)
    assert mine == ("json", b'{"by_method":{"n":"x"},"by_function":"{\\"n\\":\\"x\\"}"}')
    assert seen


def test_only_pydantics_own_text_is_refused(own_filters: None) -> None:
    def says(value: str) -> str:
        warnings.warn(
            "pydantic serializer warnings: lower case, said by a serializer", stacklevel=1
        )
        return value

    written_on_the_fast_path(says, "pydantic serializer")
