import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fromServer, onMessage, onRead, toReport, firstUnread } from '../../chat/static/js/rooms.js';

const server = [
  { name: 'general', last_seq: 10, read_seq: 7, unread: 3, mentions: 1, dm_with: null },
  { name: 'dm.1.2', last_seq: 2, read_seq: 2, unread: 0, mentions: 0, dm_with: 'bob' },
];

test('the list comes from the server, DMs under the other name, local names after', () => {
  const rooms = fromServer(server, ['general', 'new-one']);
  assert.deepEqual(rooms.map((r) => [r.name, r.label, r.unread]), [
    ['general', 'general', 3], ['dm.1.2', '@bob', 0], ['new-one', 'new-one', 0],
  ]);
});

test('messages count as unread unless one\'s own; reads never go back', () => {
  let [room] = fromServer(server);
  room = onMessage(room, { seq: 11, author: 'bob' }, 'ann', true);
  room = onMessage(room, { seq: 12, author: 'ann' }, 'ann', false);
  room = onMessage(room, { seq: 12, author: 'bob' }, 'ann', false); // a duplicate
  assert.deepEqual([room.lastSeq, room.unread, room.mentions], [12, 4, 2]);
  assert.equal(onRead(room, 5), room);
  const partly = onRead(room, 9);
  assert.deepEqual([partly.readSeq, partly.unread, partly.mentions], [9, 2, 2]);
  const all = onRead(room, 12);
  assert.deepEqual([all.unread, all.mentions], [0, 0]);
  assert.equal(toReport(all, 12), null);
  assert.equal(toReport(partly, 12), 12);
  assert.equal(firstUnread([5, 8, 9, 10], 8), 9);
  assert.equal(firstUnread([5, 8], 8), null);
});

test('changes are heard but not unread; a replay of an unlisted room is history', async () => {
  const { heard } = await import('../../chat/static/js/rooms.js');
  let [room] = fromServer(server);
  room = onMessage(room, { seq: 11, author: 'bob', target_seq: 3, kind: 'edit' }, 'ann', true);
  assert.deepEqual([room.lastSeq, room.unread, room.mentions], [11, 3, 1]);
  room = onMessage(room, { seq: 12, author: 'bob' }, 'ann', false);
  assert.deepEqual([room.lastSeq, room.unread], [12, 4]);
  const [local] = fromServer([], ['mine']);
  assert.equal(local.known, false);
  const h = heard(local, 30);
  assert.deepEqual([h.lastSeq, h.unread], [30, 0]);
  assert.equal(heard(h, 20), h);
});

test('a delete in a room lowers its badge as the room list would: only unread messages count', async () => {
  const { merge } = await import('../../chat/static/js/rooms.js');
  let [room] = fromServer(server); // read up to 7, 3 unread (8-10), 1 mention, heard up to 10
  room = onMessage(room, { seq: 11, author: 'bob', body: '@ann hi' }, 'ann', true);
  room = onMessage(room, { seq: 12, author: 'ann', body: 'mine' }, 'ann', false);
  room = onMessage(room, { seq: 13, author: 'bob', body: 'plain' }, 'ann', false);
  assert.deepEqual([room.unread, room.mentions], [5, 2]);
  // Bob's mention deleted (by him, or by the room's owner): one fewer unread, one fewer mention.
  room = onMessage(room, { seq: 14, author: 'carol', kind: 'delete', target_seq: 11, body: '' }, 'ann', false);
  assert.deepEqual([room.lastSeq, room.unread, room.mentions, room.stale], [14, 4, 1, false]);
  // One's own message, a message deleted already, a read one: nothing moves.
  for (const [seq, target] of [[15, 12], [16, 11], [17, 5]]) {
    const next = onMessage(room, { seq, author: 'ann', kind: 'delete', target_seq: target }, 'ann', false);
    assert.deepEqual([next.lastSeq, next.unread, next.mentions, next.stale], [seq, 4, 1, false]);
    room = next;
  }
  // Reactions are heard only; a duplicate of the delete is not applied twice.
  room = onMessage(room, { seq: 18, author: 'bob', kind: 'react', target_seq: 13, body: '👍' }, 'ann', false);
  assert.deepEqual([room.unread, room.mentions], [4, 1]);
  room = onMessage(room, { seq: 19, author: 'bob', kind: 'delete', target_seq: 13 }, 'ann', false);
  assert.deepEqual([room.unread, room.mentions], [3, 1]);
  assert.equal(onMessage(room, { seq: 19, author: 'bob', kind: 'delete', target_seq: 13 }, 'ann', false), room);
  // A delete of a message the server counted (8-10: whose, this page does not know) asks for the list.
  const unsure = onMessage(room, { seq: 20, author: 'bob', kind: 'delete', target_seq: 9 }, 'ann', false);
  assert.deepEqual([unsure.unread, unsure.stale], [3, true]);
  // The list read after it (the server: 8 and 10 unread, no mention left) keeps what came since.
  const listed = fromServer([{ name: 'general', last_seq: 20, read_seq: 7, unread: 2, mentions: 0 }]);
  const fresh = merge(listed[0], { ...unsure, lastSeq: 21, unread: 4, counted: [21], mentioned: [] });
  assert.deepEqual([fresh.lastSeq, fresh.unread, fresh.mentions, fresh.stale, fresh.counted], [21, 3, 0, false, [21]]);
  // Reading past the server's part makes the counts exact again.
  const read = onRead(fresh, 20);
  assert.deepEqual([read.unread, read.mentions, read.counted], [1, 0, [21]]);
});

test('a replayed message already deleted is not unread; edits move mentions of counted messages', () => {
  let [room] = fromServer([{ name: 'r', last_seq: 4, read_seq: 4, unread: 0, mentions: 0 }]);
  room = onMessage(room, { seq: 5, author: 'bob', body: '', deleted: true }, 'ann', false);
  room = onMessage(room, { seq: 6, author: 'bob', body: 'hi' }, 'ann', false);
  room = onMessage(room, { seq: 7, author: 'bob', kind: 'delete', target_seq: 5 }, 'ann', false);
  assert.deepEqual([room.unread, room.mentions], [1, 0]);
  room = onMessage(room, { seq: 8, author: 'bob', kind: 'edit', target_seq: 6, body: 'hi @ann' }, 'ann', true);
  assert.deepEqual([room.unread, room.mentions, room.mentioned], [1, 1, [6]]);
  room = onMessage(room, { seq: 9, author: 'bob', kind: 'edit', target_seq: 6, body: 'hi' }, 'ann', false);
  assert.deepEqual([room.unread, room.mentions, room.mentioned], [1, 0, []]);
  // Nothing of the server's part is unread here: a delete or an edit of it moves nothing.
  const old = onMessage(room, { seq: 10, author: 'bob', kind: 'delete', target_seq: 3 }, 'ann', false);
  assert.deepEqual([old.unread, old.stale], [1, false]);
});

test('the seqs kept per room are bounded; past them a delete asks for the list', () => {
  let [room] = fromServer([{ name: 'r', last_seq: 0, read_seq: 0, unread: 0, mentions: 0 }]);
  for (let seq = 1; seq <= 600; seq++) room = onMessage(room, { seq, author: 'bob', body: 'x' }, 'ann', false);
  assert.equal(room.unread, 600);
  assert.equal(room.counted.length, 500);
  assert.equal(room.untrackedSeq, 100);
  const kept = onMessage(room, { seq: 601, author: 'bob', kind: 'delete', target_seq: 300 }, 'ann', false);
  assert.deepEqual([kept.unread, kept.stale], [599, false]);
  const dropped = onMessage(room, { seq: 601, author: 'bob', kind: 'delete', target_seq: 50 }, 'ann', false);
  assert.deepEqual([dropped.unread, dropped.stale], [600, true]);
});
