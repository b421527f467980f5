"""What a client shows of a room, built from the frames it received: messages as they are now,
with the changes (edit, delete, react, unreact) applied as a client applies them. Two clients
that end in the same `view()` show the same room."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

QUOTE_CHARS = 200


@dataclass
class Shown:
    author: str
    kind: str
    body: str
    edited_at: str | None = None
    deleted: bool = False
    reply_to: int | None = None
    quote: dict[str, Any] | None = None
    reactions: dict[str, set[str]] = field(default_factory=dict)  # emoji -> users
    counts: dict[str, tuple[int, bool]] = field(default_factory=dict)  # from a history page: (count, mine)


class RoomState:
    def __init__(self, me: str) -> None:
        self.me = me
        self.messages: dict[int, Shown] = {}
        self.last_seq = 0

    def apply(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "messages":
            for each in frame["messages"]:
                self.apply(each)
            return
        if frame["type"] != "message":
            return
        seq, kind = frame["seq"], frame["kind"]
        self.last_seq = max(self.last_seq, seq)
        if kind in ("text", "notice"):
            self.messages[seq] = Shown(
                author=frame["author"],
                kind=kind,
                body=frame["body"],
                edited_at=frame.get("edited_at"),
                deleted=frame.get("deleted", False),
                reply_to=frame.get("reply_to"),
                quote=frame.get("quote"),
                counts={r["emoji"]: (r["count"], r["mine"]) for r in frame.get("reactions", [])},
            )
            return
        target = frame["target_seq"]
        shown = self.messages.get(target)
        if kind == "edit":
            if shown is not None and not shown.deleted:
                shown.body, shown.edited_at = frame["body"], frame["sent_at"]
            self._requote(target, body=frame["body"], deleted=False)
        elif kind == "delete":
            if shown is not None:
                shown.body, shown.deleted, shown.reactions, shown.counts = "", True, {}, {}
            self._requote(target, body="", deleted=True)
        elif shown is not None and kind == "react":
            shown.reactions.setdefault(frame["body"], set()).add(frame["author"])
        elif shown is not None and kind == "unreact":
            users = shown.reactions.get(frame["body"], set())
            users.discard(frame["author"])
            if not users:
                shown.reactions.pop(frame["body"], None)

    def _requote(self, target: int, *, body: str, deleted: bool) -> None:
        for shown in self.messages.values():
            if shown.reply_to == target and shown.quote is not None and not shown.quote["deleted"]:
                shown.quote = {**shown.quote, "body": body[:QUOTE_CHARS], "deleted": deleted}

    def view(self) -> dict[int, tuple[Any, ...]]:
        """Each message as shown: reactions as counts and whether `me` reacted."""
        out: dict[int, tuple[Any, ...]] = {}
        for seq, m in sorted(self.messages.items()):
            counts = dict(m.counts)
            for emoji, users in m.reactions.items():
                count, mine = counts.get(emoji, (0, False))
                counts[emoji] = (count + len(users), mine or self.me in users)
            quote = None if m.quote is None else (m.quote["author"], m.quote["body"], m.quote["deleted"])
            out[seq] = (m.author, m.kind, m.body, m.edited_at, m.deleted, m.reply_to, quote, sorted(counts.items()))
        return out
