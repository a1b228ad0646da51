"""Shared fixtures and Hypothesis profiles for mpstore's tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import mpstore
from mpstore.hypothesis import SQLiteExampleDatabase
from tests.models import Note

# Every xdist worker keeps its failing examples in one mpstore file, through the gate.
EXAMPLES = SQLiteExampleDatabase(
    Path(__file__).parent.parent / ".hypothesis" / "mpstore-examples.db"
)
settings.register_profile("default", max_examples=25, deadline=None, database=EXAMPLES)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=EXAMPLES,
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=EXAMPLES,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


@pytest.fixture
def store(db_path: str) -> Iterator[mpstore.Store]:
    with mpstore.Store(db_path) as s:
        yield s


@pytest.fixture
def notes(store: mpstore.Store) -> mpstore.Collection[Note]:
    return store.collection("notes", Note, key="id")
