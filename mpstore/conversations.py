"""The reference workload: an AI agent's conversation store, built on one mpstore collection.

``ConversationRepository`` mirrors the repository of a coding agent whose subagents write
conversations before and after every model call. It is a thin layer over
:class:`mpstore.Collection`: listing by workspace is served by a declared index, and
``modify_conversation`` is :meth:`Collection.update`, atomic across processes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, PlainSerializer

from ._store import Store

__all__ = [
    "Conversation",
    "ConversationContext",
    "ConversationRepository",
    "Message",
    "Tool",
    "sample_conversation",
    "utcnow",
]


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _fixed_width(value: datetime) -> str:
    # Fixed width (always microseconds, always +00:00) so text order is time order in the index.
    return value.astimezone(UTC).isoformat(timespec="microseconds")


#: A UTC timestamp; naive datetimes are taken as UTC.
Timestamp = Annotated[
    datetime,
    AfterValidator(_as_utc),
    PlainSerializer(_fixed_width, return_type=str, when_used="json"),
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    role: str
    content: str


class Tool(BaseModel):
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class ConversationContext(BaseModel):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] = Field(default_factory=list)


class Conversation(BaseModel):
    conversation_id: str
    title: str | None = None
    workspace_id: int
    context: ConversationContext | None = None
    created_at: Timestamp = Field(default_factory=utcnow)
    updated_at: Timestamp = Field(default_factory=utcnow)
    metrics: dict[str, Any] | None = None


class ConversationRepository:
    """Conversations of many workspaces in one store, safe for concurrent subagent processes.

    :param store: the store to keep them in.
    :param collection: the collection's name (one store can hold several repositories).
    """

    def __init__(self, store: Store, collection: str = "conversations") -> None:
        self.store = store
        self.conversations = store.collection(
            collection,
            Conversation,
            key="conversation_id",
            indexes=[("workspace_id", "-updated_at")],
        )

    def upsert_conversation(self, conversation: Conversation) -> None:
        """Insert or replace a whole conversation.

        :raises GateTimeout: the gate was not granted within the store's timeout.
        """
        self.conversations.upsert(conversation)

    def get_conversation(self, conversation_id: str) -> Conversation | None:
        return self.conversations.get(conversation_id)

    def get_all_conversations(
        self, workspace_id: int, limit: int | None = None
    ) -> list[Conversation]:
        """A workspace's conversations, most recently updated first (served by an index)."""
        return self.conversations.find(
            where={"workspace_id": workspace_id}, order_by=["-updated_at"], limit=limit
        )

    def get_last_conversation(self, workspace_id: int) -> Conversation | None:
        found = self.get_all_conversations(workspace_id, limit=1)
        return found[0] if found else None

    def delete_conversation(self, workspace_id: int, conversation_id: str) -> bool:
        """Delete a conversation if it belongs to ``workspace_id``; True if one was deleted."""
        with self.store.write():
            current = self.conversations.get(conversation_id)
            if current is None or current.workspace_id != workspace_id:
                return False
            return self.conversations.delete(conversation_id)

    def modify_conversation(
        self,
        conversation_id: str,
        fn: Callable[[Conversation], Conversation],
        *,
        touch: bool = True,
    ) -> Conversation:
        """Atomically apply ``fn`` to a stored conversation (across processes) and save it.

        With ``touch`` the result's ``updated_at`` is set to now.

        :raises KeyNotFound: no such conversation.
        :raises GateTimeout: the gate was not granted within the store's timeout.
        """

        def apply(current: Conversation) -> Conversation:
            new = fn(current)
            if touch and isinstance(new, Conversation):
                new = new.model_copy(update={"updated_at": utcnow()})
            return new

        return self.conversations.update(conversation_id, apply)


def sample_conversation(
    conversation_id: str, workspace_id: int = 1, context_bytes: int = 2048, **fields: Any
) -> Conversation:
    """A conversation whose context serialises to about ``context_bytes`` (benchmarks, tests)."""
    messages = []
    size = 0
    i = 0
    while size < context_bytes:
        text = f"message {i} of {conversation_id}: " + "lorem ipsum dolor sit amet " * 4
        messages.append(Message(role="user" if i % 2 == 0 else "assistant", content=text))
        size += len(text) + 40
        i += 1
    return Conversation(
        conversation_id=conversation_id,
        title=f"conversation {conversation_id}",
        workspace_id=workspace_id,
        context=ConversationContext(messages=messages),
        **fields,
    )
