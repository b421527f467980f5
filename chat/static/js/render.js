// Rendering: DOM nodes from messages and room entries. User text goes through textContent (and
// links through an <a> whose href is checked http(s) by js/text.js), never innerHTML.
import { continues, dayOf, segments } from './text.js';

export function node(tag, className, text) {
  const n = document.createElement(tag);
  n.className = className;
  if (text !== undefined) n.textContent = text == null ? '' : String(text);
  return n;
}

// A body's text with its http(s) links and @mentions of `me`; also used for an edit.
export function renderBody(li, body, text, me) {
  body.replaceChildren();
  li.classList.remove('mentions-me');
  for (const s of segments(text, me)) {
    if (s.href) {
      const a = node('a', 'link', s.text);
      a.href = s.href;
      a.target = '_blank';
      a.rel = 'noopener noreferrer';
      body.append(a);
    } else if (s.mention) {
      body.append(node('mark', 'mention', s.text));
      li.classList.add('mentions-me');
    } else {
      body.append(document.createTextNode(s.text));
    }
  }
}

// One message as an <li class="msg">; `decorate` (js/../changes.js) adds edits, reactions, replies.
export function renderMessage(m, me, decorateChanges) {
  const li = node('li', 'msg');
  if (m.kind === 'notice') li.classList.add('notice');
  if (m.author === me) li.classList.add('mine');
  li.dataset.seq = String(m.seq);
  const time = node('time', 'time');
  const date = new Date(m.sent_at);
  if (typeof m.sent_at === 'string' && !Number.isNaN(date.getTime())) {
    time.dateTime = m.sent_at;
    const hm = `${String(date.getHours()).padStart(2, '0')}:${String(date.getMinutes()).padStart(2, '0')}`;
    const today = date.toDateString() === new Date().toDateString();
    time.textContent = today ? hm : `${date.toLocaleDateString(undefined, { day: 'numeric', month: 'short' })} ${hm}`;
    time.title = date.toLocaleString();
  }
  const meta = node('div', 'meta');
  meta.append(node('span', 'author', m.author), time);
  const body = node('div', 'body');
  renderBody(li, body, m.body, me);
  li.append(meta, body);
  li.msg = m; // for grouping and day separators
  if (decorateChanges) decorateChanges(li, m);
  return li;
}

// Consecutive messages by one author are grouped; a new day starts with its date.
export function decorate(list, li) {
  if (!li) return;
  let prev = li.previousElementSibling;
  while (prev && !prev.classList.contains('msg')) prev = prev.previousElementSibling;
  const m = li.msg;
  const sep = li.previousElementSibling && li.previousElementSibling.classList.contains('day')
    ? li.previousElementSibling : null;
  const day = m ? dayOf(m.sent_at) : null;
  const newDay = day && (!prev || !prev.msg || dayOf(prev.msg.sent_at) !== day);
  if (newDay && !sep) {
    const d = node('li', 'day', new Date(m.sent_at).toLocaleDateString(undefined, { weekday: 'long', day: 'numeric', month: 'long', year: 'numeric' }));
    d.setAttribute('role', 'separator');
    list.insertBefore(d, li);
  } else if (!newDay && sep) {
    sep.remove();
  }
  li.classList.toggle('cont', !!(prev && prev.msg && m && continues(prev.msg, m)));
}

export function decorateAll(list) {
  for (const li of list.getElementsByClassName('msg')) decorate(list, li);
}

// The sidebar: one button per room, with its unread badge (red when it mentions the user).
export function roomItems(names, entryOf, current) {
  return names.map((name) => {
    const entry = entryOf(name);
    const li = node('li', 'room-item');
    const btn = node('button', 'room');
    btn.type = 'button';
    btn.dataset.room = name;
    btn.append(node('span', 'room-name', entry.label));
    if (entry.unread > 0 && name !== current) {
      const badge = node('span', entry.mentions > 0 ? 'badge mention-badge' : 'badge', entry.unread >= 1000 ? '999+' : entry.unread);
      badge.setAttribute('aria-label', `${entry.unread} unread${entry.mentions ? `, ${entry.mentions} mentioning you` : ''}`);
      btn.append(badge);
    }
    li.append(btn);
    return li;
  });
}
