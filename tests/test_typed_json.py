"""A record's JSON is refused exactly where pydantic's ``warnings="error"`` mode refuses it,
whatever the process's warnings filters say, and mpstore's own filter touches no other warning."""

from __future__ import annotations

import datetime
import sqlite3
import warnings
from collections.abc import Iterator
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


def error_mode(model: type[BaseModel], record: BaseModel) -> tuple[str, object]:
    try:
        return ("json", model.__pydantic_serializer__.to_json(record, warnings="error"))
    except PydanticSerializationError as exc:
        return ("refused", str(exc))


def ours(model: type[BaseModel], record: BaseModel) -> tuple[str, object]:
    try:
        return ("json", typed_json(model.__pydantic_serializer__, record, None))
    except PydanticSerializationError as exc:
        return ("refused", str(exc))


@pytest.fixture
def own_filters() -> Iterator[None]:
    """The process's filters as a program that configured none has them: mpstore's goes first."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        yield


@settings(max_examples=300, deadline=None)
@given(model=st.sampled_from(MODELS), value=st.sampled_from(VALUES))
def test_refuses_what_error_mode_refuses(model: type[BaseModel], value: Any) -> None:
    with warnings.catch_warnings():
        warnings.resetwarnings()
        record = model.model_construct(f=value)
        assert ours(model, record) == error_mode(model, record)
        assert _typed_json._seen[3], "the call did not take the path without the string"


class Recorder:
    """Stands in for a model's serializer: records each ``warnings`` it is asked with."""

    def __init__(self, fail_with_bool: bool = False, on_bool: Any = None) -> None:
        self.asked: list[object] = []
        self.fail_with_bool = fail_with_bool
        self.on_bool = on_bool

    def to_json(self, record: object, *, by_alias: bool | None, warnings: object) -> bytes:
        self.asked.append(warnings)
        if warnings is True:
            if self.on_bool is not None:
                self.on_bool()
            if self.fail_with_bool:
                raise UserWarning("Pydantic serializer warnings: stand-in")
            return b"fast"
        return b"strict"


def test_no_filter_before_ours_takes_the_bool(own_filters: None) -> None:
    recorder = Recorder()
    assert typed_json(recorder, object(), None) == b"fast"  # type: ignore[arg-type]
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
    ids=[
        "ignore",
        "always",
        "ignore-user",
        "ignore-mpstore",
        "ignore-text",
        "deprecation",
        "other",
    ],
)
def test_a_filter_that_could_see_the_warning_first_sends_it_to_error_mode(
    own_filters: None, install: Any, asked: list[object]
) -> None:
    typed_json(Recorder(), object(), None)  # type: ignore[arg-type]
    install()  # after mpstore's: ahead of it
    recorder = Recorder()
    typed_json(recorder, object(), None)  # type: ignore[arg-type]
    assert recorder.asked == asked


def test_an_exception_on_the_fast_path_leaves_the_outcome_to_error_mode(own_filters: None) -> None:
    recorder = Recorder(fail_with_bool=True)
    assert typed_json(recorder, object(), None) == b"strict"  # type: ignore[arg-type]
    assert recorder.asked == [True, "error"]


def test_filters_changed_during_the_call_send_it_to_error_mode(own_filters: None) -> None:
    recorder = Recorder(on_bool=lambda: warnings.simplefilter("ignore"))
    assert typed_json(recorder, object(), None) == b"strict"  # type: ignore[arg-type]
    assert recorder.asked == [True, "error"]


class Item(BaseModel):
    id: str
    count: int = 0


@pytest.mark.parametrize("action", ["default", "ignore", "always", "error", "once", "module"])
def test_a_value_that_does_not_fit_is_refused_whatever_the_filters(
    store: mpstore.Store, db_path: str, action: Any
) -> None:
    items = store.collection("items", Item, key="id")
    items.upsert(Item(id="a", count=1))
    with warnings.catch_warnings():
        warnings.simplefilter(action)
        for _ in range(2):  # a second time, where "once" or "default" would stay quiet
            with pytest.raises(mpstore.RecordTypeError, match="does not fit its field's type"):
                items.upsert(Item.model_construct(id="a", count="many"))
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT value FROM items").fetchall() == [('{"id":"a","count":1}',)]


def test_other_warnings_are_untouched(own_filters: None) -> None:
    typed_json(Item.__pydantic_serializer__, Item(id="a"), None)
    assert warnings.filters[0] == _typed_json._OURS
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.resetwarnings()
        warnings.filterwarnings("always")
        typed_json(Item.__pydantic_serializer__, Item(id="a"), None)  # mpstore's goes first again
        warnings.warn("Pydantic serializer warnings: said by the caller", UserWarning, stacklevel=1)
        Item.model_construct(id="a", count="many").model_dump_json()  # pydantic warns the caller
    assert [str(w.message).splitlines()[0] for w in seen] == [
        "Pydantic serializer warnings: said by the caller",
        "Pydantic serializer warnings:",
    ]
