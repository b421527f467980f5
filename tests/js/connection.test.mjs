import { test } from 'node:test';
import assert from 'node:assert/strict';
import { plan, subscribeFrame, track, wanted } from '../../chat/static/js/connection.js';

test('the shown room first, then the most recently active, at most the server\'s limit', () => {
  const order = ['a', 'b', 'c', 'd'];
  assert.deepEqual(wanted(order, 'c', 3), ['c', 'a', 'b']);
  assert.deepEqual(wanted(order, 'z', 2), ['z', 'a']); // a room past the limit, opened: in place of the least active
  assert.deepEqual(wanted(order, null, 10), order);
  assert.deepEqual(wanted(order, 'a', 1), ['a']);
});

test('a subscribe resumes from the seq held, or asks for the recent history', () => {
  assert.deepEqual(subscribeFrame('a', 41), { type: 'subscribe', room: 'a', after: 41 });
  assert.deepEqual(subscribeFrame('a', 0), { type: 'subscribe', room: 'a' });
  assert.deepEqual(subscribeFrame('a', undefined), { type: 'subscribe', room: 'a' });
});

test('the plan subscribes what is wanted and not held, and lets go of the rest once', () => {
  const held = new Map([['a', 'ready'], ['b', 'subscribing'], ['c', 'leaving'], ['d', 'ready']]);
  assert.deepEqual(plan(held, ['a', 'c', 'e']), { subscribe: ['e'], unsubscribe: ['b', 'd'] });
  assert.deepEqual(plan(new Map(), ['x', 'y']), { subscribe: ['x', 'y'], unsubscribe: [] });
});

test('frames move the rooms held: ready, unsubscribed, refusals and removal', () => {
  let held = new Map([['a', 'subscribing'], ['b', 'ready'], ['c', 'leaving']]);
  held = track(held, { type: 'ready', room: 'a' });
  assert.equal(held.get('a'), 'ready');
  held = track(held, { type: 'unsubscribed', room: 'c' });
  assert.equal(held.has('c'), false);
  // A send refused in a room (it names its client_id) leaves the room held.
  assert.equal(track(held, { type: 'error', code: 'unavailable', room: 'b', client_id: 'x' }), held);
  // A refusal of a ready room's other frame neither: only a removal ends it.
  assert.equal(track(held, { type: 'error', code: 'no_such_room', room: 'b' }), held);
  held = track(held, { type: 'error', code: 'removed', room: 'b' });
  assert.deepEqual([...held.keys()], ['a']);
  const refused = track(new Map([['p', 'subscribing']]), { type: 'error', code: 'no_such_room', room: 'p' });
  assert.equal(refused.size, 0);
  assert.equal(track(held, { type: 'message', room: 'zzz', seq: 1 }), held); // not held: nothing
});

test('already subscribed (the server had it): held as ready', () => {
  const held = track(new Map([['a', 'subscribing']]), { type: 'error', code: 'already_subscribed', room: 'a' });
  assert.equal(held.get('a'), 'ready');
});
