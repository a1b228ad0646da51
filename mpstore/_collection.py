"""Typed collections: pydantic records stored as JSON, keyed by one string field."""

from __future__ import annotations

import array
import dataclasses
import itertools
import json
import math
import re
import sqlite3
import types
import typing
import weakref
from collections import abc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Generic,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
)

from pydantic import (
    BaseModel,
    ConfigDict,
    PydanticUserError,
    TypeAdapter,
    ValidationError,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticSerializationError, SchemaSerializer, from_json

from . import _sqlite
from ._errors import (
    CollectionNotFound,
    InvalidKey,
    InvalidName,
    KeyNotFound,
    RecordTooLarge,
    RecordTypeError,
)
from ._typed_json import typed_json

if TYPE_CHECKING:
    from ._connection import Connection
    from ._store import Store

__all__ = ["Collection"]

M = TypeVar("M", bound=BaseModel)

_PAGE = 256
_SCALARS = (str, int, float, bool, type(None))
_INT64 = range(-(2**63), 2**63)
#: How deep pydantic's JSON parser nests arrays and objects before it gives up: a record
#: nested deeper is written, then cannot be read back.
JSON_DEPTH = 200
_NO_SUCH_TABLE = re.compile(r"no such table: (?:main\.)?(\S+)$")


def check_key(key: object) -> str:
    """Return ``key`` if it is a usable record key.

    :raises InvalidKey: not a string, empty, or containing NUL or a lone surrogate.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"record keys must be strings, got {type(key).__name__}: {key!r}")
    if not key:
        raise InvalidKey("record keys must not be empty")
    if "\x00" in key:
        raise InvalidKey(f"record keys must not contain NUL characters: {key!r}")
    if not key.isascii() and not _encodable(key):
        raise InvalidKey(f"record keys must be text UTF-8 can hold (no lone surrogates): {key!r}")
    return key


def _encodable(text: str) -> bool:
    """Whether UTF-8 holds ``text``: not so a lone surrogate (a file name's undecodable byte)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class Collection(Generic[M]):
    """Records of one pydantic model in one table, keyed by the model's ``key`` field.

    Every write goes through the store's gate in one transaction; records are validated and
    serialised *before* the gate is taken, so bad input never touches the database.

    :raises InvalidName: a bad collection, key or index name; the table belongs to something
        else, or the collection is already keyed by another field; a name the collection's
        table or indexes need is taken; indexed fields differ only in case.
    :raises InvalidKey: the key field is not a ``str`` field, or the JSON does not hold it as
        it is (a serializer, ``exclude``).
    :raises RecordTypeError: ``model`` is not a pydantic model, or cannot read back the JSON
        it writes (aliases one way only, computed fields read as extra ones).
    """

    def __init__(
        self,
        store: Store,
        name: str,
        model: type[M],
        key: str,
        indexes: Sequence[Sequence[str]],
        revalidate: bool = False,
    ) -> None:
        self.store = store
        self.revalidate = revalidate
        self.name = _sqlite.check_identifier(name, "collection name")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise RecordTypeError(f"model must be a pydantic BaseModel subclass, got {model!r}")
        self.model = model
        fields = model.model_fields
        if not isinstance(key, str) or key not in fields:
            raise InvalidName(f"key {key!r} is not a field of {model.__name__}")
        annotation = fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, str)):
            raise InvalidKey(
                f"key field {key!r} of {model.__name__} must be a str field (keys are stored as "
                f"text), not {annotation!r}"
            )
        self.key = key
        _check_key_stored(model, key, fields[key])
        self._json_keys = _json_keys(model)
        # What model_dump_json() asks of the serializer, whose own default was True before
        # pydantic 2.11: keys by alias only where the model says so.
        self._by_alias: bool | None = bool(model.model_config.get("serialize_by_alias", False))
        shape = _JSONShape(model, self._by_alias)
        own = _JSONShape(model, None) if shape.problem is not None else None
        if own is not None and own.problem is None:
            # A nested model reads back only what its own serialize_by_alias writes: each
            # model is written by its own setting then, as model_dump_json() does. Every record
            # is read back, as the walk can only infer that setting where a model has none.
            self._by_alias, shape = None, own
            shape.read_back = True
        if shape.problem is not None:
            # What stops each model's own setting too: the first walk's may be what that fixes.
            problem = own.problem if own is not None else shape.problem
            raise RecordTypeError(
                f"{model.__name__} cannot read back the JSON it writes, so its records would be "
                f"stored unreadable: {problem}"
            )
        # Read back before it is kept: every record, when code decides what is written; else
        # one whose JSON holds a null, if a float deeper in is written as null when not finite.
        self._read_back = shape.read_back
        # Fields a record must hold: the JSON leaves out one it lacks, and reading refuses it
        # or, if it has a default, reads that instead. Where code decides what is written,
        # reading each record back tells.
        self._written = frozenset(
            () if self._read_back else (n for n, info in fields.items() if not info.exclude)
        )
        self._null_floats = shape.null_floats
        # Whether a record may nest deeper than pydantic reads back (then its JSON is parsed
        # to know); None where the schema says it never does. A subclass's record is read back
        # whole in any case.
        self._may_be_deep = _depth_test(depth_bound(model.__pydantic_core_schema__))
        self._calls_back = calls_back(model)  # how its records' types are checked
        self._finite = tuple(shape.finite)
        self._finite_items = tuple(shape.finite_items)
        _sqlite.json_path(self._json_keys.get(key, key))  # tools find records by it
        self.indexes = self._check_indexes(indexes, model)
        # Every index the file already has for this collection is kept up to date by this
        # opener's writes too, declared here or not: a write that skipped one would leave its
        # column stale, and find() on it would return records that no longer match.
        registered = self._registered_indexes()
        try:
            maintained = self._check_indexes(registered, model)
        except InvalidName as exc:
            raise InvalidName(
                f"collection {self.name!r} already has the indexes {registered!r}, which "
                f"{model.__name__} cannot fill: {exc}"
            ) from None
        self.indexed = tuple(
            dict.fromkeys(f.lstrip("-") for idx in (*self.indexes, *maintained) for f in idx)
        )
        folded: dict[str, str] = {}
        for field in self.indexed:
            first = folded.setdefault(field.casefold(), field)
            if first != field:
                raise InvalidName(
                    f"indexed fields {first!r} and {field!r} differ only in case, and SQLite's "
                    "column names do not tell them apart"
                )
        self._include = set(self.indexed)
        # Fields whose value is their JSON form whenever it is a plain scalar: no serializer.
        self._plain = _plainly_serialised(model, self.indexed)
        self._serializers = _field_serializers(model, self.indexed)
        self._carried_keys = tuple(sorted(self._json_keys.items()))
        recorded = {f: k for f, k in self._carried_keys if f == key or f in self._include}
        self._recorded_keys = json.dumps(recorded) if recorded else None
        self._adapters: dict[str, TypeAdapter[Any]] = {}
        self._sql = _sqlite.CollectionSQL(
            self.name, self.indexed, self.indexes, json_keys=self._json_keys
        )
        self._index_columns: dict[str, tuple[str, ...]] = {}
        for index in self.indexes:
            name = self._sql.index_name(index)
            on = tuple(_sqlite.column_for(f.lstrip("-")) for f in index)
            same = self._index_columns.setdefault(name.casefold(), on)
            if same != on:
                raise InvalidName(
                    f"two indexes of collection {self.name!r} would both be named {name!r}: "
                    f"one on {same!r}, one on {on!r}"
                )
        self._gone = False  # the table was found dropped: see _check_table
        self._ensure_table()

    @staticmethod
    def _check_indexes(
        indexes: Sequence[Sequence[str]], model: type[BaseModel]
    ) -> tuple[tuple[str, ...], ...]:
        fields = model.model_fields
        if isinstance(indexes, str):
            raise InvalidName("indexes must be a list of field tuples, e.g. [('a', '-b')]")
        checked = []
        for idx in indexes:
            if isinstance(idx, str) or not idx:
                raise InvalidName(f"each index must be a non-empty tuple of fields, got {idx!r}")
            for field in idx:
                bare = field.lstrip("-") if isinstance(field, str) else field
                _sqlite.check_identifier(bare, "indexed field")
                if bare not in fields:
                    raise InvalidName(f"indexed field {bare!r} is not a field of the model")
                if not _may_be_scalar(fields[bare].annotation):
                    raise InvalidName(
                        f"indexed field {bare!r} must hold a scalar (str, int, float, bool or "
                        f"None), not {fields[bare].annotation!r}"
                    )
                _check_stored(model, bare, fields[bare])
            checked.append(tuple(idx))
        return tuple(checked)

    def _registered_indexes(self) -> list[list[str]]:
        """The indexes the file records for this collection (none for a new collection).

        :raises MpstoreError: the record is damaged.
        """
        rows = self.store.query(
            f"SELECT indexes FROM {_sqlite.COLLECTIONS_TABLE} WHERE name = ?", (self.name,)
        )
        if not rows:
            return []
        return _sqlite.registered_indexes(rows[0][0], self.name)

    def _check_same(
        self, model: type[BaseModel], key: str, indexes: Sequence[Sequence[str]], revalidate: bool
    ) -> None:
        if (
            model is not self.model
            or key != self.key
            or tuple(map(tuple, indexes)) != self.indexes
            or revalidate != self.revalidate
        ):
            raise InvalidName(
                f"collection {self.name!r} is already open with another model, key, indexes "
                "or revalidate setting"
            )

    def _ensure_table(self) -> None:
        store, sql = self.store, self._sql
        if self._table_ready():
            return
        with store.write() as conn:
            reg = conn.execute(
                f"SELECT key_field, indexes FROM {_sqlite.COLLECTIONS_TABLE} WHERE name = ?",
                (self.name,),
            ).fetchone()
            columns = {r[0] for r in conn.execute(sql.columns)}
            if reg is None and columns:
                raise InvalidName(f"table {self.name!r} exists and is not an mpstore collection")
            if reg is not None and reg[0] != self.key:
                raise InvalidName(
                    f"collection {self.name!r} is keyed by {reg[0]!r}, not {self.key!r}"
                )
            self._check_names_free(conn)
            conn.execute(sql.create_table)
            columns = {r[0] for r in conn.execute(sql.columns)}
            for field in self.indexed:
                if _sqlite.column_for(field) not in columns:
                    for statement in sql.add_column(field):
                        conn.execute(statement)
            for _, ddl in sql.indexes:
                conn.execute(ddl)
            _sqlite.schema_changed(conn)
            if self._recorded_keys is not None:
                conn.execute(
                    f"INSERT INTO {_sqlite.META_TABLE} (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (_sqlite.json_keys_entry(self.name), self._recorded_keys),
                )
            known = json.loads(reg[1]) if reg is not None else []
            merged = known + [list(i) for i in self.indexes if list(i) not in known]
            conn.execute(
                f"INSERT INTO {_sqlite.COLLECTIONS_TABLE} (name, model, key_field, indexes) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET model=excluded.model, "
                "indexes=excluded.indexes",
                (self.name, _model_name(self.model), self.key, json.dumps(merged)),
            )

    def _check_names_free(self, conn: Connection) -> None:
        """Check that the names this collection's table and indexes take in the file (one
        namespace, whatever the case) are free, or already the same table and indexes.

        :raises InvalidName: another table, index or view has one of them; or an index of the
            collection has one, on other columns (("a_b",) and ("a", "b") share a name).
        """
        wanted: dict[str, tuple[str, ...] | None] = {self.name.casefold(): None}
        wanted.update(self._index_columns)
        for kind, name, table in conn.execute(
            # Triggers have names of their own, apart from tables, indexes and views.
            "SELECT type, name, tbl_name FROM sqlite_master "
            "WHERE name IS NOT NULL AND type != 'trigger'"
        ).fetchall():
            if name.casefold() not in wanted:
                continue
            if wanted[name.casefold()] is None:
                if kind == "table":
                    continue  # the collection's own, or a table checked by the caller
                raise InvalidName(f"{self.name!r} is already the name of {kind} {name!r}")
            if kind != "index" or table != self.name:
                raise InvalidName(
                    f"an index of collection {self.name!r} would be named {name!r}, which "
                    f"{kind} {name!r} already is"
                )
            found = self._index_found(conn.execute, name)
            if found is not None:
                raise InvalidName(
                    f"collection {self.name!r} already has an index named {name!r}, {found}"
                )

    def _index_found(self, run: Callable[..., Any], name: str) -> str | None:
        """What the file's index ``name`` on this collection's table is, if not the one
        mpstore would make under that name (its columns, neither unique nor partial), else
        None; ``run(sql, params)`` reads the file."""
        columns = tuple(r[0] for r in run("SELECT name FROM pragma_index_info(?)", (name,)))
        wanted = self._index_columns.get(name.casefold())
        if columns != wanted:
            return f"on {columns!r}, not {wanted!r}"
        flags = run(
            'SELECT "unique", partial FROM pragma_index_list(?) WHERE name = ?',
            (self.name, name),
        )
        if list(flags) != [(0, 0)]:
            return "which is unique or partial (made by hand?)"
        return None

    def _table_ready(self) -> bool:
        names = {
            r[0]
            for r in self.store.query(
                "SELECT name FROM sqlite_master WHERE tbl_name = ? AND type IN ('table', 'index')",
                (self.name,),
            )
        }
        registered = self.store.query(
            f"SELECT key_field FROM {_sqlite.COLLECTIONS_TABLE} WHERE name = ?", (self.name,)
        )
        wanted = {self.name, *(name for name, _ in self._sql.indexes)}
        if not (wanted <= names and registered == [(self.key,)]):
            return False
        # A name found does not say the index is this one (("a_b",) and ("a", "b") share it):
        # its columns and its record must be there too.
        columns = {r[0] for r in self.store.query(self._sql.columns)}
        if not {_sqlite.column_for(f) for f in self.indexed} <= columns:
            return False
        if not {tuple(i) for i in self.indexes} <= {tuple(i) for i in self._registered_indexes()}:
            return False
        if any(self._index_found(self.store.query, name) for name, _ in self._sql.indexes):
            return False  # the check under the gate says what is wrong
        if self._recorded_keys is None:
            # Nothing to record; a model without aliases (a reader's, say) leaves those of
            # another in place rather than take the gate on every open to erase them.
            return True
        recorded = self.store.query(
            f"SELECT value FROM {_sqlite.META_TABLE} WHERE key = ?",
            (_sqlite.json_keys_entry(self.name),),
        )
        return recorded == [(self._recorded_keys,)]

    # -- records <-> rows ---------------------------------------------------------------------

    def _row(self, record: object) -> tuple[Any, ...]:
        if not isinstance(record, self.model):
            raise RecordTypeError(
                f"collection {self.name!r} holds {self.model.__name__} records, "
                f"got {type(record).__name__}"
            )
        if self.key not in record.__dict__:
            raise InvalidKey(
                f"{type(record).__name__} record has no value for its key field {self.key!r} "
                "(built with model_construct() without it?)"
            )
        key = check_key(getattr(record, self.key))
        if not record.__dict__.keys() >= self._written and type(record) is self.model:
            self._refuse_missing(record, key)  # a subclass's record is read back below
        try:
            # model_dump_json() without its wrapper's cost. A value whose type does not match
            # its field (model_construct(), assignment without validation) fails here instead
            # of being stored unreadable.
            data = typed_json(
                record.__pydantic_serializer__,
                record,
                self._by_alias,
                self._calls_back if type(record) is self.model else calls_back(type(record)),
            )
        except PydanticSerializationError as exc:
            if "depth exceeded" in str(exc):
                self._refuse_deep(key, exc)
            raise RecordTypeError(
                f"record {key!r} holds a value that does not fit its field's type: {exc}",
                self.store.path,
            ) from exc
        limit = self.store.max_record_bytes
        if len(data) > limit:
            raise RecordTooLarge(
                f"record {key!r} is {len(data)} bytes of JSON; the store's limit is {limit} "
                "(max_record_bytes)",
                self.store.path,
            )
        deep = self._may_be_deep
        if (
            deep is not None
            and data.count(b"[") + data.count(b"{") > JSON_DEPTH  # else it cannot nest that deep
            and deep(record)
            and nesting(data) > JSON_DEPTH
        ):
            try:  # pydantic's own reading says (it does not count an empty innermost one)
                from_json(data)
            except ValueError as exc:
                if "recursion limit" not in str(exc):
                    raise
                self._refuse_deep(key, exc)
        value = data.decode()
        nulls = b"null" in data  # a float that is not finite is written as null
        if nulls:  # a subclass's record too, where its fields still hold floats
            for field in self._finite:
                number = getattr(record, field)
                if isinstance(number, float) and not math.isfinite(number):
                    self._refuse_non_finite(key, field, number)
            for field in self._finite_items:
                numbers = getattr(record, field)
                if isinstance(numbers, (list, tuple, set, frozenset)):
                    bad = [n for n in numbers if isinstance(n, float) and not math.isfinite(n)]
                    if bad:
                        self._refuse_non_finite(key, field, bad[0])
        # After the check above, whose error names the field a revalidation would not.
        back = self.model.model_validate_json(value) if self.revalidate else None
        if type(record) is not self.model or self._read_back or (self._null_floats and nulls):
            self._check_reads_back(record, key, value, back, nulls)
        if not self.indexed:
            return (key, value)
        return (key, value, *self._index_values(record))

    def _refuse_missing(self, record: BaseModel, key: str) -> typing.NoReturn:
        """:raises RecordTypeError: ``record`` lacks fields its JSON must hold to read back."""
        missing = ", ".join(
            repr(f)
            for f in self.model.model_fields
            if f in self._written and f not in record.__dict__
        )
        raise RecordTypeError(
            f"record {key!r} has no value for {missing} "
            "(built with model_construct() without it?): it would not read back",
            self.store.path,
        )

    def _refuse_deep(self, key: str, exc: Exception) -> typing.NoReturn:
        """:raises RecordTooLarge: the record nests too deep to be written or read back."""
        raise RecordTooLarge(
            f"record {key!r} nests its values deeper than pydantic reads JSON back "
            f"({JSON_DEPTH} levels of lists, dicts and models): {exc}",
            self.store.path,
        ) from exc

    def _refuse_non_finite(self, key: str, field: str, number: float) -> None:
        """:raises RecordTypeError: ``number``, in ``field``, would be written as null."""
        raise RecordTypeError(
            f"record {key!r} holds {number} in field {field!r}, which {self.model.__name__}'s "
            "JSON writes as null (ser_json_inf_nan='null'): it would not read back",
            self.store.path,
        )

    def _check_reads_back(
        self, record: BaseModel, key: str, value: str, back: BaseModel | None, nulls: bool
    ) -> None:
        """Refuse a record that the collection's model would not read back as it is written:
        a subclass's record with fields the model drops or refuses, a float written as null.
        ``back``: the model's reading of ``value``, if made already; ``nulls``: whether
        ``value`` holds a null.

        :raises RecordTypeError: it would not read back, or not the same.
        """
        if back is None:
            try:
                back = self.model.model_validate_json(value)
            except ValidationError as exc:
                raise RecordTypeError(
                    f"record {key!r} would be stored as JSON that {self.model.__name__} cannot "
                    "read back (a NaN or infinity written as null, a field left out, a "
                    f"subclass's own fields?): {exc}",
                    self.store.path,
                ) from exc
        if nulls and self._null_floats and not _equal(back, record):
            # A float that may be None reads its null back as None: the record must not hold
            # there a NaN or an infinity, which it would lose. Found where the two match up;
            # else (a union read back as another choice, a key read back as other text) where
            # NaNs went and as many Nones came.
            found = _lost_non_finite(record, back, ())
            if found is None:
                number = _nans_became_nones(record, back)
                found = None if number is None else ((), number)
            if found is not None:
                where, number = found
                raise RecordTypeError(
                    f"record {key!r} holds {number}{_at(where)}, which "
                    f"{self.model.__name__}'s JSON writes as null: it would read back as None",
                    self.store.path,
                )
        if type(record) is not self.model:
            again = back.__pydantic_serializer__.to_json(back, by_alias=self._by_alias)
            if again.decode() != value:
                raise RecordTypeError(
                    f"record {key!r} is a {type(record).__name__}, whose JSON "
                    f"{self.model.__name__} does not read back as written (the subclass adds "
                    "fields, or writes them its own way)",
                    self.store.path,
                )
        elif self._by_alias is None:
            # Each model written by its own alias setting, as the walk of the schema inferred:
            # what reads back must write the same keys (an optional key the model reads under
            # another name would be dropped without a word).
            again = back.__pydantic_serializer__.to_json(back, by_alias=None)
            if again.decode() != value and not _same_keys(json.loads(value), json.loads(again)):
                raise RecordTypeError(
                    f"record {key!r} does not read back as written: {self.model.__name__} reads "
                    "some of its keys under other names than it writes them",
                    self.store.path,
                )

    def _index_values(self, record: BaseModel) -> list[Any]:
        """The indexed fields' values as the record's JSON holds them, which is what SQLite
        finds there when it fills a column itself (see :func:`_sqlite.run_op`)."""
        values = []
        dumped: dict[str, Any] | None = None
        # A subclass may serialise a field its own way: only the model's own records can use
        # the model's field serializers.
        serializers = self._serializers if type(record) is self.model else {}
        for field in self.indexed:
            value = getattr(record, field)
            if type(value) not in _SCALARS or field not in self._plain:
                serializer = serializers.get(field)
                if serializer is not None:
                    value = serializer.to_python(value, mode="json")
                    values.append(self._column_value(field, value))
                    continue
                if dumped is None:
                    dumped = record.model_dump(mode="json", include=self._include, by_alias=False)
                value = dumped[field]
            values.append(self._column_value(field, value))
        return values

    def _column_value(self, field: str, value: Any) -> Any:
        """An indexed field's JSON value as its column holds it.

        :raises RecordTypeError: not a scalar; an int SQLite cannot hold; a float the model's
            JSON writes in a form SQLite cannot read (``ser_json_inf_nan='constants'``).
        """
        if isinstance(value, float) and not math.isfinite(value):
            how = self.model.model_config.get("ser_json_inf_nan", "null")
            if how == "null":
                return None
            if how == "strings":
                return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            raise RecordTypeError(
                f"indexed field {field!r} holds {value}, which {self.model.__name__}'s JSON "
                f"writes as a constant SQLite cannot read (ser_json_inf_nan={how!r})",
                self.store.path,
            )
        if not isinstance(value, _SCALARS):
            raise RecordTypeError(f"indexed field {field!r} must hold a scalar, got {value!r}")
        if isinstance(value, str) and not value.isascii() and not _encodable(value):
            raise RecordTypeError(
                f"indexed field {field!r} holds text UTF-8 cannot hold (a lone surrogate): "
                f"{value!r}",
                self.store.path,
            )
        if isinstance(value, str) and "\x00" in value:
            # SQLite's JSON functions end a string at NUL: a column filled from the JSON
            # would hold less than this one.
            raise RecordTypeError(
                f"indexed field {field!r} holds a NUL character: {value!r}", self.store.path
            )
        if isinstance(value, int) and value not in _INT64:
            # SQLite refuses it as OverflowError, which a write carried by another process
            # would bring back untyped.
            raise RecordTypeError(
                f"indexed field {field!r} holds {value}, outside SQLite's 64-bit integers",
                self.store.path,
            )
        return value

    def _load(self, value: str) -> M:
        return self.model.model_validate_json(value)

    # -- writes --------------------------------------------------------------------------------

    def upsert(self, record: M) -> None:
        """Insert ``record`` or replace the record with its key, in one atomic write.

        :raises RecordTypeError, InvalidKey, RecordTooLarge, ValidationError: bad record; nothing
            is written.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        self.upsert_many((record,))

    def upsert_many(self, records: Iterable[M]) -> int:
        """Insert or replace all ``records`` in one transaction; returns how many.

        All records are checked before the gate is taken: one bad record writes none of them.

        :raises RecordTypeError, InvalidKey, RecordTooLarge, ValidationError: bad record.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        rows = [self._row(r) for r in records]
        if not rows:
            return 0
        return self._run_op(self._upsert_op(rows))

    def _upsert_op(self, rows: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        """The upsert of ``rows`` as data, for whichever process holds the gate."""
        return ("upsert", self.name, self.indexed, rows, self._carried_keys)

    def delete(self, key: str) -> bool:
        """Delete the record with ``key``; True if it existed.

        :raises InvalidKey: bad key.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        return self._run_op(("delete", self.name, check_key(key))) > 0

    def update(self, key: str, fn: Callable[[M], M]) -> M:
        """Atomically read the record with ``key``, pass it to ``fn`` and store what it returns.

        The whole read-modify-write runs under the gate, so concurrent updates from any process
        never lose each other's changes; ``fn`` gets the record as stored then (and runs again,
        on a fresh parse, if a write batched with it ended the transaction). While another
        process holds the gate the record is parsed ahead, and that parse is used only if the
        stored JSON is unchanged at this call's turn. If ``fn`` raises, nothing is written and
        the error propagates; the gate is released either way.

        :raises KeyNotFound: no record has ``key``.
        :raises RecordTypeError: ``fn`` returned something other than a record of the model.
        :raises InvalidKey: ``fn`` changed the record's key.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        check_key(key)
        if self._gone:
            self._reopen()
        ahead: list[Any] = []  # the stored JSON and its record, read while the gate was taken

        def read_modify_write(conn: Connection) -> M:
            found = conn.execute(self._sql.get, (key,)).fetchone()
            if found is None:
                raise KeyNotFound(f"no record {key!r} in collection {self.name!r}", self.store.path)
            if ahead and ahead[0] == found[0]:
                current = ahead[1]
                self.store._stats.count("reads_ahead_used")
            else:
                current = self._load(found[0])
            # Used once at most: a run again (its transaction rolled back) must not be given
            # the record fn may have changed in place.
            ahead.clear()
            new = fn(current)
            row = self._row(new)
            if row[0] != key:
                raise InvalidKey(f"update() must not change the key ({key!r} -> {row[0]!r})")
            _sqlite.run_op(conn, self._upsert_op([row]))
            return new

        try:
            return self.store._run_write(read_modify_write, partial(self._read_ahead, key, ahead))
        except sqlite3.OperationalError as exc:
            self._check_table(exc)
            raise

    def _read_ahead(self, key: str, into: list[Any]) -> None:
        """Read and parse the record with ``key`` while another process holds the gate, into
        ``into`` as (stored JSON, record): :meth:`update` then parses it under the gate only if
        it changed meanwhile, and so holds the gate for less time. The record is one nobody
        else has seen, as a parse under the gate would give."""
        found = self.store._read_now(self._sql.get, (key,))
        if found is None:
            return
        try:
            record = self._load(found)
        except Exception:
            # Not kept: update() parses the record again under the gate, and what was wrong
            # with it, if it still is, is raised there, to its caller.
            return
        into[:] = (found, record)
        self.store._stats.count("reads_ahead")

    def _run_op(self, op: tuple[Any, ...]) -> int:
        if self._gone:
            self._reopen()
        try:
            return self.store._run_op(op)
        except sqlite3.OperationalError as exc:
            self._check_table(exc)
            raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._gone:
            self._reopen()
        try:
            return self.store.query(sql, params)
        except sqlite3.OperationalError as exc:
            self._check_table(exc)
            raise

    def _check_table(self, exc: sqlite3.OperationalError) -> None:
        """If ``exc`` says this collection's table is gone, note it: the next call makes the
        table anew.

        :raises CollectionNotFound: the table is gone.
        """
        found = _NO_SUCH_TABLE.match(str(exc))
        if found is None or found[1].casefold() != self.name.casefold():
            return
        self._gone = True
        raise CollectionNotFound(
            f"collection {self.name!r} has no table in {self.store.path} (dropped after it was "
            "opened): its next call makes the table anew",
            self.store.path,
        ) from exc

    def _reopen(self) -> None:
        """Make the table anew, once a call found it gone; not in a read block, which cannot
        write (a call there finds the table gone again, and says so). A table made inside a
        write block may be rolled back with it: until a call outside one, each call asks.

        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        current = self.store._current()
        if current is not None and not current.writable:
            return
        self._ensure_table()
        if current is None:
            self._gone = False

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: str) -> M | None:
        """The record with ``key``, or None.

        :raises InvalidKey: bad key.
        :raises PoolTimeout: no read connection became free within the store's timeout.
        """
        check_key(key)
        rows = self._query(self._sql.get, (key,))
        return self._load(rows[0][0]) if rows else None

    def count(self) -> int:
        """How many records the collection holds."""
        return int(self._query(self._sql.count)[0][0])

    def __len__(self) -> int:
        return self.count()

    def keys(self) -> Iterator[str]:
        """All keys in order, read page by page (bounded memory; each page is its own snapshot)."""
        for row in self._pages(self._sql.keys_page):
            yield row[0]

    def scan(self) -> Iterator[M]:
        """All records in key order, read page by page (bounded memory)."""
        for row in self._pages(self._sql.page):
            yield self._load(row[1])

    def _pages(self, sql: str) -> Iterator[Any]:
        after = ""
        while True:
            rows = self._query(sql, (after, _PAGE))
            yield from rows
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    def find(
        self,
        where: Mapping[str, Any] | None = None,
        order_by: Sequence[str] = (),
        limit: int | None = None,
    ) -> list[M]:
        """Records whose indexed fields equal ``where``, sorted by ``order_by`` (``-`` = DESC).

        Only indexed fields can be used, so every query is served by an index the collection
        declared (values compare as their JSON form: strings as text, numbers as numbers).

        :raises InvalidName: a field that is not indexed.
        :raises RecordTypeError: a value SQLite cannot compare (an int beyond 64 bits).
        :raises ValueError: a negative limit.
        """
        where = dict(where or {})
        order_by = self._check_query(where, order_by)
        params: list[Any] = [
            self._column_value(f, self._json_value(f, v)) for f, v in where.items()
        ]
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
            params.append(limit)
        sql = self._sql.find(list(where), order_by, limit is not None)
        return [self._load(r[0]) for r in self._query(sql, params)]

    def _check_query(self, where: Iterable[str], order_by: Sequence[str] | str) -> list[str]:
        """``order_by`` as a list, once every field named is known to be indexed.

        :raises InvalidName: a field that is not indexed, or not a field name at all.
        """
        order = [order_by] if isinstance(order_by, str) else list(order_by)
        named = [(f, f) for f in where] + [
            (f, f.lstrip("-") if isinstance(f, str) else f) for f in order
        ]
        for field, bare in named:
            if bare not in self.indexed:
                raise InvalidName(
                    f"{field!r} is not an indexed field of {self.name!r}; declare it in indexes="
                )
        return order

    def _json_value(self, field: str, value: Any) -> Any:
        adapter = self._adapters.get(field)
        if adapter is None:
            # With its metadata: a field's own serializer decides its JSON form (and so the
            # order the index keeps), exactly as in the stored record.
            annotation: Any = self.model.model_fields[field].rebuild_annotation()
            try:
                adapter = TypeAdapter(annotation, config=_serialisation_settings(self.model))
            except PydanticUserError:  # a type with its own config (a dataclass) refuses one
                adapter = TypeAdapter(annotation)
            self._adapters[field] = adapter
        try:
            return adapter.dump_python(value, mode="json")
        except PydanticSerializationError as exc:
            raise RecordTypeError(
                f"{value!r} cannot be written as indexed field {field!r} is: {exc}",
                self.store.path,
            ) from exc

    def explain(self, where: Sequence[str] = (), order_by: Sequence[str] = ()) -> list[str]:
        """SQLite's query plan for :meth:`find` with these fields (to check an index serves it).

        :raises InvalidName: a field that is not indexed.
        """
        where = [where] if isinstance(where, str) else list(where)
        sql = self._sql.find(where, self._check_query(where, order_by), True)
        rows = self._query("EXPLAIN QUERY PLAN " + sql, [None] * len(where) + [1])
        return [r[3] for r in rows]

    def __repr__(self) -> str:
        return f"<mpstore.Collection {self.name!r} of {self.model.__name__} in {self.store.path!r}>"


_CONTAINERS = (BaseModel, list, tuple, dict, set, frozenset)


def _may_be_scalar(annotation: Any) -> bool:
    """False if a field of this type always dumps to a JSON array or object, so it cannot be
    indexed; types that may hold scalars (``Any``, unions with one) are checked per record."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _may_be_scalar(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return any(_may_be_scalar(a) for a in get_args(annotation))
    if origin is Literal:
        return True
    if origin is not None:  # list[int], dict[str, int], Sequence[str], ...
        containers = (*_CONTAINERS, abc.Sequence, abc.Mapping, abc.Set)
        return not (isinstance(origin, type) and issubclass(origin, containers))
    return not (isinstance(annotation, type) and issubclass(annotation, _CONTAINERS))


def _check_stored(model: type[BaseModel], field: str, info: FieldInfo) -> None:
    """Check that the record's JSON holds ``field`` where an index can find it: an index
    column holds the field's value as stored, and SQLite fills it from the JSON too.

    :raises InvalidName: the field is left out of the JSON, or its place or form there
        depends on code mpstore cannot run without a record.
    """
    decorators = model.__pydantic_decorators__
    if decorators.model_serializers:
        raise InvalidName(
            f"{model.__name__} has a model_serializer, so where its JSON holds {field!r} is "
            "up to that code; its fields cannot be indexed"
        )
    if info.exclude is True or getattr(info, "exclude_if", None) is not None:
        raise InvalidName(
            f"indexed field {field!r} is left out of the record's JSON (exclude), so the "
            "stored records do not hold it"
        )
    for decorator in decorators.field_serializers.values():
        if field in decorator.info.fields or "*" in decorator.info.fields:
            raise InvalidName(
                f"indexed field {field!r} has a @field_serializer, which find() cannot apply "
                "to a query value without a record; put the serializer in the field's type "
                "(Annotated[..., PlainSerializer(...)]) instead"
            )
    keys = _json_keys(model)
    key = keys.get(field, field)
    _sqlite.json_path(key)  # raises if SQLite cannot name it
    shared = [f for f in model.model_fields if f != field and keys.get(f, f) == key]
    if shared:
        raise InvalidName(
            f"indexed field {field!r} is written under the JSON key {key!r}, as {shared[0]!r} "
            "is: the record's JSON holds that key twice"
        )


def _check_key_stored(model: type[BaseModel], key: str, info: FieldInfo) -> None:
    """Check that the record's JSON holds its key as it is: the file keys each row by that
    value, and tools find records by it.

    :raises InvalidKey: the JSON leaves the key out, or writes it through a serializer.
    """
    decorators = model.__pydantic_decorators__
    problem = None
    if info.exclude is True or getattr(info, "exclude_if", None) is not None:
        problem = "it is left out of the JSON (exclude)"
    elif key not in _plainly_serialised(model, (key,)) or any(
        key in d.info.fields or "*" in d.info.fields for d in decorators.field_serializers.values()
    ):
        problem = "it has a serializer"
    if problem is not None:
        raise InvalidKey(
            f"key field {key!r} of {model.__name__} must be written into the record's JSON as "
            f"it is, but {problem}"
        )


def _written_fields(kind: type) -> tuple[str, ...]:
    """The fields of a model or dataclass class that its JSON may hold: not ``exclude``-d.
    (A ``functools.cached_property`` keeps its value in the instance's ``__dict__`` too.)"""
    found = _WRITTEN.get(kind)
    if found is None:
        fields: Mapping[str, Any] | None = getattr(kind, "__pydantic_fields__", None)
        if fields is not None:
            found = tuple(name for name, info in fields.items() if info.exclude is not True)
        else:
            found = tuple(f.name for f in dataclasses.fields(kind) if not _excluded(kind, f))
        _WRITTEN[kind] = found
    return found


def _excluded(kind: type, field: dataclasses.Field[Any]) -> bool:
    """Whether pydantic leaves a plain dataclass's ``field`` out of the JSON (its default, or
    its annotation, holds ``Field(exclude=True)``)."""
    if isinstance(field.default, FieldInfo) and field.default.exclude is True:
        return True
    try:
        hint = typing.get_type_hints(kind, include_extras=True).get(field.name)
    except (NameError, TypeError, AttributeError):  # unresolved here: counted, to be safe
        return False
    return any(
        isinstance(meta, FieldInfo) and meta.exclude is True
        for meta in getattr(hint, "__metadata__", ())
    )


_WRITTEN: weakref.WeakKeyDictionary[type, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _checked_fields(kind: type) -> tuple[str, ...]:
    """The written fields of a model or dataclass class whose floats the JSON writes as
    pydantic does: not through a serializer of the field's own (which may write a NaN as
    null on purpose)."""
    found = _CHECKED.get(kind)
    if found is None:
        found = _written_fields(kind)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            schemas = _model_fields_schema(kind)
            found = tuple(f for f in found if not _serialised_here(schemas.get(f)))
        _CHECKED[kind] = found
    return found


_CHECKED: weakref.WeakKeyDictionary[type, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _serialised_here(schema: Any) -> bool:
    """Whether a field's schema has a serializer function of its own (not one of the
    models, dataclasses or TypedDicts within it, which are checked on their own)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("type") in ("model", "dataclass", "typed-dict", "definition-ref"):
                continue
            if isinstance(node.get("serialization"), dict):
                return True
            stack.extend(node[k] for k in _SCHEMA_KEYS if k in node)
    return False


def _parts(value: Any) -> Iterator[tuple[object, Any]]:
    """The values held by ``value`` (a record, or anything in one) whose NaNs its JSON
    writes as pydantic does, each with its name or position: checked fields of models and
    dataclasses (see :func:`_checked_fields`; and a model's extra ones), keys and values of
    dicts, items."""
    if isinstance(value, BaseModel) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        held = getattr(value, "__dict__", None)
        for name in _checked_fields(type(value)):
            yield (
                name,
                held[name] if held is not None and name in held else getattr(value, name, None),
            )
        if isinstance(value, BaseModel) and value.__pydantic_extra__:
            yield from value.__pydantic_extra__.items()
    elif isinstance(value, dict):
        for name, item in value.items():
            yield f"<key {name!r}>", name
            yield name, item
    elif isinstance(value, (list, tuple, set, frozenset)):
        yield from enumerate(value)


def _equal(back: BaseModel, record: BaseModel) -> bool:
    """Whether the read-back holds what the record holds: then it lost nothing. Compared as
    the plain values pydantic makes of them, so no class's own ``==`` (a dataclass field's
    ``compare=False``, a model's or a subclass's ``__eq__``) passes over a field, and a NaN
    is never equal; False where ``==`` raises (a numpy array's)."""
    try:
        return bool(back.model_dump() == record.model_dump())
    except Exception:  # the walk that follows decides, without ==
        return False


def _at(where: tuple[object, ...]) -> str:
    return f" at {'.'.join(map(str, where))}" if where else ""


def _non_finite(value: Any) -> int:
    """How many NaNs and infinities ``value`` holds where its JSON may hold them, at any
    depth."""
    return _count(value, lambda item: type(item) is float and not math.isfinite(item))


def _count(value: Any, test: Callable[[Any], bool]) -> int:
    """How many of the leaves held by ``value`` (see :func:`_parts`) pass ``test``."""
    if test(value):
        return 1
    if isinstance(value, (list, tuple, set, frozenset)):
        items: Iterable[Any] = value
    elif isinstance(value, BaseModel):
        held = value.__dict__
        items = [held[name] for name in _checked_fields(type(value)) if name in held]
        if value.__pydantic_extra__:
            items += value.__pydantic_extra__.values()
    elif isinstance(value, dict) or dataclasses.is_dataclass(value):
        items = [item for _, item in _parts(value)]
    else:
        return 0
    count = 0
    for item in items:
        if test(item):
            count += 1
        elif not isinstance(item, (str, int, float)) and item is not None:
            count += _count(item, test)
    return count


def _lost_non_finite(
    mine: Any, back: Any, where: tuple[object, ...]
) -> tuple[tuple[object, ...], float] | None:
    """Where ``mine`` (a record) holds a NaN or an infinity that ``back`` (its reading back)
    holds as None, and that number; None if nowhere. Places are matched by field, key and
    position (what only ``mine`` holds, a subclass's field or an excluded key, is not
    written); a set's items by counting."""
    if isinstance(mine, float):
        return (where, mine) if back is None and not math.isfinite(mine) else None
    if isinstance(mine, (set, frozenset)):
        if not isinstance(back, (set, frozenset)):
            return None
        number = _nans_became_nones(mine, back, collapsing=True)
        return None if number is None else (where, number)
    theirs = dict(_parts(back))
    for name, item in _parts(mine):
        if isinstance(name, str) and name.startswith("<key "):
            continue
        try:
            if name not in theirs:
                name = str(name)  # a key that JSON holds as text, and may read back so
                if name not in theirs:
                    continue
        except TypeError:  # an unhashable key
            continue
        found = _lost_non_finite(item, theirs[name], (*where, name))
        if found is not None:
            return found
    return None


def _nans_became_nones(mine: Any, back: Any, collapsing: bool = False) -> float | None:
    """A NaN or infinity of ``mine`` that ``back`` no longer holds where as many Nones came
    as NaNs went (the places cannot be matched); None if not so. ``collapsing``: ``mine`` is
    a set, whose Nones read back as one (``{nan, None}`` reads back as ``{None}``), so any
    None there will do."""
    gone = _non_finite(mine) - _non_finite(back)
    if gone <= 0:
        return None
    came = _count(back, _is_none)
    if not collapsing:
        came -= _count(mine, _is_none)
    if came >= (1 if collapsing else gone):
        return next(n for n in _floats(mine) if not math.isfinite(n))
    return None


def _is_none(item: Any) -> bool:
    return item is None


def _floats(value: Any) -> Iterator[float]:
    """The floats held by ``value``, at any depth."""
    if isinstance(value, float):
        yield value
    elif not isinstance(value, (str, int)) and value is not None:
        for _, item in _parts(value):
            yield from _floats(item)


def _same_keys(written: Any, again: Any) -> bool:
    """Whether two parsed JSON documents hold the same object keys, everywhere (lists item by
    item): what a model reading some keys under other names than it writes drops, whatever
    order a set's items come back in."""
    if isinstance(written, dict):
        return (
            isinstance(again, dict)
            and written.keys() == again.keys()
            and all(_same_keys(v, again[k]) for k, v in written.items())
        )
    if isinstance(written, list):
        return (
            isinstance(again, list)
            and len(written) == len(again)
            and all(map(_same_keys, written, again))
        )
    return not isinstance(again, (dict, list))


#: The settings a TypedDict's JSON takes from the model around it.
_INHERITED = ("serialize_by_alias", "ser_json_inf_nan")
#: Marks the settings passed down the walk below a union's choices.
_IN_UNION = "mpstore: in a union"


class _JSONShape:
    """What a model's core schema says about reading back the JSON it writes.

    ``problem``: why it never could, or None. ``read_back``: code decides what is written (a
    model_serializer, ``SerializeAsAny``, a computed field's ``exclude_if``), so only reading
    each record back can tell. ``finite``: the model's own float fields, which its JSON writes
    as null when not finite. ``null_floats``: floats deeper in, written so too. ``by_alias``:
    what the serializer is asked for, None for each model by its own ``serialize_by_alias``.
    """

    def __init__(self, model: type[BaseModel], by_alias: bool | None) -> None:
        self.problem: str | None = None
        self.read_back = False
        self.finite: list[str] = []
        self.finite_items: list[str] = []
        self.null_floats = False
        self._by_alias = by_alias
        self._definitions: dict[Any, Any] = {}
        self._seen: set[tuple[Any, ...]] = set()
        self._top_nulls = _nulls(model.model_config)
        self._walk(model.__pydantic_core_schema__, {}, top=True)

    def _walk(self, node: Any, config: Mapping[str, Any], top: bool = False) -> None:
        if isinstance(node, list):
            for item in node:
                self._walk(item, config)
            return
        if not isinstance(node, dict) or self.problem is not None:
            return
        kind = node.get("type")
        if kind in ("model", "dataclass", "typed-dict"):
            outer, config = config, node.get("config") or {}
            plain = kind == "dataclass" and not hasattr(node.get("cls"), "__pydantic_config__")
            if kind == "typed-dict" or plain:
                # pydantic writes a TypedDict's keys, and its floats, by the settings of the
                # model around it, whatever its own say; a plain dataclass's too.
                own = {k: v for k, v in config.items() if k not in _INHERITED}
                config = own | {k: outer[k] for k in _INHERITED if k in outer}
            if outer.get(_IN_UNION):
                config = {**config, _IN_UNION: True}
                if _nulls(outer):  # see below: the top model's setting may write null here
                    config["ser_json_inf_nan"] = "null"
            if "serialization" in node and kind != "typed-dict":
                self.read_back = True  # a model_serializer: its fields say nothing
                return
        if kind == "definition-ref":
            if "serialization" in node:
                self.read_back = True  # SerializeAsAny: a subclass's own fields are written
            ref = node.get("schema_ref")
            # Walked again below the top: the top model's own floats, met again in a field
            # (a recursive model), are not the top record's, which alone ``finite`` checks.
            # Again under other settings around it: a TypedDict takes some from there.
            seen = (ref, top, *(config.get(k) for k in (*_INHERITED, _IN_UNION)))
            if isinstance(ref, str) and seen not in self._seen:
                self._seen.add(seen)
                self._walk(self._definitions.get(ref), config, top)
            return
        if kind == "definitions":
            self._definitions.update((d.get("ref"), d) for d in node.get("definitions", ()))
        if kind == "float" and config.get("ser_json_inf_nan", "null") == "null":
            self.null_floats = True
        if kind in ("model-fields", "typed-dict", "dataclass-args"):
            fields = node.get("fields", {})
            named = fields.items() if isinstance(fields, dict) else [(f["name"], f) for f in fields]
            owner = node.get("model_name") or node.get("dataclass_name") or "a TypedDict"
            for name, field in named:
                if field.get("serialization_exclude") is True:
                    if field.get("schema", {}).get("type") != "default" and kind != "typed-dict":
                        self.problem = (
                            f"field {name!r} of {owner} is never written (exclude) and has no "
                            "default, so reading refuses every record"
                        )
                    continue  # never written
                if "serialization_exclude_if" in field and _required(field):
                    self.read_back = True  # left out when it says so, then refused as missing
                self._check_field(name, field, config, owner)
                schema = field.get("schema")
                if top and _nulls(config) and _bare_float(schema):
                    self.finite.append(name)
                elif top and _nulls(config) and _plain_float(_items(schema)):
                    self.finite_items.append(name)
                else:
                    self._walk(field.get("schema"), config)
            self._check_computed(node.get("computed_fields") or [], config, owner)
            return
        if kind in ("union", "tagged-union"):
            # Among a union's choices, pydantic writes floats by the top model's setting, not
            # by the model around them: where that writes null, so is each float there taken
            # to be, and such a record is read back when its JSON holds one.
            config = {**config, _IN_UNION: True}
            if self._top_nulls:
                config["ser_json_inf_nan"] = "null"
        if kind is None:  # a mapping of tags to schemas (a tagged union's choices)
            self._walk(list(node.values()), config)
            return
        for key in _SCHEMA_KEYS:  # never a default value or a literal, which are data
            if key in node:
                self._walk(node[key], config, top and key == "schema")

    def _check_field(self, name: str, field: Mapping[str, Any], config: Any, owner: str) -> None:
        alias = field.get("serialization_alias")
        by_alias = self._by_alias
        if by_alias is None:  # each model by its own setting
            by_alias = bool(config.get("serialize_by_alias", False))
        written = alias if by_alias and alias else name
        read = _names_read(name, field.get("validation_alias"), config)
        if written not in read:
            self.problem = (
                f"field {name!r} of {owner} is written as {written!r} but read from "
                f"{' or '.join(map(repr, sorted(read))) or 'no plain key'}"
            )

    def _check_computed(self, computed: list[Any], config: Any, owner: str) -> None:
        if any("serialization_exclude_if" in field for field in computed):
            self.read_back = True
        elif computed and config.get("extra_fields_behavior") in ("forbid", "allow"):
            # Read back, a computed field is an extra one: refused, or kept and written twice.
            extra = config["extra_fields_behavior"]
            self.problem = f"{owner} writes its computed fields, and reads them as extra={extra!r}"


def _required(field: Mapping[str, Any]) -> bool:
    """Whether reading refuses JSON without the field of this core schema."""
    if field.get("type") == "typed-dict-field":
        return bool(field.get("required", True))
    return bool(field.get("schema", {}).get("type") != "default")


def _names_read(name: str, alias: Any, config: Any) -> set[str]:
    """The top-level JSON keys under which a field ``name`` with the core schema's
    ``validation_alias`` is read, under its model's ``config``."""
    if alias is None or not config.get("validate_by_alias", True):
        return {name}
    names = {name} if config.get("validate_by_name") else set()
    paths = [alias] if isinstance(alias, str) or not isinstance(alias[0], list) else alias
    for path in paths:
        if isinstance(path, str):
            names.add(path)
        elif len(path) == 1 and isinstance(path[0], str):
            names.add(path[0])
    return names


#: The keys of a core schema node that hold schemas.
_SCHEMA_KEYS = (
    "schema",
    "schemas",
    "items_schema",
    "keys_schema",
    "values_schema",
    "choices",
    "steps",
    "lax_schema",
    "strict_schema",
    "json_schema",
    "python_schema",
    "return_schema",
    "extras_schema",
    "arguments_schema",
)


#: Core schema types written as what their inner schema writes.
_PASSING = frozenset(
    (
        *("default", "function-before", "function-after", "function-wrap"),
        *("chain", "lax-or-strict", "json-or-python", "custom-error", "model", "dataclass"),
        "json",
    )
)
#: Core schema types written as a JSON scalar, whatever their value.
_SCALAR_SCHEMAS = frozenset(
    (
        *("str", "int", "float", "bool", "none", "bytes", "date", "time", "datetime"),
        *("timedelta", "decimal", "uuid", "url", "multi-host-url", "complex"),
        "missing-sentinel",
    )
)


#: How many lists, dicts, models and ``Literal`` values a depth test looks into, in one
#: record, before it leaves the question to a measure of the record's JSON.
_DEPTH_BUDGET = 64
_PLAIN_CONTAINERS = (list, tuple, set, frozenset)

#: A depth function's share of :data:`_DEPTH_BUDGET`: what is left of it, for one record.
Budget = list[int]

#: A bound on the JSON depth of a value: a number, or a function of the value that gives
#: one (None when it cannot tell, or has spent the budget); None when nothing short of
#: parsing the JSON can tell.
Depth = int | Callable[[Any, Budget], int | None] | None


def depth_bound(schema: Any) -> Depth:
    """A bound on how many levels of lists and objects the JSON written by the core
    ``schema`` nests: a number where the schema fixes it; a function of the value where
    values typed ``Any`` (or a ``Literal``'s, which pydantic writes as they are) decide it;
    None where only the JSON can tell (a recursive model, extra fields, a serializer whose
    output has no schema, a union of such, a type of your own, a schema too deep to walk)."""
    try:
        return _Bounds().bound(schema)
    except RecursionError:
        return None


class _Bounds:
    """The walk of :func:`depth_bound`: definitions met so far, and those being walked."""

    def __init__(self) -> None:
        self.definitions: dict[Any, Any] = {}
        self.active: set[Any] = set()

    def bound(self, node: Any) -> Depth:
        if isinstance(node, list):
            return _fixed([self.bound(n) for n in node])
        if not isinstance(node, dict):
            return None
        kind = node.get("type")
        serializer = node.get("serialization")
        if isinstance(serializer, dict):
            written = serializer.get("type")
            if written in ("function-plain", "function-wrap"):
                # Without a return type, pydantic writes whatever the function returns; with
                # one, only a fixed bound holds (a function of the value would be given the
                # value before the serializer, not what it returns).
                returned = self.bound(serializer.get("return_schema"))
                return returned if isinstance(returned, int) else None
            if written in _SCALAR_SCHEMAS or written in ("to-string", "format"):
                return 0
            if written not in ("include-exclude-sequence", "include-exclude-dict"):
                return None
        if kind in _SCALAR_SCHEMAS:
            return 0
        if kind == "any":
            return _any_depth
        if kind == "literal":
            plain = all(type(v) in _SCALARS for v in node["expected"])
            return _literal_depth if plain else None  # an enum member is written as its value
        if kind == "definitions":
            self.definitions.update((d.get("ref"), d) for d in node.get("definitions", ()))
            return self.bound(node.get("schema"))
        if kind == "definition-ref":
            ref = node.get("schema_ref")
            if ref in self.active or ref not in self.definitions:
                return None
            self.active.add(ref)
            try:
                return self.bound(self.definitions[ref])
            finally:
                self.active.discard(ref)
        config = node.get("config") or {}
        if config.get("extra_fields_behavior") == "allow" or node.get("extra_behavior") == "allow":
            return None  # extra fields, written as they are (pydantic 2.11 ignores their type)
        if kind in ("model-fields", "typed-dict", "dataclass-args"):
            fields = node.get("fields", {})
            named = fields.items() if isinstance(fields, dict) else [(f["name"], f) for f in fields]
            parts = [(name, self.bound(field.get("schema"))) for name, field in named]
            for computed in node.get("computed_fields") or ():
                returned = self.bound(computed.get("return_schema"))
                parts.append((computed["property_name"], returned))
            return _fields(parts, by_key=kind == "typed-dict")
        if kind == "model" and node.get("root_model"):
            root = self.bound(node.get("schema"))
            if root is None or isinstance(root, int):
                return root
            return lambda value, budget: root(getattr(value, "root", None), budget)
        if kind == "nullable":
            inner = self.bound(node.get("schema"))
            if inner is None or isinstance(inner, int):
                return inner
            return lambda value, budget: 0 if value is None else inner(value, budget)
        if kind in _PASSING:
            inner_nodes = [node[k] for k in _SCHEMA_KEYS if k in node]
            if not inner_nodes:
                return None  # Json without a type: pydantic writes what it parsed
            return _fixed([self.bound(n) for n in inner_nodes])
        if kind in ("list", "set", "frozenset", "generator"):
            return _each(self.bound(node.get("items_schema", {"type": "any"})))
        if kind == "tuple":
            items = node.get("items_schema", [])
            return _each(_fixed([self.bound(i) for i in items])) if items else 1
        if kind == "dict":
            keys = self.bound(node.get("keys_schema", {"type": "any"}))
            values = self.bound(node.get("values_schema", {"type": "any"}))
            return _each(values, mapping=True) if isinstance(keys, int) else None
        if kind == "tagged-union":
            return _fixed([self.bound(c) for c in node.get("choices", {}).values()])
        if kind == "union":
            choices = node.get("choices", ())
            return _fixed([self.bound(c[0] if isinstance(c, tuple) else c) for c in choices])
        return None  # a type of your own: pydantic writes what its value holds


def _fixed(bounds: list[Depth]) -> Depth:
    """The deepest of ``bounds``, not knowing which of them writes the value: a number if each
    is one; the one if there is one; else None (whose function to ask is not known)."""
    if len(bounds) == 1:
        return bounds[0]
    if all(isinstance(b, int) for b in bounds):
        return max(typing.cast(list[int], bounds), default=0)
    return None


def _each(each: Depth, mapping: bool = False) -> Depth:
    """The bound of a list, or of a dict (``mapping``), whose items (values) each have the
    bound ``each``: one level deeper than its deepest item."""
    if each is None or isinstance(each, int):
        return None if each is None else each + 1
    probe = each

    def deepest(value: Any, budget: Budget) -> int | None:
        # Only the plain types: pydantic writes a subclass's items from its storage, whatever
        # its own iteration says.
        if mapping and type(value) is dict:
            items: Iterable[Any] = value.values()
        elif not mapping and type(value) in _PLAIN_CONTAINERS:
            items = value
        else:
            return None  # not what the schema says: the JSON tells
        budget[0] -= 1
        return None if budget[0] < 0 else _around(items, probe, budget)

    return deepest


def _fields(parts: list[tuple[str, Depth]], by_key: bool) -> Depth:
    """The bound of an object whose fields each have theirs: one level deeper than its
    deepest field. ``by_key``: the value is a dict (a TypedDict), else an object with
    attributes."""
    if any(b is None for _, b in parts):
        return None
    most = max((b for _, b in parts if isinstance(b, int)), default=0) + 1
    probes = [(name, b) for name, b in parts if callable(b)]
    if not probes:
        return most
    missing = object()

    def deepest(value: Any, budget: Budget) -> int | None:
        budget[0] -= 1
        if budget[0] < 0:
            return None
        top = most
        for name, probe in probes:
            item = value.get(name, missing) if by_key else getattr(value, name, missing)
            if item is not missing:
                found = probe(item, budget)
                if found is None:
                    return None
                top = max(top, found + 1)
        return top

    return deepest


def _literal_depth(value: Any, budget: Budget) -> int | None:
    """A ``Literal`` field's value, which pydantic writes as it is, whatever it holds."""
    budget[0] -= 1
    if budget[0] < 0 or type(value) not in _SCALARS:
        return None
    return 0


def _any_depth(value: Any, budget: Budget) -> int | None:
    """The JSON depth of a value typed ``Any``, as pydantic writes it; None once ``budget``
    is spent, or for a type it writes in a way not known here."""
    if type(value) in _SCALARS:
        return 0
    budget[0] -= 1
    if budget[0] < 0:
        return None
    if isinstance(value, BaseModel):
        # Written by its own schema, whose serializers may nest deeper than its values.
        own = _model_bound(type(value))
        return own if own is None or isinstance(own, int) else own(value, budget)
    if type(value) is dict:
        items: Iterable[Any] = value.values()
    elif type(value) in _PLAIN_CONTAINERS:
        items = value
    else:
        return None  # a date is a scalar, but a type of your own (or a subclass) may not be
    return _around(items, _any_depth, budget)


def _around(
    items: Iterable[Any], probe: Callable[[Any, Budget], int | None], budget: Budget
) -> int | None:
    """The depth of a list or dict holding ``items``, each measured by ``probe``: one past
    the deepest; None if any of them cannot tell."""
    most = 0
    for item in items:
        found = probe(item, budget)
        if found is None:
            return None
        most = max(most, found)
    return most + 1


def _model_bound(model: type[BaseModel]) -> Depth:
    """:func:`depth_bound` of a model's schema, worked out once per model."""
    try:
        return _MODEL_BOUNDS[model]
    except KeyError:
        found = _MODEL_BOUNDS[model] = depth_bound(model.__pydantic_core_schema__)
        return found


_MODEL_BOUNDS: weakref.WeakKeyDictionary[type, Depth] = weakref.WeakKeyDictionary()


_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_STEPS = bytes.maketrans(b"()", b"\x01\xff")  # +1 and -1 as signed bytes
#: Levels :func:`nesting` peels off one pass each before it counts what is left in one.
_PEELS = 8
_NOT_BRACKETS = bytes(set(range(256)) - set(b'[]{}"'))


def nesting(data: bytes) -> int:
    """How many levels of lists and objects the JSON ``data`` nests, at most (one past
    :data:`JSON_DEPTH` where it goes deeper). Found with whole-bytes operations, without
    building the values as a parse does, which costs several times more for many small ones.
    """
    if b'\\"' in data:  # escaped backslashes, then escaped quotes: each quote left ends a string
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = data.translate(_BRACKETS, _NOT_BRACKETS)
    if b'"' in marks:
        # What strings hold is not structure. Two quotes side by side end a string without
        # brackets, or join two with nothing between them: either way, they go first.
        marks = marks.replace(b'""', b"")
        if b'"' in marks:
            marks = b"".join(marks.split(b'"')[::2])
    depth = 0
    while marks and depth < _PEELS:
        inner = marks.replace(b"()", b"")  # every innermost pair: one level off each branch
        if len(inner) == len(marks):
            return JSON_DEPTH + 1  # not JSON as pydantic writes it: let pydantic's reading say
        marks, depth = inner, depth + 1
    if marks:  # deeper still: one pass, counting up and down, costs less than a pass per level
        depth += max(itertools.accumulate(array.array("b", marks.translate(_STEPS))))
    return min(depth, JSON_DEPTH + 1)


def _depth_test(bound: Depth) -> Callable[[Any], bool] | None:
    """Whether a value of the ``bound`` may nest deeper than pydantic reads JSON back; None
    where it never does."""
    if isinstance(bound, int):
        return None if bound <= JSON_DEPTH else lambda value: True
    if bound is None:
        return lambda value: True
    probe = bound

    def deep(value: Any) -> bool:
        try:
            found = probe(value, [_DEPTH_BUDGET])
        except RecursionError:  # values typed Any that nest deep
            return True
        return found is None or found > JSON_DEPTH

    return deep


def _bare_float(schema: Any) -> bool:
    """Whether a field's schema is a float, maybe optional or with a default, that pydantic
    serialises itself (no serializer on the way)."""
    while isinstance(schema, dict) and schema.get("type") in ("default", "nullable"):
        if "serialization" in schema:
            return False
        schema = schema.get("schema")
    return _plain_float(schema)


def _plain_float(schema: Any) -> bool:
    return (
        isinstance(schema, dict) and schema.get("type") == "float" and "serialization" not in schema
    )


def _items(schema: Any) -> Any:
    """The items' schema of a list, tuple or set field's schema (maybe optional), else None."""
    while isinstance(schema, dict) and schema.get("type") in ("default", "nullable"):
        schema = schema.get("schema")
    if (
        isinstance(schema, dict)
        and schema.get("type") in ("list", "set", "frozenset", "tuple")
        and "serialization" not in schema
    ):
        items = schema.get("items_schema")
        if isinstance(items, list):  # tuple[float, ...] is one variadic item
            items = items[0] if len(items) == 1 and schema.get("variadic_item_index") == 0 else None
        return items
    return None


def _nulls(config: Any) -> bool:
    return bool(config.get("ser_json_inf_nan", "null") == "null")


def _serialisation_settings(model: type[BaseModel]) -> ConfigDict | None:
    """The model's settings, for turning a query value into JSON as the records' values were
    (``ser_json_timedelta``, ``json_encoders``, ``arbitrary_types_allowed``, ...)."""
    return model.model_config or None


def _json_keys(model: type[BaseModel]) -> dict[str, str]:
    """The fields the model's JSON holds under another key than their name (aliases), with
    that key."""
    if not model.model_config.get("serialize_by_alias"):
        return {}
    keys = {}
    for name, info in model.model_fields.items():
        alias = info.serialization_alias
        if alias and alias != name:
            keys[name] = alias
    return keys


def _plainly_serialised(model: type[BaseModel], fields: Sequence[str]) -> frozenset[str]:
    """Those of ``fields`` with no serializer anywhere in their schema; for the others, only
    pydantic can say what the JSON holds."""
    known = _model_fields_schema(model)
    return frozenset(f for f in fields if f in known and _no_serializer(known[f]))


def _model_fields_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The core schemas of ``model``'s own fields, by name (empty where not found)."""
    schema: Any = model.__pydantic_core_schema__
    definitions = {d.get("ref"): d for d in schema.get("definitions", ())}
    outer = _unwrapped(schema, definitions)
    inner = _unwrapped(outer.get("schema", {}), definitions) if outer.get("type") == "model" else {}
    known: dict[str, Any] = inner.get("fields", {}) if inner.get("type") == "model-fields" else {}
    return known


def _field_serializers(
    model: type[BaseModel], fields: Sequence[str]
) -> dict[str, SchemaSerializer]:
    """A serializer for each of ``fields`` built from the field's own schema in the model's,
    with the model's settings: what the model's JSON does to that field, at a fraction of the
    cost of asking the model for it. Fields found only through references are left out."""
    schema: Any = model.__pydantic_core_schema__
    definitions = {d.get("ref"): d for d in schema.get("definitions", ())}
    outer = _unwrapped(schema, definitions)
    if outer.get("type") != "model" or "serialization" in outer:
        return {}
    inner = _unwrapped(outer.get("schema", {}), definitions)
    if inner.get("type") != "model-fields":
        return {}
    known = inner.get("fields", {})
    serializers = {}
    for field in fields:
        info = known.get(field)
        if info is not None and not _anywhere(info.get("schema", {}), _refers):
            serializers[field] = SchemaSerializer(info["schema"], outer.get("config"))
    return serializers


def _unwrapped(schema: Any, definitions: Mapping[Any, Any]) -> Any:
    """``schema`` past model validators (function-* wrappers, outside or inside the model) and
    references; one with a serializer of its own is where the walk stops."""
    for _ in range(8):
        kind = schema.get("type", "")
        if kind == "definitions":
            schema = schema.get("schema", {})
        elif kind == "definition-ref":
            schema = definitions.get(schema.get("schema_ref"), {})
        elif kind.startswith("function-") and "serialization" not in schema:
            schema = schema.get("schema", {})
        else:
            break
    return schema


def _no_serializer(schema: Any) -> bool:
    return not _anywhere(schema, lambda node: "serialization" in node or _refers(node))


def _refers(node: dict[str, Any]) -> bool:
    """Whether the schema ``node`` stands for a definition held elsewhere in its model's."""
    return node.get("type") == "definition-ref"


#: Serialization schemas that may call a serializer's handler from Python: a wrap serializer,
#: and SerializeAsAny's, which serializes by the value's own class, whatever serializer it has.
_CALL_BACK = frozenset({"function-wrap", "any"})
_calls_back: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def calls_back(model: type) -> bool:
    """Whether serializing ``model``'s records may call a serializer's handler from Python (a
    ``field_serializer``, ``WrapSerializer`` or ``model_serializer`` in wrap mode, or a
    ``SerializeAsAny`` field): pydantic then issues the warnings of what the handler serialized
    from that Python function, so :func:`typed_json` asks pydantic's error mode for its records.
    True for a class without a core schema.
    """
    known = _calls_back.get(model)
    if known is None:
        schema = getattr(model, "__pydantic_core_schema__", None)
        if not isinstance(schema, dict):
            return True  # not built yet (a MockCoreSchema): asked again next time
        known = _calls_back[model] = _anywhere(schema, _calls_handler)
    return known


def _calls_handler(node: dict[str, Any]) -> bool:
    serialization = node.get("serialization")
    return isinstance(serialization, dict) and serialization.get("type") in _CALL_BACK


def _anywhere(schema: Any, test: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether ``test`` holds for any schema node in ``schema``, itself included. Each dict or
    list is looked at once: a field's default may hold itself."""
    stack = [schema]
    looked: set[int] = set()
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            if id(node) in looked:
                continue
            looked.add(id(node))
        if isinstance(node, dict):
            if test(node):
                return True
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


def _model_name(model: type[BaseModel]) -> str:
    return f"{model.__module__}.{model.__qualname__}"
