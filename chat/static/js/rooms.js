// The sidebar's room list as pure functions over plain objects (tests/js/rooms.test.mjs).
// A room entry: {name, label, dm_with, lastSeq, readSeq, unread, mentions, known}; lastSeq is the
// highest seq heard (messages and change events), `known` whether the server listed it.

// Entries from GET /api/me/rooms, then the names only this browser knows (not joined yet).
export function fromServer(list, extra = []) {
  const rooms = (Array.isArray(list) ? list : []).map((r) => ({
    name: r.name,
    label: r.dm_with ? `@${r.dm_with}` : r.name,
    dm_with: r.dm_with || null,
    lastSeq: r.last_seq | 0,
    readSeq: r.read_seq | 0,
    unread: r.unread | 0,
    mentions: r.mentions | 0,
    known: true,
  }));
  const known = new Set(rooms.map((r) => r.name));
  for (const name of extra) {
    if (!known.has(name)) {
      rooms.push({ name, label: name, dm_with: null, lastSeq: 0, readSeq: 0, unread: 0, mentions: 0, known: false });
      known.add(name);
    }
  }
  return rooms;
}

// A message arrived in a room: it is unread unless it is the user's own or already read. A
// change (edit, delete, reaction: it has a target_seq) is heard but is not unread, as on the server.
export function onMessage(room, m, me, mentioned) {
  if (!Number.isInteger(m.seq) || m.seq <= room.lastSeq) return room;
  if (Number.isInteger(m.target_seq)) return { ...room, lastSeq: m.seq };
  const theirs = m.author !== me && m.seq > room.readSeq;
  return {
    ...room,
    lastSeq: m.seq,
    unread: room.unread + (theirs ? 1 : 0),
    mentions: room.mentions + (theirs && mentioned ? 1 : 0),
  };
}

// The read position moved (here or on another device). Never backwards. What stays unread is
// not known exactly from here: everything up to the position is read, and if it reaches the
// last seq seen nothing is unread.
export function onRead(room, seq) {
  if (!Number.isInteger(seq) || seq <= room.readSeq) return room;
  const caughtUp = seq >= room.lastSeq;
  return {
    ...room,
    readSeq: seq,
    unread: caughtUp ? 0 : Math.max(0, room.unread - (seq - room.readSeq)),
    mentions: caughtUp ? 0 : room.mentions,
  };
}

// The seq to report as read: the newest seen on screen, if it is past what is read already.
export function toReport(room, visibleSeq) {
  return Number.isInteger(visibleSeq) && visibleSeq > room.readSeq ? visibleSeq : null;
}

// The "new messages" line goes above the first message after the read position, when there is one.
export function firstUnread(seqs, readSeq) {
  return seqs.find((s) => s > readSeq) ?? null;
}

// Heard up to `seq` without counting (a room's replay when the server did not list it: its
// history is not news).
export function heard(room, seq) {
  return Number.isInteger(seq) && seq > room.lastSeq ? { ...room, lastSeq: seq } : room;
}
