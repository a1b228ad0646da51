"""``mpstore info | check | export | import``: reports, damage, round trips, bad input, docs."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mpstore
from mpstore import _inspect, _mailbox, _sqlite
from mpstore._cli import build_parser, main
from mpstore.conversations import ConversationRepository, sample_conversation
from mpstore.hypothesis import SQLiteExampleDatabase
from tests import workers
from tests.models import Note, Person

README = Path(__file__).parent.parent / "README.md"
CONVERSATION = "mpstore.conversations:Conversation"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_store(path: str, conversations: int = 6) -> None:
    with mpstore.Store(path) as store:
        repo = ConversationRepository(store)
        for i in range(conversations):
            repo.upsert_conversation(sample_conversation(f"c{i}", workspace_id=i % 3))


def rows(path: str, table: str = "conversations") -> list[Any]:
    with mpstore.Store(path) as store:
        return store.query(f'SELECT * FROM "{table}" ORDER BY key')


def everything(path: str) -> dict[str, list[Any]]:
    """Every table's rows: what must not change when a command fails."""
    with mpstore.Store(path) as store:
        names = [
            r[0]
            for r in store.query("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        ]
        return {n: store.query(f'SELECT * FROM "{n}" ORDER BY 1, 2') for n in names}


@pytest.fixture
def source(tmp_path: Path) -> str:
    path = str(tmp_path / "source.db")
    make_store(path)
    return path


# -- info --------------------------------------------------------------------------------------


def test_python_dash_m_mpstore_runs_the_command(
    source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same command where the console script is not on PATH (a venv not activated).
    done = subprocess.run(
        [sys.executable, "-m", "mpstore", "check", source],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == run(capsys, "check", source)[:2], done.stderr
    failed = subprocess.run(
        [sys.executable, "-m", "mpstore", "check", source + ".missing"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1 and failed.stderr.startswith("mpstore check: no database")


def test_info_reports_collections_tables_sizes_and_modes(
    source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    SQLiteExampleDatabase(source).save(b"k", b"v")
    code, out, _ = run(capsys, "info", source, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["path"] == source
    assert report["schema_version"] == 1
    assert report["journal_mode"] == "wal"
    assert report["sizes"]["db"] == os.path.getsize(source)
    assert set(report["sizes"]) == {"db", "-wal", "-shm"}
    [coll] = report["collections"]
    assert coll == {
        "name": "conversations",
        "rows": 6,
        "key_field": "conversation_id",
        "model": "mpstore.conversations.Conversation",
        "indexes": [["workspace_id", "-updated_at"]],
    }
    assert report["tables"] == {
        "_mpstore_hypothesis_changes": 1,
        "_mpstore_hypothesis_examples": 1,
    }
    assert report["gate"]["held"] is False
    assert report["mailbox"] == {
        "exists": True,
        "waiting": 0,
        "carried": 0,
        "done": 0,
        "holder": 0,
    }
    code, text, _ = run(capsys, "info", source)
    assert code == 0
    assert "conversations: 6 rows, key 'conversation_id'" in text
    assert "journal mode    wal" in text
    assert "write gate      free" in text


def test_info_names_the_process_holding_the_gate_and_leaves_the_lock_file_alone(
    source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = source + ".lock"
    with workers.holding_the_gate(source) as holder:
        before = (os.stat(lock).st_ino, Path(lock).read_bytes())
        code, out, _ = run(capsys, "info", source)
        state = _inspect.gate_state(lock)
        assert (os.stat(lock).st_ino, Path(lock).read_bytes()) == before
    pid = holder.process.pid
    assert code == 0
    assert state.held is True and state.pid == pid
    assert re.search(rf"write gate      held by pid {pid} for \d+\.\d{{3}} s", out)
    # Negative control: the record still names that pid, but nobody holds the gate now.
    after = _inspect.gate_state(lock)
    assert after.pid == pid and after.held is False
    assert "write gate      free" in run(capsys, "info", source)[1]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states in /proc")
def test_info_says_when_the_process_holding_the_gate_is_stopped(
    source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with workers.holding_the_gate(source) as holder:
        pid = holder.process.pid
        running = _inspect.gate_state(source + ".lock")
        with workers.stopped(holder.process):
            code, out, _ = run(capsys, "info", source)
            state = _inspect.gate_state(source + ".lock")
            as_json = json.loads(run(capsys, "info", source, "--json")[1])
    assert running.held is True and running.stopped is None
    assert code == 0 and state.pid == pid
    assert state.stopped == f"stopped (SIGSTOP or Ctrl-Z): `kill -CONT {pid}` lets it go on"
    assert re.search(rf"write gate      held by pid {pid} for \d+\.\d{{3}} s, stopped ", out)
    assert as_json["gate"]["stopped"] == state.stopped


def test_info_counts_the_writes_waiting_in_the_mailbox(
    source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mailbox = source + ".mailbox"
    with mpstore.Store(source) as store, workers.held_by_another_thread(store.write):
        # Held by a thread of this process: a write from another process would wait in
        # the mailbox; this one is left there by hand, as that process would.
        box = store._gate.mailbox()
        assert box is not None
        slot = box.claim()
        assert slot is not None
        box.publish(slot, _mailbox.encode_op(("delete", "notes", "k")))
        before = Path(mailbox).read_bytes()
        code, out, _ = run(capsys, "info", source)
        assert Path(mailbox).read_bytes() == before
        assert box.withdraw(slot)
        box.give_back(slot)
    assert code == 0
    assert "mailbox         1 waiting, 0 being committed by a holder" in out


def test_info_on_a_missing_file_is_an_error_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing.db"
    code, out, err = run(capsys, "info", str(path))
    assert (code, out) == (1, "")
    assert err == f"mpstore info: no database at {path}\n"
    assert list(tmp_path.iterdir()) == []


def test_info_refuses_a_sqlite_file_that_is_not_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    path = tmp_path / "plain.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    code, _, err = run(capsys, "info", str(path))
    assert code == 1 and "not an mpstore store" in err


@contextlib.contextmanager
def read_only_mount(directory: Path, at: Path) -> Iterator[Path]:
    """``directory`` bind-mounted read-only at ``at``: a place where SQLite cannot create the
    index file (-shm) it reads a WAL database through, as on a read-only volume or image."""
    at.mkdir()
    try:
        subprocess.run(
            ["mount", "--bind", str(directory), str(at)], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot bind-mount here (needs root and mount): {exc}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(at)], check=True)
        yield at
    finally:
        # Lazily, so a descriptor some failed assertion left open cannot keep the mount.
        subprocess.run(["umount", "--lazy", str(at)], check=True)


def test_a_store_on_a_read_only_medium_is_read_only_when_asked_as_immutable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    (tmp_path / "data").mkdir()
    make_store(str(tmp_path / "data" / "x.db"), conversations=3)
    with read_only_mount(tmp_path / "data", tmp_path / "ro") as ro:
        path = str(ro / "x.db")
        # SQLite alone cannot read it there: no -shm can be made beside it.
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        with pytest.raises(sqlite3.OperationalError, match="unable to open"):
            conn.execute("SELECT 1 FROM sqlite_master")
        conn.close()
        # Nothing vouches that no writer reaches the file another way (a bind mount does).
        for command in (["info"], ["check"], ["export", "--", "conversations"]):
            code, out, err = run(capsys, *command[:1], path, *command[2:])
            assert (code, out) == (1, "")
            assert "read-only file system" in err and "--immutable" in err
            assert err.count("\n") == 1
        code, out, err = run(capsys, "info", "--immutable", path)
        assert code == 0 and "conversations" in out
        assert re.search(r"journal mode +wal", out)
        assert run(capsys, "check", "--immutable", path)[:2] == (0, "ok\n")
        code, out, _ = run(capsys, "export", "--immutable", path, "conversations")
        assert code == 0 and len(out.splitlines()) == 3
        assert sorted(os.listdir(ro)) == ["x.db", "x.db.lock", "x.db.mailbox"]


def test_an_immutable_read_is_refused_when_the_wal_holds_changes_whatever_the_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    (tmp_path / "data").mkdir()
    (tmp_path / "copy").mkdir()
    (tmp_path / "links").mkdir()
    with mpstore.Store(str(tmp_path / "data" / "x.db")) as store:
        ConversationRepository(store).upsert_conversation(sample_conversation("c0"))
        # Copied while open: the change is still in the WAL only, which needs the -shm to read.
        for name in ("x.db", "x.db-wal"):
            shutil.copy(tmp_path / "data" / name, tmp_path / "copy" / name)
    assert os.path.getsize(tmp_path / "copy" / "x.db-wal") > 0
    with read_only_mount(tmp_path / "copy", tmp_path / "ro") as ro:
        link = tmp_path / "links" / "link.db"  # the -wal is beside the file, not the link
        link.symlink_to(ro / "x.db")
        for path in (ro / "x.db", link):
            code, out, err = run(capsys, "export", "--immutable", str(path), "conversations")
            assert (code, out) == (1, "")
            assert "-wal file may hold changes" in err and err.count("\n") == 1
            code, out, err = run(capsys, "check", str(path))
            assert code == 1 and f"cannot create one in {ro} (a read-only file system)" in err


def test_a_directory_closed_to_this_user_is_read_only_when_asked_as_immutable(
    monkeypatch: pytest.MonkeyPatch, source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    opened = []
    real_open = _inspect._open_uri

    def open_uri(path: str, query: str) -> Any:
        # Root may write anywhere: SQLite's refusal to make the -shm there is simulated.
        opened.append(query)
        if query == "mode=ro":
            raise mpstore.PermissionDenied(f"{path}: unable to open database file", path)
        return real_open(path, query)

    monkeypatch.setattr(_inspect, "_open_uri", open_uri)
    code, out, err = run(capsys, "check", source)
    assert (code, out, opened) == (1, "", ["mode=ro"])
    assert "(a directory it cannot write)" in err and err.count("\n") == 1
    assert run(capsys, "check", "--immutable", source)[:2] == (0, "ok\n")
    assert opened[-1] == "immutable=1"


# -- check -------------------------------------------------------------------------------------


def test_check_passes_a_healthy_store(source: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "check", source) == (0, "ok\n", "")


def _tamper(path: str, sql: str) -> None:
    with mpstore.Store(path) as store, store.write() as conn:
        conn.execute(sql)


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        (
            "UPDATE conversations SET f_workspace_id = 99 WHERE key = 'c1'",
            "1 rows whose indexed column f_workspace_id differs",
        ),
        (
            "UPDATE conversations SET key = 'renamed' WHERE key = 'c2'",
            "1 rows whose key differs from the record's 'conversation_id'",
        ),
        ("UPDATE conversations SET value = '[1]' WHERE key = 'c3'", "1 values are not JSON"),
        (
            "DROP INDEX conversations__by_workspace_id_updated_at",
            "index conversations__by_workspace_id_updated_at is missing",
        ),
        ("DROP TABLE conversations", "registered but its table is missing"),
    ],
)
def test_check_finds_records_that_disagree_with_their_collection(
    source: str, capsys: pytest.CaptureFixture[str], sql: str, problem: str
) -> None:
    _tamper(source, sql)
    code, out, err = run(capsys, "check", source)
    assert code == 1
    assert problem in out
    assert "is damaged" in err


def test_check_lists_every_problem_of_a_collection_with_a_value_that_is_not_json(
    source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # SQLite's JSON functions fail on such a value: the other checks must skip that row,
    # not the rest of the collection.
    for sql in (
        "UPDATE conversations SET value = 'not json' WHERE key = 'c3'",
        "UPDATE conversations SET f_workspace_id = 99 WHERE key = 'c1'",
        "UPDATE conversations SET key = 'renamed' WHERE key = 'c2'",
    ):
        _tamper(source, sql)
    code, out, err = run(capsys, "check", source)
    assert code == 1 and "(3 problems)" in err
    assert "1 values are not JSON objects" in out
    assert "1 rows whose indexed column f_workspace_id differs" in out
    assert "1 rows whose key differs" in out


def test_a_model_module_that_fails_to_import_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_models.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "in.jsonl").write_text('{"id": "a"}\n')
    code, out, err = run(
        capsys, "import", "x.db", "notes", "in.jsonl", "--model", "broken_models:Note"
    )
    assert (code, out) == (1, "")
    assert err == (
        "mpstore import: importing 'broken_models' for --model failed: RuntimeError: boom\n"
    )
    assert not (tmp_path / "x.db").exists()


def test_check_finds_a_damaged_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "damaged.db")
    make_store(path, conversations=60)
    with mpstore.Store(path) as store, store.write() as conn:
        conn.execute("CREATE TABLE filler (x)")
        conn.executemany("INSERT INTO filler VALUES (?)", [("y" * 500,)] * 200)
    with mpstore.Store(path) as store:  # fold the WAL into the file, so the damage sticks
        store.query("PRAGMA wal_checkpoint(TRUNCATE)")
    with mpstore.Store(path) as store:
        (pages,) = store.query("PRAGMA page_count")[0]
    size = os.path.getsize(path)
    assert pages > 10
    with open(path, "r+b") as f:  # overwrite the middle of page 3 onwards with garbage
        f.seek(2 * 4096 + 100)
        f.write(b"\xa5" * min(4096 * 4, size - 2 * 4096 - 100))
    code, out, _ = run(capsys, "check", path)
    assert code == 1 and out.strip() and out.strip() != "ok"


def test_check_refuses_a_file_that_is_not_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"not a database " * 300)
    code, out, _ = run(capsys, "check", str(path))
    assert code == 1 and "not a database" in out
    assert path.read_bytes() == b"not a database " * 300


# -- export and import -------------------------------------------------------------------------


def test_export_writes_every_record_in_key_order(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "export", source, "conversations")
    assert code == 0 and err == "exported 6 records from conversations\n"
    lines = out.splitlines()
    assert [json.loads(line)["conversation_id"] for line in lines] == [f"c{i}" for i in range(6)]
    assert lines == [r[1] for r in rows(source)]  # the stored JSON, unchanged
    target = tmp_path / "out.jsonl"
    assert run(capsys, "export", source, "conversations", "-o", str(target))[0] == 0
    assert target.read_text() == out


def test_a_failed_export_leaves_the_target_untouched(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("previous\n")
    code, _, err = run(capsys, "export", source, "nope", "-o", str(target))
    assert code == 1
    assert err.strip() == (
        f"mpstore export: no collection 'nope' in {source} (collections: conversations)"
    )
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [Path(source).name, Path(source).name + ".lock", "out.jsonl", *_wal(source)]
    )


def _wal(path: str) -> list[str]:
    """The files beside the database that come and go with its use."""
    return [Path(path + s).name for s in ("-wal", "-shm", ".mailbox") if os.path.exists(path + s)]


@pytest.fixture
def exported(source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    target = str(tmp_path / "conversations.jsonl")
    assert run(capsys, "export", source, "conversations", "-o", target)[0] == 0
    return target


def test_import_with_a_model_rebuilds_the_same_rows(
    source: str, exported: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(tmp_path / "target.db")
    code, _, err = run(
        capsys,
        "import",
        target,
        "conversations",
        exported,
        "--model",
        CONVERSATION,
        "--key",
        "conversation_id",
        "--index",
        "workspace_id,-updated_at",
    )
    assert (code, err) == (0, "imported 6 records into conversations\n")
    assert rows(target) == rows(source)
    assert run(capsys, "check", target)[0] == 0
    with mpstore.Store(target) as store:
        repo = ConversationRepository(store)
        assert [c.conversation_id for c in repo.get_all_conversations(1)] == ["c4", "c1"]


def test_import_without_a_model_fills_the_indexed_columns_like_the_application(
    source: str, exported: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(tmp_path / "target.db")
    with mpstore.Store(target) as store:
        ConversationRepository(store)  # registers the collection and its index, empty
    code, _, err = run(capsys, "import", target, "conversations", exported)
    assert (code, err) == (0, "imported 6 records into conversations\n")
    assert rows(target) == rows(source)
    assert run(capsys, "check", target)[0] == 0


def test_rows_without_their_indexed_columns_would_be_noticed(
    source: str, exported: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Negative control for the two tests above: an import that stores the JSON but not the
    # indexed columns differs from the source rows, and check reports it.
    target = str(tmp_path / "target.db")
    with mpstore.Store(target) as store:
        ConversationRepository(store)
        with store.write() as conn:
            for line in Path(exported).read_text().splitlines():
                key = json.loads(line)["conversation_id"]
                conn.execute("INSERT INTO conversations (key, value) VALUES (?, ?)", (key, line))
    assert rows(target) != rows(source)
    code, out, _ = run(capsys, "check", target)
    assert code == 1 and "6 rows whose indexed column f_workspace_id differs" in out


def _people(path: str) -> None:
    with mpstore.Store(path) as store:
        people = store.collection("people", Person, key="person_id", indexes=[("team",)])
        people.upsert_many([Person(person_id=f"p{i}", team=f"t{i % 2}") for i in range(4)])


def _check_and_import_aliased(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """What check says of a collection whose JSON holds its key and indexed field under
    aliases, and the rows a raw import of its export writes."""
    source, target = str(tmp_path / "source.db"), str(tmp_path / "target.db")
    exported = str(tmp_path / "people.jsonl")
    _people(source)
    checked = run(capsys, "check", source)
    assert run(capsys, "export", source, "people", "-o", exported)[0] == 0
    with mpstore.Store(target) as store:
        store.collection("people", Person, key="person_id", indexes=[("team",)])
    imported = run(capsys, "import", target, "people", exported)
    return checked, imported, rows(source, "people"), rows(target, "people")


def test_check_and_import_find_aliased_fields_where_the_records_hold_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checked, imported, source_rows, target_rows = _check_and_import_aliased(tmp_path, capsys)
    assert checked == (0, "ok\n", "")
    assert imported == (0, "", "imported 4 records into people\n")
    assert target_rows == source_rows


def test_control_check_and_import_blind_to_the_aliases_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sqlite, "recorded_json_keys", lambda conn, name: {})
    checked, imported, _, _ = _check_and_import_aliased(tmp_path, capsys)
    assert checked[0] == 1 and "4 rows whose key differs" in checked[1]
    assert imported[0] != 0 and "no key field 'person_id'" in imported[2]


@pytest.mark.parametrize("damage", ["not json", '{"team": 7}', '{"team": "a\\"b"}'])
def test_check_reports_damaged_json_keys_and_other_commands_go_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    path = str(tmp_path / "people.db")
    _people(path)
    with mpstore.Store(path) as store:
        store.collection("notes", Note, key="id").upsert(Note(id="n", text=""))
        with store.write() as conn:
            conn.execute(
                "UPDATE _mpstore_meta SET value = ? WHERE key = 'json_keys:people'", (damage,)
            )
    code, out, _ = run(capsys, "check", path)
    assert code == 1 and "collection 'people':" in out
    assert run(capsys, "info", path)[0] == 0
    assert run(capsys, "export", path, "notes")[0] == 0


@pytest.mark.parametrize(
    "line",
    [
        '{"personId": "p9", "team.n\\u0061me": "t0"}',  # the same key, written with an escape
        '{"personId": "p9", "team.name": "t0", "team.name": "t1"}',  # written twice
    ],
    ids=["escaped", "twice"],
)
def test_import_refuses_a_line_sqlite_would_read_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    # Python's json module and SQLite's json_extract disagree on these: the column would not
    # hold what the record does.
    path, lines = str(tmp_path / "people.db"), tmp_path / "in.jsonl"
    _people(path)
    before = everything(path)
    lines.write_text('{"personId": "p8", "team.name": "t0"}\n' + line + "\n")
    code, _, err = run(capsys, "import", path, "people", str(lines))
    assert code == 1 and "in.jsonl:2: SQLite reads" in err
    assert everything(path) == before


def test_import_replaces_records_with_the_same_key_and_keeps_the_others(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conv = sample_conversation("c0", workspace_id=2).model_copy(update={"title": "new"})
    new = sample_conversation("c9", workspace_id=1)
    lines = tmp_path / "more.jsonl"
    lines.write_text(conv.model_dump_json() + "\n\n" + new.model_dump_json() + "\n")
    assert run(capsys, "import", source, "conversations", str(lines))[0] == 0
    with mpstore.Store(source) as store:
        repo = ConversationRepository(store)
        assert repo.conversations.count() == 7
        got = repo.get_conversation("c0")
        assert got is not None and got.title == "new" and got.workspace_id == 2
        assert repo.get_all_conversations(2)[0].conversation_id == "c0"


def _good_lines(n: int) -> list[str]:
    return [sample_conversation(f"n{i}", workspace_id=1).model_dump_json() for i in range(n)]


BAD_LINES = [
    ("{not json", [], "in.jsonl:4: not valid JSON"),
    ("[1, 2]", [], "in.jsonl:4: a record must be a JSON object"),
    ('{"workspace_id": 1, "updated_at": "x"}', [], "no key field 'conversation_id'"),
    ('{"conversation_id": "", "workspace_id": 1}', [], "record keys must not be empty"),
    ('{"conversation_id": 7, "workspace_id": 1}', [], "record keys must be strings"),
    ('{"conversation_id": "z", "updated_at": "x"}', [], "indexed field 'workspace_id' is missing"),
    (
        '{"conversation_id": "z", "workspace_id": [1], "updated_at": "x"}',
        [],
        "indexed field 'workspace_id' must hold a scalar",
    ),
    (
        '{"conversation_id": "z", "workspace_id": "one"}',
        ["--model", CONVERSATION],
        "in.jsonl:4: not a valid Conversation: workspace_id: Input should be a valid integer",
    ),
    (
        # Refused after the collection's new index was made: in the import's transaction.
        '{"conversation_id": "", "workspace_id": 1}',
        ["--model", CONVERSATION, "--index", "title"],
        "in.jsonl:4: record keys must not be empty",
    ),
    ('{"conversation_id": "z"}', ["--key", "title"], "keyed by 'conversation_id', not 'title'"),
    ('{"conversation_id": "z"}', ["--model", "nowhere.models:X"], "cannot import 'nowhere.models'"),
    ('{"conversation_id": "z"}', ["--model", "mpstore:Store"], "is not a pydantic BaseModel"),
    ('{"conversation_id": "z"}', ["--model", "mpstore.conversations:Nope"], "has no 'Nope'"),
]


@pytest.mark.parametrize(("bad", "extra", "message"), BAD_LINES)
def test_one_bad_line_imports_nothing_and_says_why_on_one_line(
    source: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bad: str,
    extra: list[str],
    message: str,
) -> None:
    lines = [*_good_lines(3), bad, *_good_lines(2)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    before = everything(source)
    code, out, err = run(capsys, "import", source, "conversations", str(path), *extra)
    assert code == 1 and out == ""
    assert err.startswith("mpstore import: ") and err.count("\n") == 1
    assert message in err
    assert everything(source) == before


@pytest.mark.parametrize(
    ("bad", "options", "message"),
    [
        ('{"conversation_id": "", "workspace_id": 1}', [], "in.jsonl:2: record keys must not"),
        ('{"conversation_id": "z", "workspace_id": 1}', ["--index", "nope"], "'nope' is not a"),
    ],
)
def test_a_refused_import_into_a_new_database_leaves_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str, options: list[str], message: str
) -> None:
    lines = tmp_path / "in.jsonl"
    lines.write_text(_good_lines(1)[0] + "\n" + bad + "\n")
    target = str(tmp_path / "new.db")
    model = ["--model", CONVERSATION, "--key", "conversation_id"]
    code, _, err = run(capsys, "import", target, "conversations", str(lines), *model, *options)
    assert code == 1 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_import_refuses_an_unknown_collection_and_bytes_that_are_not_utf8(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = everything(source)
    good = tmp_path / "good.jsonl"
    good.write_text(_good_lines(1)[0] + "\n")
    code, _, err = run(capsys, "import", source, "nope", str(good))
    assert code == 1 and "no collection 'nope'" in err and "pass --model" in err
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(good.read_bytes() + b'{"conversation_id": "\xff\xfe"}\n')
    code, _, err = run(capsys, "import", source, "conversations", str(binary))
    assert code == 1 and "not UTF-8" in err
    code, _, err = run(capsys, "import", source, "conversations", str(tmp_path / "absent"))
    assert code == 1 and "No such file" in err
    assert everything(source) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--model", "models"], "package.module:Class"),
        (["--model", ":Conversation"], "package.module:Class"),
        (["--index", "workspace_id"], "--index needs --model"),
    ],
)
def test_import_usage_errors_exit_2_and_touch_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    lines = tmp_path / "in.jsonl"
    lines.write_text(_good_lines(1)[0] + "\n")
    target = str(tmp_path / "new.db")
    code, _, err = run(capsys, "import", target, "conversations", str(lines), *options)
    assert code == 2 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_import_records_refuses_indexes_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(mpstore.InvalidName, match="needs --model"):
        _inspect.import_records(
            str(tmp_path / "new.db"), "c", io.StringIO(""), label="-", indexes=[("title",)]
        )
    assert list(tmp_path.iterdir()) == []


def test_import_without_a_model_needs_an_existing_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = tmp_path / "in.jsonl"
    lines.write_text(_good_lines(1)[0] + "\n")
    code, _, err = run(capsys, "import", str(tmp_path / "new.db"), "conversations", str(lines))
    assert code == 1 and "no database at" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_big_file_shows_progress_and_a_small_one_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(tmp_path / "big.db")
    make_store(target, conversations=0)
    line = _good_lines(1)[0]
    n = _inspect.PROGRESS_THRESHOLD // len(line) + 50
    big = tmp_path / "big.jsonl"
    big.write_text(
        "".join(line.replace('"n0"', f'"b{i:05}"', 1) + "\n" for i in range(n)),
    )
    code, _, err = run(capsys, "import", target, "conversations", str(big))
    assert code == 0
    progress = err.split("\r")
    assert len(progress) > 10
    assert progress[-1].startswith(f"mpstore import: {n} records read, 100% of")
    assert err.endswith(f"\nimported {n} records into conversations\n")
    code, _, quiet = run(capsys, "import", target, "conversations", str(big), "--no-progress")
    assert (code, quiet) == (0, f"imported {n} records into conversations\n")
    small = tmp_path / "small.jsonl"
    small.write_text(line + "\n")
    assert run(capsys, "import", target, "conversations", str(small))[2].count("\r") == 0
    assert (
        run(capsys, "import", target, "conversations", str(small), "--progress")[2].count("\r") == 1
    )


# -- the command line as a whole ---------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subcommands(build_parser())))
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mpstore {command}")


def test_errors_are_one_line_without_a_traceback_from_the_real_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mpstore._cli", "check", str(tmp_path / "none.db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr == f"mpstore check: no database at {tmp_path / 'none.db'}\n"


def test_help_does_not_import_the_commands_modules() -> None:
    probe = (
        "import sys, mpstore._cli as cli\n"
        "cli.build_parser()\n"
        "heavy = ('mpstore._inspect', 'mpstore._bench', 'mpstore.hypothesis', 'hypothesis')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "import mpstore._inspect\n"  # the control: the probe does see an imported module
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.splitlines() == ["[]", "['mpstore._inspect']"]


def undocumented(readme: str, parser: argparse.ArgumentParser) -> list[str]:
    """Commands and options of ``parser`` that the README's ``## Command line`` section does not
    document: each command needs a ``### `mpstore NAME ...``` heading, and each of its options
    must appear in the text under that heading."""
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"^### `mpstore (\S+)[^`]*`\n", section, flags=re.M)
    documented = dict(zip(parts[1::2], parts[2::2], strict=True))
    missing = []
    for name, sub in _subcommands(parser).items():
        if name not in documented:
            missing.append(name)
            continue
        for action in sub._actions:
            for option in action.option_strings:
                if (
                    option.startswith("--")
                    and option != "--help"
                    and option not in documented[name]
                ):
                    missing.append(f"{name} {option}")
    return missing


def test_every_public_name_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    missing = [
        name
        for name in mpstore.__all__
        if not re.search(rf"`(mpstore\.)?{re.escape(name)}[`\[(.]", readme)
    ]
    assert missing == []


DAMAGE = {
    "registry record not JSON": "UPDATE _mpstore_collections SET indexes = 'xx'",
    "registry record with a string for an index": (
        """UPDATE _mpstore_collections SET indexes = '["ab"]'"""
    ),
    "registry table dropped": "DROP TABLE _mpstore_collections",
    "collection table dropped": "DROP TABLE conversations",
    "another program's table named with a quote": 'CREATE TABLE "we""ird" (x)',
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_info_check_and_export_answer_in_one_line_on_a_damaged_or_unusual_file(
    source: str, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    conn = sqlite3.connect(source)
    conn.executescript(DAMAGE[damage])
    conn.close()
    damaged = damage != "another program's table named with a quote"
    code, out, err = run(capsys, "info", source)
    if damage == "collection table dropped":
        assert code == 0 and "conversations: rows not countable" in out
    elif damaged:
        assert code == 1 and err.startswith("mpstore info: ") and err.count("\n") == 1
    else:
        assert code == 0 and 'we"ird: 0 rows' in out
    code, out, err = run(capsys, "check", source)
    assert code == (1 if damaged else 0), (out, err)
    code, out, err = run(capsys, "export", source, "conversations")
    if damaged:
        assert code == 1 and err.startswith("mpstore export: ") and err.count("\n") == 1
    else:
        assert code == 0 and out.count("\n") == 6


def test_every_command_and_option_is_documented_in_the_readme() -> None:
    assert undocumented(README.read_text(), build_parser()) == []


def test_an_undocumented_command_or_option_would_be_noticed() -> None:
    parser = build_parser()
    commands = _subcommands(parser)
    commands["info"].add_argument("--frobnicate", action="store_true")
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    action.add_parser("vacuum")
    assert undocumented(README.read_text(), parser) == ["info --frobnicate", "vacuum"]


def test_the_unchanged_database_check_sees_a_partial_import(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Negative control for the bad-line tests: importing only the good lines is noticed.
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(_good_lines(3)) + "\n")
    before = everything(source)
    assert run(capsys, "import", source, "conversations", str(path))[0] == 0
    assert everything(source) != before


def test_import_reads_standard_input(
    source: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(_good_lines(2)) + "\n"))
    assert run(capsys, "import", source, "conversations", "-") == (
        0,
        "",
        "imported 2 records into conversations\n",
    )
    assert len(rows(source)) == 8


@pytest.mark.parametrize("suffix", ["", "-wal", ".lock"])
def test_export_will_not_replace_the_store_it_reads(
    source: str, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    before = everything(source)
    code, _, err = run(capsys, "export", source, "conversations", "-o", source + suffix)
    assert code == 1 and "part of the store" in err
    assert everything(source) == before


def test_import_makes_its_rows_before_it_takes_the_gate(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Serialising every record under the gate would hold up every other process's writes.
    from mpstore import _collection

    under_gate: list[bool] = []
    make_row = _collection.Collection._row

    def watched(self: Any, record: Any) -> Any:
        under_gate.append(self.store._gate.held_by_me)
        return make_row(self, record)

    monkeypatch.setattr(_collection.Collection, "_row", watched)
    lines = tmp_path / "in.jsonl"
    lines.write_text("\n".join(_good_lines(5)) + "\n")
    code, _, err = run(
        capsys, "import", source, "conversations", str(lines), "--model", CONVERSATION
    )
    assert code == 0, err
    assert under_gate == [False] * 5


def test_standard_input_and_output_carry_utf8_whatever_the_locale(
    source: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Latin-1 or ASCII locale (or a Windows pipe) must not garble or refuse JSON Lines.
    line = sample_conversation("u").model_copy(update={"title": "café"}).model_dump_json() + "\n"
    stdin = io.TextIOWrapper(io.BytesIO(line.encode()), encoding="latin-1")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert run(capsys, "import", source, "conversations", "-")[0] == 0
    with mpstore.Store(source) as store:
        got = ConversationRepository(store).get_conversation("u")
    assert got is not None and got.title == "café"
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="ascii"))
    assert main(["export", source, "conversations"]) == 0
    assert '"title":"café"' in out.getvalue().decode()


def test_import_finds_a_model_in_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "shop_models.py").write_text(
        "from pydantic import BaseModel\n\nclass Item(BaseModel):\n    sku: str\n    price: int\n"
    )
    (tmp_path / "items.jsonl").write_text('{"sku": "a", "price": 3}\n{"sku": "b", "price": 5}\n')
    command = [sys.executable, "-m", "mpstore._cli", "import", "shop.db", "items", "items.jsonl"]
    model = ["--model", "shop_models:Item", "--key", "sku", "--index=-price"]
    result = subprocess.run(
        command + model, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stderr) == (0, "imported 2 records into items\n")
    assert rows(str(tmp_path / "shop.db"), "items") == [
        ("a", '{"sku":"a","price":3}', 3),
        ("b", '{"sku":"b","price":5}', 5),
    ]
