import { test } from 'node:test';
import assert from 'node:assert/strict';
import { segments, mentions, dayOf, continues } from '../../chat/static/js/text.js';

test('http and https become links, nothing else does', () => {
  assert.deepEqual(segments('see https://example.org/a?b=1. and http://x.io', null), [
    { text: 'see ' },
    { text: 'https://example.org/a?b=1', href: 'https://example.org/a?b=1' },
    { text: '. and ' },
    { text: 'http://x.io', href: 'http://x.io' },
  ]);
  for (const body of ['javascript:alert(1)', 'data:text/html,<b>', 'ftp://x.org', '<a href="x">']) {
    assert.ok(segments(body, null).every((s) => !s.href), body);
  }
});

test('only the user\'s own @name is a mention, whole', () => {
  assert.deepEqual(segments('hi @ann and @anna, mail ann@x.org', 'ann'), [
    { text: 'hi ' },
    { text: '@ann', mention: true },
    { text: ' and @anna, mail ann@x.org' },
  ]);
  assert.ok(mentions('@bob: look', 'bob'));
  assert.ok(!mentions('@bobby look', 'bob'));
  assert.ok(!mentions('@bob look', null));
});

test('days and groups', () => {
  assert.equal(dayOf('2026-12-01T23:30:00Z', 0), '2026-12-01');
  assert.equal(dayOf('2026-12-01T23:30:00Z', -60), '2026-12-02');
  assert.equal(dayOf('not a time'), null);
  const a = { author: 'ann', kind: 'text', sent_at: '2026-12-01T10:00:00Z' };
  assert.ok(continues(a, { ...a, sent_at: '2026-12-01T10:04:00Z' }));
  assert.ok(!continues(a, { ...a, sent_at: '2026-12-01T10:06:00Z' }));
  assert.ok(!continues(a, { ...a, author: 'bob' }));
  assert.ok(!continues(a, { ...a, kind: 'notice' }));
  assert.ok(!continues(null, a));
});
