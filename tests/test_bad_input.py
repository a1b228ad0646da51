"""What a careless caller does, case by case: each gets a clear typed error and leaves the
database exactly as it was (the hash of its logical dump, taken over a fresh connection) and the
gate free."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired

import pytest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializeAsAny,
    ValidationError,
    computed_field,
    with_config,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from typing_extensions import TypedDict

import mpstore
from tests.models import Note


class Item(BaseModel):
    id: str
    group: int = 0
    tags: list[str] = []


class Other(BaseModel):
    id: str
    text: str


class IntKeyed(BaseModel):
    n: int


class Loose(BaseModel):
    id: str
    extra: Any = None


class Short(BaseModel):
    id: str
    code: str = Field(max_length=3)


class Measure(BaseModel):
    id: str
    x: float = 0.0
    y: float | None = None
    series: list[float] = []


class Aliased(BaseModel):
    id: str
    name: str = Field(default="", alias="fullName")


class Computed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def upper(self) -> str:
        return self.id.upper()


class ItemWithMore(Item):
    colour: str = "red"


class ShoutedKey(BaseModel):
    id: Annotated[str, PlainSerializer(str.upper)]


class HiddenKey(BaseModel):
    id: str = Field(exclude=True)


class Pair(BaseModel):
    id: str
    a: str = ""
    b: str = ""
    a_b: str = ""


class Cased(BaseModel):
    id: str
    A: int = 0
    a: int = 0


#: A key as a file name with an undecodable byte arrives (os.fsdecode): UTF-8 cannot hold it.
_SURROGATE = os.fsdecode(b"report-\xff")


@pydantic_dataclass
class Point:
    x: int = Field(alias="X")


class WithPoint(BaseModel):
    id: str
    p: Point


class Options(TypedDict):
    level: Annotated[int, Field(alias="Level")]


class WithOptions(BaseModel):
    id: str
    o: Options


@with_config(ConfigDict(serialize_by_alias=True))  # pydantic writes it by its model's setting
class AliasedOptions(TypedDict):
    level: Annotated[int, Field(alias="Level")]


class WithAliasedOptions(BaseModel):
    id: str
    o: AliasedOptions


class MaybeOptions(TypedDict):
    level: NotRequired[Annotated[int, Field(alias="Level")]]


class AliasedHolder(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)  # writes the TypedDict as "Level"
    label: str = Field(alias="Label")
    a: MaybeOptions


class SharedOptions(BaseModel):
    id: str
    holder: AliasedHolder
    o: MaybeOptions  # the same TypedDict, written "level" here: its key would be dropped


class Point2(TypedDict):
    x: float | None


class Calibrated(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")
    lo: Point2
    hi: Point2  # used twice: a definition of the schema, walked first from here


class SharedPoints(BaseModel):
    id: str
    cal: Calibrated = Calibrated(lo={"x": 0.0}, hi={"x": 1.0})
    p: Point2 = {"x": 0.0}


@with_config(ConfigDict(ser_json_inf_nan="strings"))  # pydantic writes it by its model's
class OwnPoint(TypedDict):
    x: float | None


class ChoiceA(TypedDict):
    kind: Literal["a"]
    x: float | None


class ChoiceB(TypedDict):
    kind: Literal["b"]


class TextNaNs(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")  # not among a union's choices
    u: ChoiceA | ChoiceB


class Constants(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")  # not among a union's choices
    x: float | None = None


class Plain(BaseModel):
    y: int = 0


class MaybeA(BaseModel):
    a: float | None = None


class MustB(BaseModel):
    b: float


class Switching(BaseModel):
    id: str
    u: MaybeA | MustB = MaybeA()
    flags: dict[bool | str, float | None] = {}


class ModelInUnion(BaseModel):
    id: str
    u: Constants | Plain = Plain()


class InUnion(BaseModel):
    id: str
    s: TextNaNs = TextNaNs(u={"kind": "b"})


class OwnPoints(BaseModel):
    id: str
    own: OwnPoint = {"x": 0.0}
    note: str | None = None


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int


class BigPart(Part):
    more: int


class WithAnyPart(BaseModel):
    id: str
    part: SerializeAsAny[Part]


class Inner(BaseModel):
    f: float


class Outer(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")  # Inner's own setting applies
    id: str
    inner: Inner


class MaybeInner(BaseModel):
    f: float | None = None


class MaybeOuter(BaseModel):
    id: str
    inner: MaybeInner = MaybeInner()
    parts: list[MaybeInner] = []
    by_name: dict[str, float | None] = {}
    pairs: set[tuple[str, float | None]] = set()
    by_any_key: dict[str | int, float | None] = {}


class Node(BaseModel):
    id: str = "n"
    weight: float = 0.0
    children: list[Node] = []


class Readings(BaseModel):
    id: str
    values: set[float | None] = set()
    pairs: set[tuple[str, float | None]] = set()


@dataclass
class Reading:
    value: float | None = None
    note: float | None = field(default=None, compare=False)  # == passes over it


class WithReading(BaseModel):
    id: str
    reading: Reading = Reading()


class Lenient(BaseModel):
    value: float | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lenient)

    __hash__ = None  # type: ignore[assignment]


class WithLenient(BaseModel):
    id: str
    part: Lenient = Lenient()


class Gauge(BaseModel):
    value: float | None = None


class LenientGauge(Gauge):
    """Held where a Gauge is declared: Python asks its own == first, which passes over all."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Gauge)

    __hash__ = None  # type: ignore[assignment]


class WithGauge(BaseModel):
    id: str
    gauge: Gauge = Gauge()


class MeasureView(Measure):
    """A subclass that adds nothing: its records are the model's."""


class Relabelled(Measure):
    x: str = "n/a"  # type: ignore[assignment]


class HiddenRequired(BaseModel):
    id: str
    secret: str = Field(exclude=True)


class TwoNames(BaseModel):
    id: str
    a: str = ""
    b: str = ""
    a_b: str = ""


def _any(value: object) -> Any:
    """``value``, hidden from the type checker: careless callers pass what the hints forbid."""
    return value


@dataclass
class Env:
    """A store holding data, with a plain and an indexed collection."""

    path: str
    tmp: Path
    store: mpstore.Store
    notes: mpstore.Collection[Note]
    items: mpstore.Collection[Item]
    loose: mpstore.Collection[Loose]


def dump_hash(path: str) -> str:
    """The SHA-256 of the database's logical dump, read through a connection of its own."""
    conn = sqlite3.connect(path)
    try:
        digest = hashlib.sha256()
        for line in conn.iterdump():
            digest.update(line.encode())
            digest.update(b"\n")
        return digest.hexdigest()
    finally:
        conn.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    path = str(tmp_path / "state.db")
    with mpstore.Store(path, timeout=2.0, max_record_bytes=4096) as store:
        notes = store.collection("notes", Note, key="id")
        items = store.collection("items", Item, key="id", indexes=[("group",)])
        store.collection("checked", Short, key="id", revalidate=True)
        notes.upsert_many(Note(id=f"n{i}", text="x" * i) for i in range(20))
        items.upsert_many(Item(id=f"i{i}", group=i % 3) for i in range(10))
        store.collection("measures", Measure, key="id").upsert(Measure(id="m", x=1.5))
        store.collection("outer", Outer, key="id")
        store.collection("nodes", Node, key="id")
        store.collection("maybe", MaybeOuter, key="id")
        store.collection("shared_points", SharedPoints, key="id")
        store.collection("own_points", OwnPoints, key="id")
        store.collection("in_union", InUnion, key="id")
        store.collection("model_in_union", ModelInUnion, key="id")
        store.collection("switching", Switching, key="id")
        store.collection("measures_checked", Measure, key="id", revalidate=True)
        store.collection("maybe_checked", MaybeOuter, key="id", revalidate=True)
        store.collection("anyparts", WithAnyPart, key="id")
        store.collection("readings", Readings, key="id")
        store.collection("with_reading", WithReading, key="id")
        store.collection("with_lenient", WithLenient, key="id")
        store.collection("with_gauge", WithGauge, key="id")
        store.collection("pairs", Pair, key="id", indexes=[("a_b",)]).upsert(Pair(id="p", a="x"))
        loose = store.collection("loose", Loose, key="id", indexes=[("extra",)])
        loose.upsert_many(Loose(id=f"l{i}", extra=i) for i in range(3))
        yield Env(path, tmp_path, store, notes, items, loose)


# -- the cases -------------------------------------------------------------------------------


def _in_thread(fn: Callable[[], object]) -> None:
    """Run ``fn`` in another thread and re-raise here whatever it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if errors:
        raise errors[0]


def _connection_from_another_thread(e: Env) -> None:
    with e.store.write() as conn:
        _in_thread(lambda: conn.execute("DELETE FROM notes"))


def _second_thread_writes_while_first_holds(e: Env) -> None:
    with mpstore.Store(e.path, timeout=0.2) as store, store.write() as conn:
        conn.execute("DELETE FROM notes WHERE key = 'n1'")
        _in_thread(lambda: store.collection("notes", Note, key="id").delete("n2"))


def _nested_writes_through_two_stores(e: Env) -> None:
    with mpstore.Store(e.path) as other, e.store.write() as conn:
        conn.execute("DELETE FROM notes WHERE key = 'n1'")
        other.collection("notes", Note, key="id").delete("n2")


def _connection_after_its_block(e: Env) -> None:
    with e.store.write() as conn:
        pass
    conn.execute("DELETE FROM notes")


def _write_in_a_read_block(e: Env) -> None:
    with e.store.read() as conn:
        conn.execute("DELETE FROM notes")


def _write_through_query(e: Env) -> None:
    e.store.query("DELETE FROM notes")


def _write_block_inside_read_block(e: Env) -> None:
    with e.store.read(), e.store.write() as conn:
        conn.execute("DELETE FROM notes")


def _write_setting_changed(statement: str) -> Callable[[Env], None]:
    def change(e: Env) -> None:
        with e.store.write() as conn:
            conn.execute("DELETE FROM notes")
            conn.execute(statement)

    return change


def _commit_inside_the_block(e: Env) -> None:
    with e.store.write() as conn:
        conn.execute("DELETE FROM notes")
        conn.execute("COMMIT")


def _end_behind_a_comment(e: Env) -> None:
    with e.store.write() as conn:
        conn.execute("DELETE FROM notes")
        conn.execute("/* done */ -- really\n  end transaction")


def _release_mpstores_savepoint(e: Env) -> None:
    with e.store.write(), e.store.write() as conn:
        conn.execute("DELETE FROM notes")
        conn.execute('RELEASE "mpstore_sp1"')


def _statement_after_a_rollback_trigger(e: Env) -> None:
    with e.store.write() as conn:
        conn.execute(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON notes "
            "WHEN NEW.key = 'refused' BEGIN SELECT RAISE(ROLLBACK, 'refused'); END"
        )
        # The caller carries on, as if only that statement had failed.
        with contextlib.suppress(sqlite3.IntegrityError):
            conn.execute("INSERT INTO notes (key, value) VALUES ('refused', '{}')")
        conn.execute("DELETE FROM notes")


def _use_after_close(e: Env) -> None:
    store = mpstore.Store(e.path)
    notes = store.collection("notes", Note, key="id")
    store.close()
    notes.upsert(Note(id="late", text="x"))


def _update_callback_raises(e: Env) -> None:
    def fail(n: Note) -> Note:
        e.notes.upsert(Note(id="written-inside", text="x"))  # nested: rolled back with the rest
        raise ZeroDivisionError("the callback failed")

    e.notes.update("n1", fail)


def _write_after_dropping_the_table(e: Env) -> None:
    with e.store.write() as conn:
        conn.execute("DROP TABLE notes")
        e.notes.upsert(Note(id="n9", text="x"))


def _chain(depth: int) -> Node:
    """A node ``depth`` levels above its leaf: two levels of JSON each (object, list)."""
    node = Node(id="leaf")
    for _ in range(depth):
        node = Node(id="root", children=[node])
    return node


def _bad_records(e: Env) -> Iterator[Note]:
    yield Note(id="good-1", text="x")
    raise RuntimeError("the record source failed")


def _invalid_constructed(e: Env) -> None:
    e.notes.upsert(Note.model_construct(id="bad", text=12345))


def _constraint_broken_after_validation(e: Env) -> None:
    checked = e.store.collection("checked", Short, key="id", revalidate=True)
    record = Short(id="ok", code="abc")
    record.code = "far too long for the field"  # no validate_assignment: pydantic lets it in
    checked.upsert(record)


def _index_named_as_another(e: Env) -> None:
    # ("a", "b") would be named pairs__by_a_b, the name the file's ("a_b",) index has.
    with mpstore.Store(e.path) as other:
        other.collection("pairs", Pair, key="id", indexes=[("a", "b")])


def _open_int_keyed(e: Env) -> None:
    e.store.collection("numbers", IntKeyed, key="n")


def _reopen_with_another_key(e: Env) -> None:
    with mpstore.Store(e.path) as other:
        other.collection("notes", Note, key="text")


@dataclass(frozen=True)
class Case:
    name: str
    action: Callable[[Env], object]
    error: type[BaseException]
    words: str


CASES = [
    # Records of the wrong kind.
    Case(
        "wrong model",
        lambda e: e.notes.upsert(Other(id="x", text="y")),
        mpstore.RecordTypeError,
        "holds Note records",
    ),
    Case(
        "a dict for a record",
        lambda e: e.notes.upsert(_any({"id": "x", "text": "y"})),
        mpstore.RecordTypeError,
        "got dict",
    ),
    Case(
        "None for a record",
        lambda e: e.notes.upsert(_any(None)),
        mpstore.RecordTypeError,
        "got NoneType",
    ),
    Case(
        "invalid field value (model_construct)",
        _invalid_constructed,
        mpstore.RecordTypeError,
        "does not fit its field's type",
    ),
    Case(
        "NaN in a float field, which the JSON writes as null",
        lambda e: e.store.collection("measures", Measure, key="id").upsert(
            Measure(id="m", x=float("nan"))
        ),
        mpstore.RecordTypeError,
        "holds nan in field 'x'",
    ),
    Case(
        "NaN in a float field, in a collection that revalidates its records",
        lambda e: e.store.collection("measures_checked", Measure, key="id", revalidate=True).upsert(
            Measure(id="m", x=float("nan"))
        ),
        mpstore.RecordTypeError,
        "holds nan in field 'x'",
    ),
    Case(
        "infinity in an optional float field, which the JSON writes as null (None)",
        lambda e: e.store.collection("measures", Measure, key="id").upsert(
            Measure(id="m", x=1.0, y=float("inf"))
        ),
        mpstore.RecordTypeError,
        "holds inf in field 'y'",
    ),
    Case(
        "NaN in a list of floats, which the JSON writes as null",
        lambda e: e.store.collection("measures", Measure, key="id").upsert(
            Measure(id="m", x=1.0, series=[1.0, float("nan")])
        ),
        mpstore.RecordTypeError,
        "holds nan in field 'series'",
    ),
    Case(
        "NaN in a nested model's float field, written as null by that model's setting",
        lambda e: e.store.collection("outer", Outer, key="id").upsert(
            Outer(id="o", inner=Inner(f=float("nan")))
        ),
        mpstore.RecordTypeError,
        "cannot read back",
    ),
    Case(
        "NaN in a nested model's optional float field, which would read back as None",
        lambda e: e.store.collection("maybe", MaybeOuter, key="id").upsert(
            MaybeOuter(id="o", inner=MaybeInner(f=float("nan")))
        ),
        mpstore.RecordTypeError,
        "holds nan at inner.f",
    ),
    Case(
        "infinity in a list of nested models' optional floats, with revalidate",
        lambda e: e.store.collection("maybe_checked", MaybeOuter, key="id", revalidate=True).upsert(
            MaybeOuter(id="o", parts=[MaybeInner(f=1.0), MaybeInner(f=-float("inf"))])
        ),
        mpstore.RecordTypeError,
        "holds -inf at parts.1.f",
    ),
    Case(
        "NaN in a set of pairs, where no place matches it in the read-back",
        lambda e: e.store.collection("maybe", MaybeOuter, key="id").upsert(
            MaybeOuter(id="o", pairs={("x", float("nan"))})
        ),
        mpstore.RecordTypeError,
        "holds nan at pairs, which MaybeOuter's JSON writes as null",
    ),
    Case(
        "infinity under an int key, which reads back as text",
        lambda e: e.store.collection("maybe", MaybeOuter, key="id").upsert(
            MaybeOuter(id="o", by_any_key={1: float("inf")})
        ),
        mpstore.RecordTypeError,
        "holds inf at by_any_key.1, which MaybeOuter's JSON writes as null",
    ),
    Case(
        "NaN in a dict of optional floats",
        lambda e: e.store.collection("maybe", MaybeOuter, key="id").upsert(
            MaybeOuter(id="o", by_name={"a": None, "b": float("nan")})
        ),
        mpstore.RecordTypeError,
        "holds nan at by_name.b",
    ),
    Case(
        "NaN in a recursive model's float, below the top record",
        lambda e: e.store.collection("nodes", Node, key="id").upsert(
            Node(id="root", children=[Node(weight=float("nan"))])
        ),
        mpstore.RecordTypeError,
        "cannot read back",
    ),
    Case(
        "a record nested deeper than pydantic reads JSON back",
        lambda e: e.store.collection("nodes", Node, key="id").upsert(_chain(100)),
        mpstore.RecordTooLarge,
        "nests its values deeper than pydantic reads JSON back",
    ),
    Case(
        "a record nested deeper than pydantic writes JSON",
        lambda e: e.store.collection("nodes", Node, key="id").upsert(_chain(300)),
        mpstore.RecordTooLarge,
        "nests its values deeper than pydantic reads JSON back",
    ),
    Case(
        "a field left out (model_construct)",
        lambda e: e.notes.upsert(Note.model_construct(id="bad")),
        mpstore.RecordTypeError,
        "has no value for 'text'",
    ),
    Case(
        "NaN in a set beside a None, which it would read back as",
        lambda e: e.store.collection("readings", Readings, key="id").upsert(
            Readings(id="r", values={float("nan"), None})
        ),
        mpstore.RecordTypeError,
        "holds nan at values",
    ),
    Case(
        "NaN in a set's tuple that reads back as another item of the set",
        lambda e: e.store.collection("readings", Readings, key="id").upsert(
            Readings(id="r", pairs={("a", float("nan")), ("a", None)})
        ),
        mpstore.RecordTypeError,
        "holds nan at pairs",
    ),
    Case(
        "NaN in a dataclass field that == passes over (compare=False)",
        lambda e: e.store.collection("with_reading", WithReading, key="id").upsert(
            WithReading(id="r", reading=Reading(note=float("nan")))
        ),
        mpstore.RecordTypeError,
        "holds nan at reading.note",
    ),
    Case(
        "NaN in a nested model whose own == passes over it",
        lambda e: e.store.collection("with_lenient", WithLenient, key="id").upsert(
            WithLenient(id="r", part=Lenient(value=float("nan")))
        ),
        mpstore.RecordTypeError,
        "holds nan at part.value",
    ),
    Case(
        "NaN in a subclass's instance whose own == passes over it",
        lambda e: e.store.collection("with_gauge", WithGauge, key="id").upsert(
            WithGauge(id="r", gauge=LenientGauge(value=float("nan")))
        ),
        mpstore.RecordTypeError,
        "holds nan at gauge.value",
    ),
    Case(
        "a write into a collection whose table the block dropped",
        _write_after_dropping_the_table,
        mpstore.CollectionNotFound,
        "collection 'notes' has no table",
    ),
    Case(
        "a subclass's record that makes a float field text",
        lambda e: e.store.collection("measures", Measure, key="id").upsert(Relabelled(id="m")),
        mpstore.RecordTypeError,
        "that Measure cannot read back",
    ),
    Case(
        "a field that is never written and has no default",
        lambda e: e.store.collection("hidden_required", HiddenRequired, key="id"),
        mpstore.RecordTypeError,
        "never written (exclude) and has no default",
    ),
    Case(
        "a subclass's record one level down, written whole (SerializeAsAny)",
        lambda e: e.store.collection("anyparts", WithAnyPart, key="id").upsert(
            WithAnyPart(id="w", part=BigPart(n=1, more=2))
        ),
        mpstore.RecordTypeError,
        "cannot read back",
    ),
    Case(
        "a pydantic dataclass field that writes a key it does not read",
        lambda e: e.store.collection("points", WithPoint, key="id"),
        mpstore.RecordTypeError,
        "field 'x' of Point is written as 'x' but read from 'X'",
    ),
    Case(
        "a TypedDict field that writes a key it does not read",
        lambda e: e.store.collection("options", WithOptions, key="id"),
        mpstore.RecordTypeError,
        "written as 'level' but read from 'Level'",
    ),
    Case(
        "a TypedDict whose own serialize_by_alias pydantic does not follow",
        lambda e: e.store.collection("aliased_options", WithAliasedOptions, key="id"),
        mpstore.RecordTypeError,
        "written as 'level' but read from 'Level'",
    ),
    Case(
        "a TypedDict met again under a model with another alias setting",
        lambda e: e.store.collection("shared_options", SharedOptions, key="id"),
        mpstore.RecordTypeError,
        "field 'level' of a TypedDict is written as 'level' but read from 'Level'",
    ),
    Case(
        "NaN in a TypedDict met first under a model that writes it as text",
        lambda e: e.store.collection("shared_points", SharedPoints, key="id").upsert(
            SharedPoints(id="t", p={"x": float("nan")})
        ),
        mpstore.RecordTypeError,
        "holds nan at p.x",
    ),
    Case(
        "NaN in a TypedDict whose own ser_json_inf_nan pydantic does not follow",
        lambda e: e.store.collection("own_points", OwnPoints, key="id").upsert(
            OwnPoints(id="t", own={"x": float("inf")})
        ),
        mpstore.RecordTypeError,
        "holds inf at own.x",
    ),
    Case(
        "NaN in a TypedDict among a union's choices, written by the top model's setting",
        lambda e: e.store.collection("in_union", InUnion, key="id").upsert(
            InUnion(id="u", s=TextNaNs(u={"kind": "a", "x": float("nan")}))
        ),
        mpstore.RecordTypeError,
        "holds nan at s.u.x",
    ),
    Case(
        "NaN in a model among a union's choices, written by the top model's setting",
        lambda e: e.store.collection("model_in_union", ModelInUnion, key="id").upsert(
            ModelInUnion(id="u", u=Constants(x=float("nan")))
        ),
        mpstore.RecordTypeError,
        "holds nan at u.x",
    ),
    Case(
        "NaN in a union's choice that reads back as another choice",
        lambda e: e.store.collection("switching", Switching, key="id").upsert(
            Switching(id="s", u=MustB(b=float("nan")))
        ),
        mpstore.RecordTypeError,
        "holds nan, which Switching's JSON writes as null",
    ),
    Case(
        "NaN under a bool key, which JSON writes as true",
        lambda e: e.store.collection("switching", Switching, key="id").upsert(
            Switching(id="s", flags={True: float("nan")})
        ),
        mpstore.RecordTypeError,
        "holds nan, which Switching's JSON writes as null",
    ),
    Case(
        "NaN in an optional float field of a subclass's record",
        lambda e: e.store.collection("measures", Measure, key="id").upsert(
            MeasureView(id="m", x=1.0, y=float("nan"))
        ),
        mpstore.RecordTypeError,
        "holds nan in field 'y'",
    ),
    Case(
        "two indexes of one declaration that would share a name",
        lambda e: e.store.collection(
            "twonames", TwoNames, key="id", indexes=[("a_b",), ("a", "b")]
        ),
        mpstore.InvalidName,
        "would both be named 'twonames__by_a_b'",
    ),
    Case(
        "find by a field spelled as a descending sort",
        lambda e: e.items.find(where={"-group": 1}),
        mpstore.InvalidName,
        "'-group' is not an indexed field",
    ),
    Case(
        "a subclass's record with a field of its own",
        lambda e: e.items.upsert(ItemWithMore(id="i1")),
        mpstore.RecordTypeError,
        "does not read back as written",
    ),
    Case(
        "a model that writes a field under a key it does not read",
        lambda e: e.store.collection("aliased", Aliased, key="id"),
        mpstore.RecordTypeError,
        "written as 'name' but read from 'fullName'",
    ),
    Case(
        "a model that writes computed fields and forbids extra ones",
        lambda e: e.store.collection("computed", Computed, key="id"),
        mpstore.RecordTypeError,
        "computed fields",
    ),
    Case(
        "a key field written through a serializer",
        lambda e: e.store.collection("shouted", ShoutedKey, key="id"),
        mpstore.InvalidKey,
        "has a serializer",
    ),
    Case(
        "a key field left out of the JSON",
        lambda e: e.store.collection("hidden", HiddenKey, key="id"),
        mpstore.InvalidKey,
        "left out of the JSON",
    ),
    Case(
        "upsert of a key UTF-8 cannot hold",
        lambda e: e.notes.upsert(Note(id=_SURROGATE, text="x")),
        mpstore.InvalidKey,
        "lone surrogates",
    ),
    Case(
        "delete of a key UTF-8 cannot hold",
        lambda e: e.notes.delete(_SURROGATE),
        mpstore.InvalidKey,
        "lone surrogates",
    ),
    Case(
        "find by a value UTF-8 cannot hold",
        lambda e: e.store.collection("pairs", Pair, key="id", indexes=[("a_b",)]).find(
            where={"a_b": _SURROGATE}
        ),
        mpstore.RecordTypeError,
        "lone surrogate",
    ),
    Case(
        "an index whose name another index of the collection has",
        _index_named_as_another,
        mpstore.InvalidName,
        "already has an index named 'pairs__by_a_b'",
    ),
    Case(
        "a collection named as another's index",
        lambda e: e.store.collection("items__by_group", Note, key="id"),
        mpstore.InvalidName,
        "already the name of index",
    ),
    Case(
        "find ordered by something that is not a field name",
        lambda e: e.items.find(order_by=[_any(None)]),
        mpstore.InvalidName,
        "None is not an indexed field",
    ),
    Case(
        "a query plan asked for a field that is not indexed",
        lambda e: e.items.explain(where=["tags"]),
        mpstore.InvalidName,
        "'tags' is not an indexed field",
    ),
    Case(
        "indexed fields that differ only in case",
        lambda e: e.store.collection("cased", Cased, key="id", indexes=[("A",), ("a",)]),
        mpstore.InvalidName,
        "differ only in case",
    ),
    Case(
        "constraint broken after validation, revalidate=True",
        _constraint_broken_after_validation,
        ValidationError,
        "at most 3 characters",
    ),
    Case(
        "missing key field (model_construct)",
        lambda e: e.notes.upsert(Note.model_construct(text="x")),
        mpstore.InvalidKey,
        "no value for its key field 'id'",
    ),
    Case(
        "non-string key in a record",
        lambda e: e.notes.upsert(Note.model_construct(id=5, text="x")),
        mpstore.InvalidKey,
        "must be strings",
    ),
    Case(
        "empty key",
        lambda e: e.notes.upsert(Note(id="", text="x")),
        mpstore.InvalidKey,
        "must not be empty",
    ),
    Case(
        "key with NUL",
        lambda e: e.notes.upsert(Note(id="a\x00b", text="x")),
        mpstore.InvalidKey,
        "NUL",
    ),
    Case("non-string key to get", lambda e: e.notes.get(_any(1)), mpstore.InvalidKey, "got int"),
    Case(
        "None key to delete",
        lambda e: e.notes.delete(_any(None)),
        mpstore.InvalidKey,
        "got NoneType",
    ),
    Case(
        "empty key to update",
        lambda e: e.notes.update("", lambda n: n),
        mpstore.InvalidKey,
        "must not be empty",
    ),
    Case(
        "record over max_record_bytes",
        lambda e: e.notes.upsert(Note(id="big", text="x" * 5000)),
        mpstore.RecordTooLarge,
        "limit is 4096",
    ),
    Case(
        "multi-byte record over max_record_bytes (under it in characters)",
        lambda e: e.notes.upsert(Note(id="big", text="é" * 2100)),
        mpstore.RecordTooLarge,
        "max_record_bytes",
    ),
    Case(
        "index on a list field",
        lambda e: e.store.collection("tagged", Item, key="id", indexes=[("tags",)]),
        mpstore.InvalidName,
        "must hold a scalar",
    ),
    Case(
        "non-scalar value in an indexed Any field",
        lambda e: e.loose.upsert(Loose(id="l", extra={"a": 1})),
        mpstore.RecordTypeError,
        "must hold a scalar",
    ),
    Case(
        "one bad record among good ones",
        lambda e: e.notes.upsert_many(
            [Note(id="g1", text="x"), Note(id="", text="x"), Note(id="g2", text="x")]
        ),
        mpstore.InvalidKey,
        "must not be empty",
    ),
    Case(
        "one wrong-type record among good ones",
        lambda e: e.notes.upsert_many([Note(id="g1", text="x"), _any(Other(id="o", text="x"))]),
        mpstore.RecordTypeError,
        "got Other",
    ),
    Case(
        "record source that fails half-way",
        lambda e: e.notes.upsert_many(_bad_records(e)),
        RuntimeError,
        "record source failed",
    ),
    # update() callbacks.
    Case(
        "update callback raises (after a nested write)",
        _update_callback_raises,
        ZeroDivisionError,
        "callback failed",
    ),
    Case(
        "update callback returns None",
        lambda e: e.notes.update("n1", lambda n: _any(None)),
        mpstore.RecordTypeError,
        "got NoneType",
    ),
    Case(
        "update callback returns a dict",
        lambda e: e.notes.update("n1", lambda n: _any(n.model_dump())),
        mpstore.RecordTypeError,
        "got dict",
    ),
    Case(
        "update callback changes the key",
        lambda e: e.notes.update("n1", lambda n: n.model_copy(update={"id": "n99"})),
        mpstore.InvalidKey,
        "must not change the key",
    ),
    Case(
        "update of a missing key",
        lambda e: e.notes.update("absent", lambda n: n),
        mpstore.KeyNotFound,
        "no record 'absent'",
    ),
    Case(
        "indexed int beyond SQLite's 64 bits, among good records",
        lambda e: e.items.upsert_many([Item(id="i1", group=7), Item(id="big", group=2**63)]),
        mpstore.RecordTypeError,
        "64-bit",
    ),
    Case(
        "find() by an int beyond SQLite's 64 bits",
        lambda e: e.items.find({"group": 2**64}),
        mpstore.RecordTypeError,
        "64-bit",
    ),
    Case(
        "indexed int below SQLite's 64 bits",
        lambda e: e.items.upsert(Item(id="small", group=-(2**63) - 1)),
        mpstore.RecordTypeError,
        "64-bit",
    ),
    # Collections, names and indexes.
    Case(
        "collection name with SQL",
        lambda e: e.store.collection('x"; DROP TABLE notes; --', Note, key="id"),
        mpstore.InvalidName,
        "collection name",
    ),
    Case(
        "collection name with a reserved prefix",
        lambda e: e.store.collection("sqlite_master", Note, key="id"),
        mpstore.InvalidName,
        "reserved",
    ),
    Case(
        "key that is not a field",
        lambda e: e.store.collection("c", Note, key="nope"),
        mpstore.InvalidName,
        "not a field of Note",
    ),
    Case(
        "key field that is not a string", _open_int_keyed, mpstore.InvalidKey, "must be a str field"
    ),
    Case(
        "model that is not a pydantic model",
        lambda e: e.store.collection("c", _any(dict), key="id"),
        mpstore.RecordTypeError,
        "BaseModel subclass",
    ),
    Case(
        "index on a missing field",
        lambda e: e.store.collection("c", Note, key="id", indexes=[("nope",)]),
        mpstore.InvalidName,
        "not a field of the model",
    ),
    Case(
        "index given as a string",
        lambda e: e.store.collection("c", Note, key="id", indexes=_any("text")),
        mpstore.InvalidName,
        "list of field tuples",
    ),
    Case(
        "index field with SQL",
        lambda e: e.store.collection("c", Note, key="id", indexes=[("text); --",)]),
        mpstore.InvalidName,
        "indexed field",
    ),
    Case(
        "reopen a collection with another key (same store)",
        lambda e: e.store.collection("notes", Note, key="text"),
        mpstore.InvalidName,
        "already open",
    ),
    Case(
        "reopen a collection with another key (new store)",
        _reopen_with_another_key,
        mpstore.InvalidName,
        "keyed by 'id', not 'text'",
    ),
    Case(
        "find on an unindexed field",
        lambda e: e.items.find({"tags": "a"}),
        mpstore.InvalidName,
        "not an indexed field",
    ),
    Case(
        "find ordered by an unindexed field",
        lambda e: e.items.find(order_by=["-id"]),
        mpstore.InvalidName,
        "not an indexed field",
    ),
    Case(
        "find with a negative limit",
        lambda e: e.items.find({"group": 1}, limit=-1),
        ValueError,
        "non-negative integer",
    ),
    Case(
        "find with a string limit",
        lambda e: e.items.find(limit=_any("3")),
        ValueError,
        "non-negative integer",
    ),
    # Store settings and paths.
    Case(
        "path that is a directory",
        lambda e: mpstore.Store(e.tmp),
        mpstore.CorruptDatabase,
        "is a directory",
    ),
    Case(
        "path in a directory that does not exist",
        lambda e: mpstore.Store(os.path.join(e.tmp, "missing", "x.db")),
        mpstore.DirectoryNotFound,
        "its directory does not exist",
    ),
    Case("zero timeout", lambda e: mpstore.Store(e.path, timeout=0), ValueError, "timeout"),
    Case("negative timeout", lambda e: mpstore.Store(e.path, timeout=-1), ValueError, "timeout"),
    Case(
        "NaN timeout", lambda e: mpstore.Store(e.path, timeout=float("nan")), ValueError, "timeout"
    ),
    Case("zero pool size", lambda e: mpstore.Store(e.path, pool_size=0), ValueError, "pool_size"),
    Case(
        "negative pool size", lambda e: mpstore.Store(e.path, pool_size=-3), ValueError, "pool_size"
    ),
    Case(
        "fractional pool size",
        lambda e: mpstore.Store(e.path, pool_size=_any(2.5)),
        ValueError,
        "pool_size",
    ),
    Case(
        "zero max_record_bytes",
        lambda e: mpstore.Store(e.path, max_record_bytes=0),
        ValueError,
        "max_record_bytes",
    ),
    Case("zero wal_limit", lambda e: mpstore.Store(e.path, wal_limit=0), ValueError, "wal_limit"),
    Case(
        "wal_limit given as text",
        lambda e: mpstore.Store(e.path, wal_limit=_any("64MB")),
        ValueError,
        "wal_limit",
    ),
    Case(
        "unknown synchronous mode",
        lambda e: mpstore.Store(e.path, synchronous="sometimes"),
        ValueError,
        "synchronous",
    ),
    Case(
        "file_mode beyond permission bits",
        lambda e: mpstore.Store(e.path, file_mode=0o4755),
        ValueError,
        "file_mode",
    ),
    # Transactions misused.
    Case("use after close()", _use_after_close, mpstore.StoreClosed, "is closed"),
    Case(
        "write block's connection from another thread",
        _connection_from_another_thread,
        mpstore.TransactionError,
        "another thread",
    ),
    Case(
        "second thread writes while the first holds the gate",
        _second_thread_writes_while_first_holds,
        mpstore.GateTimeout,
        "for the write gate",
    ),
    Case(
        "nested writes through two stores on one file",
        _nested_writes_through_two_stores,
        mpstore.TransactionError,
        "already holds the write gate",
    ),
    Case(
        "connection used after its block",
        _connection_after_its_block,
        mpstore.TransactionError,
        "has ended",
    ),
    Case(
        "write through a read() block",
        _write_in_a_read_block,
        mpstore.TransactionError,
        "read-only",
    ),
    Case(
        "write through query()",
        _write_through_query,
        mpstore.TransactionError,
        "read-only",
    ),
    Case(
        "write() inside read()",
        _write_block_inside_read_block,
        mpstore.TransactionError,
        "inside a read() block",
    ),
    Case(
        "query_only switched on inside a write block",
        _write_setting_changed("PRAGMA query_only=1"),
        mpstore.TransactionError,
        "must not change the write connection's settings",
    ),
    Case(
        "locking_mode set to exclusive inside a write block, behind a comment",
        _write_setting_changed("PRAGMA/**/locking_mode = 'EXCLUSIVE'"),
        mpstore.TransactionError,
        "must not change the write connection's settings",
    ),
    Case(
        "automatic checkpoints switched on inside a write block",
        _write_setting_changed("PRAGMA main.wal_autocheckpoint = 1"),
        mpstore.TransactionError,
        "wal_autocheckpoint",
    ),
    Case(
        "the WAL's size limit changed inside a write block",
        _write_setting_changed("PRAGMA journal_size_limit = -1"),
        mpstore.TransactionError,
        "journal_size_limit",
    ),
    Case(
        "COMMIT inside a write block",
        _commit_inside_the_block,
        mpstore.TransactionError,
        "would end the block's transaction",
    ),
    Case(
        "END behind a comment inside a write block",
        _end_behind_a_comment,
        mpstore.TransactionError,
        "would end the block's transaction",
    ),
    Case(
        "releasing mpstore's savepoint in a nested write",
        _release_mpstores_savepoint,
        mpstore.TransactionError,
        "would end the block's transaction",
    ),
    Case(
        "a statement after a trigger rolled the transaction back",
        _statement_after_a_rollback_trigger,
        mpstore.TransactionError,
        "was ended by an earlier statement",
    ),
]


def check(e: Env, case: Case) -> list[str]:
    """Run one case; return what went wrong (nothing, for a case handled as promised)."""
    problems = []
    before = dump_hash(e.path)
    try:
        case.action(e)
    except BaseException as exc:
        if not isinstance(exc, case.error):
            problems.append(f"raised {type(exc).__name__}: {exc}, not {case.error.__name__}")
        elif case.words not in str(exc):
            problems.append(f"message {str(exc)!r} does not say {case.words!r}")
    else:
        problems.append(f"raised nothing, not {case.error.__name__}")
    if dump_hash(e.path) != before:
        problems.append("the database changed")
    if e.store._gate.held_by_me or e.store._tx.conn is not None:
        problems.append("this thread still holds the gate or a transaction")
    else:
        try:
            with e.store.write():
                pass  # an empty transaction: takes and gives back the gate, changes nothing
        except mpstore.GateTimeout:
            problems.append("the gate was left taken")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(env: Env, case: Case) -> None:
    assert check(env, case) == []


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)


# -- negative controls: the check notices each way a case can go wrong ----------------------


def _writes_then_raises(e: Env) -> None:
    e.notes.upsert(Note(id="sneaked-in", text="x"))
    raise mpstore.InvalidKey("record keys must not be empty")


def _keeps_the_gate(e: Env, release: threading.Event, threads: list[threading.Thread]) -> None:
    # Another thread takes the gate and keeps it past the check's own write.
    taken = threading.Event()

    def hold() -> None:
        with e.store.write():
            taken.set()
            release.wait()

    threads.append(threading.Thread(target=hold))
    threads[-1].start()
    assert taken.wait(30)
    raise mpstore.InvalidKey("record keys must not be empty")


def _control(
    name: str, release: threading.Event, threads: list[threading.Thread]
) -> tuple[Case, str]:
    """A case that goes wrong in one way, and the problem the check must report for it."""
    if name == "writes":
        return Case(name, _writes_then_raises, mpstore.InvalidKey, "empty"), "database changed"
    if name == "accepts":
        upsert = Case(name, lambda e: e.notes.upsert(Note(id="", text="x")), ValueError, "empty")
        return upsert, "raised nothing"
    if name == "wrong-type":
        get = Case(name, lambda e: e.notes.get(_any(1)), mpstore.InvalidName, "int")
        return get, "not InvalidName"
    if name == "vague-message":
        return Case(name, lambda e: e.notes.get(""), mpstore.InvalidKey, "key 'x'"), "does not say"
    keep = Case(name, lambda e: _keeps_the_gate(e, release, threads), mpstore.InvalidKey, "empty")
    return keep, "gate was left taken"


@pytest.mark.parametrize("name", ["writes", "accepts", "wrong-type", "vague-message", "keeps-gate"])
def test_the_check_notices_a_case_gone_wrong(
    env: Env, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "accepts":
        # A collection that skipped its key check would accept the empty key.
        monkeypatch.setattr("mpstore._collection.check_key", lambda key: key)
    env.store.timeout = 0.2
    release = threading.Event()
    threads: list[threading.Thread] = []
    case, problem = _control(name, release, threads)
    try:
        problems = check(env, case)
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert any(problem in p for p in problems), problems


def test_dump_hash_sees_a_one_field_change(env: Env) -> None:
    before = dump_hash(env.path)
    env.notes.upsert(Note(id="n1", text="y"))  # was "x"
    assert dump_hash(env.path) != before
