"""Record models shared by the tests and their child processes."""

from __future__ import annotations

from pydantic import BaseModel


class Note(BaseModel):
    id: str
    text: str
