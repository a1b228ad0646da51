"""A record's JSON is refused exactly where pydantic's ``warnings="error"`` mode refuses it,
whatever the process's warnings filters say, and mpstore's own filter touches no other warning."""

from __future__ import annotations

import datetime
import inspect
import sqlite3
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, PlainSerializer
from pydantic_core import PydanticSerializationError

import mpstore
from mpstore import _typed_json
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
]

MODELS = [
    type(
        f"Holder{i}",
        (BaseModel,),
        {"__annotations__": {"f": tp}, "model_config": {"arbitrary_types_allowed": True}},
    )
    for i, tp in enumerate(FIELD_TYPES)
]


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
        return ("json", typed_json(model.__pydantic_serializer__, record, by_alias))
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
        typed_json(Part.__pydantic_serializer__, Part(), None)  # mpstore's filter goes first
        install()
        record = model.model_construct(f=value)
        assert ours(model, record, by_alias) == error_mode(model, record, by_alias)
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
    return typed_json(recorder, object(), None)  # type: ignore[arg-type]


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
        (lambda: warnings.filterwarnings("ignore", module="elsewhere"), [True]),
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
        typed_json(Item.__pydantic_serializer__, Item(id="a"), None)  # adds mpstore's filter
        assert warnings.filters[0] == _typed_json._OURS
        shown_once()
    assert [str(w.message) for w in seen] == ["shown once where the filters say default"]


def test_other_warnings_are_untouched(own_filters: None) -> None:
    warnings.simplefilter("always")
    typed_json(Item.__pydantic_serializer__, Item(id="a"), None)
    assert warnings.filters[0] == _typed_json._OURS
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("Pydantic serializer warnings: said by the caller", UserWarning, stacklevel=1)
        Item.model_construct(id="a", count="many").model_dump_json()  # pydantic warns the caller
    assert [str(w.message).splitlines()[0] for w in seen] == [
        "Pydantic serializer warnings: said by the caller",
        "Pydantic serializer warnings:",
    ]


def test_filters_changed_while_they_are_looked_at_are_looked_at_again(own_filters: None) -> None:
    """Another thread puts an "ignore" filter first just after mpstore copied the filters to
    decide: the decision stands for the copy, and the next call sees a list that differs."""
    code = _typed_json._look_at.__code__
    lines, first = inspect.getsourcelines(_typed_json._look_at)
    after_copy = first + next(i for i, line in enumerate(lines) if "snapshot = list(" in line) + 1

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None

        def step(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == after_copy:
                other = threading.Thread(target=warnings.simplefilter, args=("ignore",))
                other.start()
                other.join()
            return step

        return step

    sys.settrace(trace)
    try:
        typed_json(Item.__pydantic_serializer__, Item(id="a"), None)
    finally:
        sys.settrace(None)
    assert warnings.filters[0] == ("ignore", None, Warning, None, 0)
    for _ in range(2):
        with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
            typed_json(Item.__pydantic_serializer__, Item.model_construct(id="a", count="x"), None)
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
    typed_json(Item.__pydantic_serializer__, Item(id="a"), None)  # mpstore's filter goes first
    filters: Any = warnings.filters
    filters.insert(0, item)
    assert typed_json(Item.__pydantic_serializer__, Item(id="a"), None) == b'{"id":"a","count":0}'
    with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
        typed_json(Item.__pydantic_serializer__, Item.model_construct(id="a", count="x"), None)
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
    this module's registry, which gives it away. (Asked of typed_json itself: a collection
    would also read such a record back, as its model has a serializer function.)"""
    shown_first = ("default", None, Warning, None, 0)
    filters: Any = warnings.filters

    raced: list[bool] = []

    def put_first(value: str) -> str:
        if value == "race" and not raced:  # once: error mode, asked again, runs this again
            raced.append(True)
            filters.insert(0, shown_first)
        return value

    def shown(*args: Any, **kwargs: Any) -> None:
        filters.remove(shown_first)

    class Racy(BaseModel):
        count: int = 0
        note: Annotated[str, PlainSerializer(put_first)] = ""

    monkeypatch.setattr(warnings, "showwarning", shown)
    serializer = Racy.__pydantic_serializer__
    assert typed_json(serializer, Racy(), None) == b'{"count":0,"note":""}'
    for _ in range(2):  # the race, then the same record again with the registry emptied
        assert _typed_json._seen[2]  # no filter is in the way before the call
        with pytest.raises(PydanticSerializationError, match="Pydantic serializer warnings"):
            typed_json(serializer, Racy.model_construct(count="many", note="race"), None)
        assert filters[0] == _typed_json._OURS  # the "default" filter came out again
    assert raced


def test_a_serializers_own_warning_from_here_is_shown_once_and_asks_nothing_again(
    own_filters: None,
) -> None:
    """A serializer function's warning, pointed one frame up, is issued from this module's
    call; under "default" it is shown once, as without mpstore, and no record is asked twice."""
    calls: list[int] = []

    def old_style(value: int) -> int:
        calls.append(value)
        warnings.warn("old_style is deprecated", DeprecationWarning, stacklevel=2)
        return value

    class Legacy(BaseModel):
        count: Annotated[int, PlainSerializer(old_style)] = 0

    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for _ in range(3):
            assert typed_json(Legacy.__pydantic_serializer__, Legacy(), None) == b'{"count":0}'
        assert _typed_json._seen[2]
    assert [str(w.message) for w in seen] == ["old_style is deprecated"]
    assert seen[0].filename == _typed_json.__file__
    assert calls == [0, 0, 0]
