// Messages that change (README "Messages that change"): edit, delete, react, reply.
// Self-contained: the page calls ChatChanges.install() once, decorate() on each message it
// renders, setOwner() with whether the user owns the room shown, apply() on each change frame
// (a message frame with target_seq), and submit()/onKey() from its composer. User text goes
// through textContent only.
'use strict';

window.ChatChanges = (function () {
  const EMOJI = ['👍', '❤️', '😂', '🎉', '😮'];
  const QUOTE_CHARS = 80;
  // {me: () => name, send: (frame) => bool, list: <ol>, input: <textarea>, bar: <div>,
  //  body?: (li, text) => void renders an edited body}
  let hooks = null;
  let mode = null; // {kind: 'edit' | 'reply', seq, author, body}
  let counter = 0;

  function el(tag, className, text) {
    const n = document.createElement(tag);
    if (className) n.className = className;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function send(frame) {
    counter += 1;
    return hooks.send({ ...frame, client_id: `x${Date.now().toString(36)}${counter}` });
  }

  function find(seq) { return hooks.list.querySelector(`li.msg[data-seq="${Number(seq)}"]`); }

  function short(text) { return text.length > QUOTE_CHARS ? `${text.slice(0, QUOTE_CHARS)}…` : text; }

  // Whether this user owns the room shown: its others' messages get a Delete action.
  function setOwner(owner) { if (hooks) hooks.list.classList.toggle('owns-room', !!owner); }

  function install(h) {
    hooks = h;
    hooks.bar.addEventListener('click', (e) => { if (e.target.closest('.cancel')) cancel(); });
    hooks.list.addEventListener('click', onClick);
  }

  // --- rendering ---------------------------------------------------------------------------

  function decorate(li, m) {
    li.reactions = new Map((Array.isArray(m.reactions) ? m.reactions : []).map((r) => [r.emoji, { count: r.count, mine: r.mine }]));
    // An older page's messages hold every change up to as_of: those still on their way live are skipped.
    if (Number.isInteger(m.as_of)) li.dataset.asOf = String(m.as_of);
    if (Number.isInteger(m.reply_to)) {
      li.dataset.replyTo = String(m.reply_to);
      const q = el('blockquote', 'quote');
      q.append(el('span', 'quote-author', m.quote ? m.quote.author : ''), el('span', 'quote-body', ''));
      li.querySelector('.body').before(q);
      setQuote(q, m.quote || { body: '', deleted: false });
    }
    if (m.edited_at) markEdited(li);
    if (m.deleted) markDeleted(li);
    li.tabIndex = -1; // a tap focuses the message, which shows its actions (phones have no hover)
    const actions = el('div', 'actions');
    actions.setAttribute('role', 'group');
    actions.setAttribute('aria-label', 'Message actions');
    const reply = el('button', 'act reply', 'Reply');
    reply.type = 'button';
    actions.append(reply);
    for (const emoji of EMOJI) {
      const b = el('button', 'act emoji', emoji);
      b.type = 'button';
      b.dataset.emoji = emoji;
      b.setAttribute('aria-label', `React ${emoji}`);
      actions.append(b);
    }
    if (m.author === hooks.me() && m.kind === 'text') {
      const edit = el('button', 'act edit', 'Edit');
      const del = el('button', 'act delete', 'Delete');
      edit.type = del.type = 'button';
      actions.append(edit, del);
    } else if (m.kind === 'text' || m.kind === 'notice') {
      // The room's owner may delete anyone's message: shown while the list has setOwner(true)
      // (the page learns the owner from the room list, possibly after the messages are drawn).
      const del = el('button', 'act delete as-owner', 'Delete');
      del.type = 'button';
      actions.append(del);
    }
    li.append(el('div', 'reactions'), actions);
    renderReactions(li);
  }

  function setQuote(q, quote) {
    q.querySelector('.quote-body').textContent = quote.deleted ? 'deleted message' : short(quote.body);
    q.classList.toggle('gone', !!quote.deleted);
  }

  function markEdited(li) {
    if (li.querySelector('.edited')) return;
    li.querySelector('.meta').append(el('span', 'edited', '(edited)'));
  }

  function markDeleted(li) {
    li.classList.add('deleted');
    li.querySelector('.body').textContent = 'This message was deleted.';
    li.reactions = new Map();
    for (const n of li.querySelectorAll('.actions, .edited')) n.remove();
  }

  function renderReactions(li) {
    const box = li.querySelector('.reactions');
    if (!box) return;
    box.replaceChildren();
    for (const [emoji, r] of [...li.reactions.entries()].sort()) {
      if (r.count <= 0) continue;
      const b = el('button', 'reaction', `${emoji} ${r.count}`);
      b.type = 'button';
      b.dataset.emoji = emoji;
      b.setAttribute('aria-pressed', String(!!r.mine));
      b.setAttribute('aria-label', `${emoji} ${r.count}${r.mine ? ', yours' : ''}`);
      box.append(b);
    }
  }

  // --- change frames -----------------------------------------------------------------------

  function apply(f) {
    const li = find(f.target_seq);
    if (f.kind === 'edit' || f.kind === 'delete') {
      for (const reply of hooks.list.querySelectorAll(`li.msg[data-reply-to="${Number(f.target_seq)}"] .quote`)) {
        setQuote(reply, { body: f.body, deleted: f.kind === 'delete' });
      }
    }
    if (!li || li.classList.contains('deleted')) return;
    if (li.dataset.asOf && f.seq <= Number(li.dataset.asOf)) return;
    if (f.kind === 'edit') {
      if (hooks.body) hooks.body(li, f.body); // the page's links and mentions
      else li.querySelector('.body').textContent = f.body;
      markEdited(li);
    } else if (f.kind === 'delete') {
      markDeleted(li);
      if (mode && mode.seq === f.target_seq) cancel();
    } else if (f.kind === 'react' || f.kind === 'unreact') {
      const r = li.reactions.get(f.body) || { count: 0, mine: false };
      r.count += f.kind === 'react' ? 1 : -1;
      if (f.author === hooks.me()) r.mine = f.kind === 'react';
      li.reactions.set(f.body, r);
    }
    renderReactions(li);
  }

  // --- actions -----------------------------------------------------------------------------

  function onClick(e) {
    const b = e.target.closest('button');
    const li = b && b.closest('li.msg');
    if (!li) return;
    const seq = Number(li.dataset.seq);
    if (b.classList.contains('reply')) start('reply', li);
    else if (b.classList.contains('edit')) start('edit', li);
    else if (b.classList.contains('delete')) {
      if (window.confirm('Delete this message for everyone?')) send({ type: 'delete', target_seq: seq });
    } else if (b.dataset.emoji) {
      const mine = (li.reactions.get(b.dataset.emoji) || {}).mine;
      send({ type: mine ? 'unreact' : 'react', target_seq: seq, emoji: b.dataset.emoji });
    }
  }

  function start(kind, li) {
    const body = li.querySelector('.body').textContent;
    mode = { kind, seq: Number(li.dataset.seq), author: li.querySelector('.author').textContent, body };
    hooks.bar.replaceChildren(
      el('span', 'mode-text', kind === 'edit' ? 'Editing your message' : `Replying to ${mode.author}: ${short(body)}`),
      el('button', 'cancel secondary', 'Cancel'),
    );
    hooks.bar.querySelector('.cancel').type = 'button';
    hooks.bar.hidden = false;
    if (kind === 'edit') hooks.input.value = body;
    hooks.input.focus();
    hooks.input.dispatchEvent(new Event('input'));
  }

  function cancel() {
    const wasEdit = mode && mode.kind === 'edit';
    mode = null;
    hooks.bar.hidden = true;
    hooks.bar.replaceChildren();
    if (wasEdit) hooks.input.value = '';
    hooks.input.focus();
  }

  // The composer's text: an edit is sent here (true); a reply returns its seq for the send.
  function submit(body) {
    if (!mode) return { handled: false, replyTo: null };
    const m = mode;
    mode = null;
    hooks.bar.hidden = true;
    if (m.kind === 'edit') {
      if (body.trim() && body !== m.body) send({ type: 'edit', target_seq: m.seq, body });
      return { handled: true, replyTo: null };
    }
    return { handled: false, replyTo: m.seq };
  }

  // ↑ in an empty composer edits your last message; Esc leaves edit or reply.
  function onKey(e) {
    if (e.key === 'Escape' && mode) {
      e.preventDefault();
      cancel();
      return true;
    }
    if (e.key === 'ArrowUp' && !hooks.input.value) {
      const mine = [...hooks.list.querySelectorAll('li.msg.mine:not(.deleted)')].filter((li) => li.querySelector('.edit'));
      if (!mine.length) return false;
      e.preventDefault();
      start('edit', mine[mine.length - 1]);
      return true;
    }
    return false;
  }

  return { install, setOwner, decorate, apply, submit, onKey };
})();
