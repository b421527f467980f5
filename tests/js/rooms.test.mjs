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
