// The sidebar's room list as pure functions over plain objects (tests/js/rooms.test.mjs).
// A room entry: {name, label, dm_with, owner, lastSeq, readSeq, unread, mentions, known,
// untrackedSeq, counted, mentioned, stale}; lastSeq is the highest seq heard (messages and change
// events), `known` whether the server listed it. The unread count follows GET /api/me/rooms: the
// server's count covers the seqs up to `untrackedSeq` (which ones is not known here); the seqs
// heard live since are kept in `counted` (and `mentioned`), so that a delete of one lowers the
// badge at once. `stale`: the last frame heard was a delete or an edit that may move the server's
// part, which only a read of the list can tell.

const TRACKED_MAX = 500; // seqs kept per room; older ones join the server's (untracked) part

// Entries from GET /api/me/rooms, then the names only this browser knows (not joined yet).
export function fromServer(list, extra = []) {
  const rooms = (Array.isArray(list) ? list : []).map((r) => ({
    name: r.name,
    label: r.dm_with ? `@${r.dm_with}` : r.name,
    dm_with: r.dm_with || null,
    owner: r.owner || null,
    lastSeq: r.last_seq | 0,
    readSeq: r.read_seq | 0,
    unread: r.unread | 0,
    mentions: r.mentions | 0,
    known: true,
    untrackedSeq: r.last_seq | 0,
    counted: [],
    mentioned: [],
    stale: false,
  }));
  const known = new Set(rooms.map((r) => r.name));
  for (const name of extra) {
    if (!known.has(name)) {
      rooms.push({
        name, label: name, dm_with: null, owner: null, lastSeq: 0, readSeq: 0, unread: 0, mentions: 0, known: false,
        untrackedSeq: 0, counted: [], mentioned: [], stale: false,
      });
      known.add(name);
    }
  }
  return rooms;
}

// A fresh entry of the list, with what this page heard live past the list's snapshot (the
// socket is usually ahead of the GET): the newer read position, and the messages counted since.
export function merge(entry, old) {
  if (!old) return entry;
  let next = old.readSeq > entry.readSeq ? onRead(entry, old.readSeq) : entry;
  if (old.lastSeq > next.lastSeq) {
    const after = (s) => s > next.lastSeq && s > next.readSeq;
    const counted = (old.counted || []).filter(after);
    const mentioned = (old.mentioned || []).filter(after);
    next = {
      ...next,
      lastSeq: old.lastSeq,
      unread: next.unread + counted.length,
      mentions: next.mentions + mentioned.length,
      counted,
      mentioned,
    };
  }
  return next;
}

// The unread and mention counts of the server's part (before untrackedSeq), never below 0.
function untracked(room) {
  return {
    unread: Math.max(0, room.unread - room.counted.length),
    mentions: Math.max(0, room.mentions - room.mentioned.length),
  };
}

// A message arrived in a room: it is unread unless it is the user's own, already read, or
// deleted (a replay). A change (edit, delete, reaction: it has a target_seq) is heard but is not
// unread, as on the server; a delete takes its message out of the counts, an edit may add or take
// back a mention (`mentioned`: whether the message, or the edit's new text, mentions the user).
export function onMessage(room, m, me, mentioned) {
  if (!Number.isInteger(m.seq) || m.seq <= room.lastSeq) return room;
  if (Number.isInteger(m.target_seq)) return onChange({ ...room, lastSeq: m.seq, stale: false }, m, mentioned);
  const theirs = m.author !== me && m.seq > room.readSeq && !m.deleted;
  const next = { ...room, lastSeq: m.seq, stale: false };
  if (!theirs) return next;
  next.unread = room.unread + 1;
  next.counted = [...room.counted, m.seq];
  if (mentioned) {
    next.mentions = room.mentions + 1;
    next.mentioned = [...room.mentioned, m.seq];
  }
  return bound(next);
}

function onChange(room, m, mentioned) {
  const target = m.target_seq;
  if (target <= room.readSeq || (m.kind !== 'delete' && m.kind !== 'edit')) return room;
  if (target <= room.untrackedSeq) {
    // Counted by the server, or not (one's own message, a notice's edit): only a read of the
    // list says, and only if the change can move a count.
    const left = untracked(room);
    const moves = m.kind === 'delete' ? left.unread > 0 || left.mentions > 0 : left.mentions > 0 || mentioned;
    return moves ? { ...room, stale: true } : room;
  }
  if (!room.counted.includes(target)) return room; // one's own, or deleted already
  const wasMentioned = room.mentioned.includes(target);
  if (m.kind === 'delete') {
    return {
      ...room,
      unread: Math.max(0, room.unread - 1),
      mentions: Math.max(0, room.mentions - (wasMentioned ? 1 : 0)),
      counted: room.counted.filter((s) => s !== target),
      mentioned: room.mentioned.filter((s) => s !== target),
    };
  }
  if (Boolean(mentioned) === wasMentioned) return room;
  return mentioned
    ? { ...room, mentions: room.mentions + 1, mentioned: [...room.mentioned, target].sort((a, b) => a - b) }
    : { ...room, mentions: Math.max(0, room.mentions - 1), mentioned: room.mentioned.filter((s) => s !== target) };
}

// Past TRACKED_MAX seqs the oldest join the server's part: a change of one of them then asks
// for a read of the list.
function bound(room) {
  if (room.counted.length <= TRACKED_MAX) return room;
  const counted = room.counted.slice(-TRACKED_MAX);
  const untrackedSeq = room.counted[room.counted.length - TRACKED_MAX - 1];
  return { ...room, counted, untrackedSeq, mentioned: room.mentioned.filter((s) => s > untrackedSeq) };
}

// The read position moved (here or on another device). Never backwards. What stays unread is
// not known exactly from here: everything up to the position is read, and if it reaches the
// last seq seen nothing is unread.
export function onRead(room, seq) {
  if (!Number.isInteger(seq) || seq <= room.readSeq) return room;
  const caughtUp = seq >= room.lastSeq;
  const counted = room.counted.filter((s) => s > seq);
  const mentioned = room.mentioned.filter((s) => s > seq);
  if (caughtUp || seq >= room.untrackedSeq) { // the server's part is all read: the rest is known
    return { ...room, readSeq: seq, unread: counted.length, mentions: mentioned.length, counted, mentioned };
  }
  return {
    ...room,
    readSeq: seq,
    unread: Math.max(counted.length, room.unread - (seq - room.readSeq)),
    mentions: room.mentions - (room.mentioned.length - mentioned.length),
    counted,
    mentioned,
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
