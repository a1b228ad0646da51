"""Record models shared by the tests and their child processes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Note(BaseModel):
    id: str
    text: str


class Person(BaseModel):
    """A model whose JSON holds its key and its indexed field under other names."""

    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True)
    person_id: str = Field(alias="personId")
    team: str = Field(alias="team.name")
