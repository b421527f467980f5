// Pure text helpers for the page: links, mentions, days, grouping. No DOM here, so that node's
// test runner checks them (tests/js/text.test.mjs).

const LINK_RE = /\bhttps?:\/\/[^\s<>"']+/gi;
const TRAILING_RE = /[.,;:!?)\]}]+$/; // "see https://x.org/a." : the period is the sentence's
const MENTION_RE = /(^|[^A-Za-z0-9_.-])@([A-Za-z0-9_.-]{1,64})/g;

// The body as segments: {text} plain, {text, href} an http(s) link, {text, mention} an @name of
// `me`. Only http and https become links: no javascript:, data: or any other scheme.
export function segments(body, me) {
  const out = [];
  const text = String(body ?? '');
  let at = 0;
  for (const match of text.matchAll(LINK_RE)) {
    let href = match[0];
    const trail = href.match(TRAILING_RE);
    if (trail) href = href.slice(0, -trail[0].length);
    if (match.index > at) out.push(...mentionSegments(text.slice(at, match.index), me));
    out.push({ text: href, href });
    at = match.index + href.length;
  }
  if (at < text.length) out.push(...mentionSegments(text.slice(at), me));
  return out;
}

function mentionSegments(text, me) {
  if (!me) return [{ text }];
  const out = [];
  let at = 0;
  for (const match of text.matchAll(MENTION_RE)) {
    if (match[2] !== me) continue;
    const start = match.index + match[1].length;
    if (start > at) out.push({ text: text.slice(at, start) });
    out.push({ text: `@${me}`, mention: true });
    at = start + me.length + 1;
  }
  if (at < text.length) out.push({ text: text.slice(at) });
  return out;
}

export function mentions(body, me) {
  return segments(body, me).some((s) => s.mention);
}

// The local calendar day of an ISO time, as "YYYY-MM-DD" (null if it is not a time).
export function dayOf(iso, offsetMinutes = new Date(iso).getTimezoneOffset()) {
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return null;
  return new Date(t - offsetMinutes * 60000).toISOString().slice(0, 10);
}

const GROUP_MS = 5 * 60 * 1000;

// Whether message `m` continues `prev`'s group: same author, both plain text, same day, within
// five minutes of each other.
export function continues(prev, m) {
  if (!prev || !m || prev.kind !== 'text' || m.kind !== 'text' || prev.author !== m.author) return false;
  const a = new Date(prev.sent_at).getTime();
  const b = new Date(m.sent_at).getTime();
  if (Number.isNaN(a) || Number.isNaN(b)) return false;
  return b - a >= 0 && b - a < GROUP_MS && dayOf(prev.sent_at) === dayOf(m.sent_at);
}
