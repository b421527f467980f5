// The chat page: sign-in, rooms on ONE /socket (js/connection.js: every room the sidebar follows,
// resumed per room by seq), pending sends; the sidebar from the server's room list with unread
// badges kept live from that socket, read positions, mentions, search. Every piece of
// user-controlled text goes through textContent, never innerHTML. ES modules: the API client
// (js/api.js), the connection (js/connection.js), room state as pure functions (js/rooms.js,
// js/text.js; tested by node --test) and rendering (js/render.js); this module wires them.
import * as http from './js/api.js';
import { Connection, wanted } from './js/connection.js';
import * as render from './js/render.js';
import * as roomList from './js/rooms.js';
import { mentions } from './js/text.js';

const ROOM_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const HISTORY_LIMIT = 50;
const PING_MS = 25000;
const STALE_MS = 70000; // nothing heard for this long (pongs included): the socket is dead
const SEND_ERRORS = new Set(['too_large', 'empty', 'invalid_text', 'invalid_frame', 'unavailable', 'rejected']);
const LABELS = { connecting: 'Connecting…', connected: 'Connected', reconnecting: 'Reconnecting…', offline: 'Offline' };

const el = {};
let me = null; // the signed-in user's name
let rooms = []; // the rooms in the sidebar, by name
let entries = new Map(); // name -> the room list's entry (js/rooms.js): label, unread, mentions, readSeq
let maxRooms = 50; // the server's CHAT_SOCKET_ROOMS_MAX (GET /api/me)
let current = null; // the room being shown
let shown = null; // the room whose nodes are in #messages and #outbox
const roomState = new Map(); // room name -> state, see stateOf
let conn = null; // the one socket (js/connection.js), or null while reconnecting
const retry = { attempt: 0, failures: 0, timer: null, tick: null };
let pingTimer = null;

// --- helpers ---------------------------------------------------------------------------------

function load(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch (e) { return fallback; }
}

function save(key, value) {
  try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* storage off: fine */ }
}

const node = render.node;

function newClientId() {
  if (window.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2);
}

function detailOf(data, fallback) {
  if (data && typeof data.detail === 'string') return data.detail;
  if (data && Array.isArray(data.detail)) return data.detail.map((d) => (d && d.msg) || '').join('; ') || fallback;
  return fallback;
}

const api = http.api;

function showText(target, text) {
  target.textContent = text || '';
  target.hidden = !text;
}

function showView(name) {
  el.loading.hidden = name !== 'loading';
  el.signinView.hidden = name !== 'signin';
  el.chatView.hidden = name !== 'chat';
  el.account.hidden = name !== 'chat';
  el.status.hidden = name !== 'chat'; // signed out is not "offline"; data-state still says it
}

function setStatus(state, label) {
  el.status.dataset.state = state;
  el.status.textContent = label || LABELS[state];
}

function showBanner(text, code) {
  el.errorText.textContent = text;
  el.banner.dataset.code = code || '';
  keepBottom(() => { el.banner.hidden = false; }); // it takes room from the message list
}

// --- sign-in ---------------------------------------------------------------------------------

function tokenFromHash() {
  if (!location.hash) return null;
  const token = new URLSearchParams(location.hash.slice(1)).get('token');
  if (token === null) return null;
  history.replaceState(null, '', location.pathname + location.search); // keep the token out of the URL
  return token.trim() || null;
}

async function checkMe() {
  try {
    const r = await api('GET', '/api/me');
    if (r.ok && r.data && typeof r.data.user === 'string') {
      if (Number.isInteger(r.data.socket_rooms_max) && r.data.socket_rooms_max > 0) maxRooms = r.data.socket_rooms_max;
      return { user: r.data.user };
    }
    return r.status === 401 ? { signedOut: true } : { error: `the server answered ${r.status}` };
  } catch (e) { return { error: 'cannot reach the server' }; }
}

async function signIn(token) {
  showText(el.signinError, '');
  el.signinSubmit.disabled = true;
  try {
    const r = await api('POST', '/api/session', { token });
    if (r.ok && r.data && typeof r.data.user === 'string') {
      el.tokenInput.value = '';
      await checkMe(); // the server's limits (socket_rooms_max)
      startChat(r.data.user);
    } else {
      showSignin(`Sign-in failed: ${detailOf(r.data, `the server answered ${r.status}`)}.`);
    }
  } catch (e) {
    showSignin('Sign-in failed: cannot reach the server.');
  } finally {
    el.signinSubmit.disabled = false;
  }
}

function showSignin(message) {
  stopSocket();
  me = null;
  roomState.clear();
  el.messages.replaceChildren();
  el.outbox.replaceChildren();
  shown = current = null;
  setStatus('offline');
  showView('signin');
  showText(el.signinError, message);
  el.tokenInput.focus();
}

async function signOut() {
  stopSocket();
  try { await api('DELETE', '/api/session'); } catch (e) { /* signed out here anyway */ }
  showSignin('');
}

// Saved rooms are per user: one browser, several accounts, no room list leaking across them.
function roomsKey() { return `chat.rooms.${me}`; }
function roomKey() { return `chat.room.${me}`; }

// A #token= link while signed in may come from anyone (login CSRF): switching accounts silently
// would post this user's words into someone else's account. Ask first; no means no change.
async function signInFromLink(token) {
  const r = me === null ? await checkMe() : { user: me };
  if (r.user) {
    const question = `You are signed in as ${r.user}. This link signs in with another token, `
      + 'possibly another account. Switch to it?';
    if (!window.confirm(question)) {
      if (me === null) startChat(r.user);
      return;
    }
  }
  return signIn(token);
}

function startChat(user) {
  if (me !== null && me !== user) showSignin(''); // another account: forget what the last one saw
  me = user;
  el.me.textContent = user;
  const stored = load(roomsKey(), ['general']);
  rooms = Array.isArray(stored) ? [...new Set(stored.filter((r) => typeof r === 'string' && ROOM_RE.test(r)))] : [];
  if (!rooms.length) rooms = ['general'];
  const saved = load(roomKey(), rooms[0]);
  const room = typeof saved === 'string' && ROOM_RE.test(saved) ? saved : rooms[0];
  if (!rooms.includes(room)) rooms.push(room);
  save(roomsKey(), rooms);
  current = null;
  entries = new Map(roomList.fromServer([], rooms).map((r) => [r.name, r]));
  renderRoomList();
  showView('chat');
  fitComposer();
  openRoom(room);
  refreshRooms();
  if (window.matchMedia('(pointer: fine)').matches) el.messageInput.focus(); // no on-screen keyboard popping up
}

// --- rooms -----------------------------------------------------------------------------------

function stateOf(name) {
  if (!roomState.has(name)) {
    roomState.set(name, {
      lastSeq: 0, // the highest seq rendered
      minSeq: null, // the lowest seq rendered
      seen: new Set(),
      exhausted: false,
      loadingOlder: false,
      pending: [], // {clientId, body, el, retries}: sent, not acknowledged yet
      awaiting: new Map(), // seq -> outbox element: acknowledged, its message not rendered yet
      stash: { messages: document.createDocumentFragment(), outbox: document.createDocumentFragment() },
    });
  }
  return roomState.get(name);
}

// The server's room list (every device sees the same), then the names only this browser knows.
// Read at load, after each reconnect, when the tab comes back, and when the socket says the
// list changed (`rooms`: an invitation, a new DM, a removal); never polled. Between reads the
// badges of the rooms on the socket move with its frames.
let listing = null; // {user, again}: one read at a time per user, and one more after it
async function refreshRooms() {
  if (!me) return;
  if (listing && listing.user === me) { listing.again = true; return; }
  const mine = listing = { user: me, again: false };
  try {
    const r = await http.myRooms();
    if (listing !== mine || me !== mine.user) return; // signed out, or another account, meanwhile
    if (r.ok && Array.isArray(r.data)) {
      const local = rooms.filter((name) => !r.data.some((s) => s.name === name) && !entries.get(name)?.known);
      const fresh = roomList.fromServer(r.data, local);
      // What this page heard live is never older than the list's snapshot.
      entries = new Map(fresh.map((e) => [e.name, roomList.merge(e, entries.get(e.name))]));
      rooms = fresh.map((e) => e.name);
      save(roomsKey(), rooms);
      renderRoomList();
      holdRooms();
    }
  } catch (e) { /* offline: read again after the reconnect */ }
  if (listing !== mine) return;
  listing = null;
  if (mine.again) refreshRooms();
}

// The rooms on the socket: the shown one, then the most recently active of the server's list,
// CHAT_SOCKET_ROOMS_MAX in all. Past that, a room's badge is the room list's as last read (it is
// followed live once it is opened, in place of the least recently active).
function holdRooms() {
  // Only rooms the server listed: subscribing joins a room (or makes one), so a name only this
  // browser remembers is subscribed to when it is opened, not in the background.
  if (conn) conn.hold(wanted(rooms.filter((name) => entries.get(name)?.known), current, maxRooms));
}

function renderRoomList() {
  const entryOf = (name) => entries.get(name) || roomList.fromServer([], [name])[0];
  el.roomList.replaceChildren(...render.roomItems(rooms, entryOf, current));
  markCurrentRoom();
}

function updateEntry(name, fn) {
  const entry = entries.get(name);
  if (!entry) return;
  const next = fn(entry);
  if (next === entry) return;
  entries.set(name, next);
  renderRoomList();
  // A delete (or an edit) just heard of a message the list's snapshot counted: only the server
  // knows whose it was.
  if (next.stale && next.lastSeq > entry.lastSeq) refreshRooms();
}

// Everything on screen is read once the tab is visible and the newest message is in view.
let readTimer = null;
function markRead() {
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    if (!conn || !current || !conn.isReady(current) || document.hidden) return;
    const s = el.scroller;
    if (s.scrollHeight - s.scrollTop - s.clientHeight > 80) return; // reading older messages
    const entry = entries.get(current);
    const seq = entry ? roomList.toReport(entry, stateOf(current).lastSeq) : null;
    if (seq === null) return;
    if (!conn.send({ type: 'read', room: current, seq })) return;
    updateEntry(current, (en) => roomList.onRead(en, seq));
  }, 300);
}

function onRead(f) { // this user's read position moved (here or on another device)
  if (!Number.isInteger(f.seq)) return;
  updateEntry(f.room, (en) => roomList.onRead(en, f.seq));
}

function markCurrentRoom() {
  const entry = entries.get(current);
  ChatChanges.setOwner(!!me && !!entry && entry.owner === me); // the server checks it again on delete
  for (const btn of el.roomList.querySelectorAll('button.room')) {
    if (btn.dataset.room === current) {
      btn.setAttribute('aria-current', 'true');
      if (!el.chatView.hidden) btn.scrollIntoView({ block: 'nearest', inline: 'nearest' }); // phones: a sideways row
    } else {
      btn.removeAttribute('aria-current');
    }
  }
}

function onRoomSubmit(e) {
  e.preventDefault();
  const name = el.roomInput.value.trim();
  if (!ROOM_RE.test(name)) {
    el.roomInput.setAttribute('aria-invalid', 'true');
    showText(el.roomError, 'Room names are 1–64 characters of A–Z a–z 0–9 _ . - and start with a letter or digit.');
    el.roomInput.focus();
    return;
  }
  el.roomInput.removeAttribute('aria-invalid');
  showText(el.roomError, '');
  el.roomInput.value = '';
  if (!rooms.includes(name)) {
    rooms.push(name);
    save(roomsKey(), rooms);
    entries.set(name, roomList.fromServer([], [name])[0]);
    renderRoomList();
  }
  openRoom(name);
  el.messageInput.focus();
}

function openRoom(name) {
  if (name === current && conn && conn.isReady(name)) return;
  online.clear(); // the next ready frame says who is online in the new room
  typists.clear();
  renderOnline();
  renderTyping();
  if (shown !== name) { // park the old room's nodes, bring back the new room's
    if (shown) {
      stateOf(shown).stash.messages.append(...el.messages.childNodes);
      stateOf(shown).stash.outbox.append(...el.outbox.childNodes);
      stateOf(shown).loadingOlder = false;
    }
    el.messages.append(...stateOf(name).stash.messages.childNodes);
    el.outbox.append(...stateOf(name).stash.outbox.childNodes);
    shown = name;
  }
  current = name;
  delete el.scroller.dataset.ready; // until the room's replay is in: no "no messages yet"
  save(roomKey(), name);
  const entry = entries.get(name);
  el.currentRoom.textContent = entry ? entry.label : name;
  state0(name);
  renderRoomList();
  el.banner.hidden = true;
  updateLoadOlder();
  scrollToBottom();
  if (!conn) {
    if (!retry.timer) { retry.attempt = retry.failures = 0; connect(); }
    return;
  }
  setStatus('connecting');
  // In the background a room is heard, not drawn: subscribe again from what is drawn, for its
  // replay and who is online (once a subscribe under way is answered).
  const held = conn.held.get(name);
  stateOf(name).refresh = held === 'subscribing';
  if (held === 'ready') conn.refresh(name);
  holdRooms();
}

// The "new messages" line: where the room's unread messages begin when it is opened.
function state0(name) {
  const entry = entries.get(name);
  const state = stateOf(name);
  if (state.readAtOpen === undefined) state.readAtOpen = entry ? entry.readSeq : null;
}

function placeUnreadLine(state) {
  for (const old of el.messages.querySelectorAll('.unread-line')) old.remove();
  if (state.readAtOpen === null || state.readAtOpen === undefined) return;
  const msgs = [...el.messages.getElementsByClassName('msg')];
  const first = msgs.find((n) => Number(n.dataset.seq) > state.readAtOpen && !n.classList.contains('mine'));
  if (first) el.messages.insertBefore(node('li', 'unread-line', 'New messages'), first);
}

// --- the socket ------------------------------------------------------------------------------

function connect() {
  clearRetry();
  if (!me || !current) return;
  if (navigator.onLine === false) return setStatus('offline'); // the 'online' event reconnects
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  setStatus('connecting');
  let c;
  try {
    c = new Connection({
      url: `${scheme}://${location.host}/socket?live=batch`, // one frame for what commits together
      seqOf,
      onFrame: (f) => { if (conn === c) onFrame(c, f); },
      onOpen: () => {
        if (conn !== c) return;
        retry.failures = 0;
        clearInterval(pingTimer);
        pingTimer = setInterval(() => ping(c), PING_MS);
        refreshRooms(); // what changed while away
      },
      onClose: (ev) => { if (conn === c) onClose(c, ev); },
    });
  } catch (e) {
    return scheduleReconnect();
  }
  conn = c;
  stateOf(current).refresh = false; // subscribed from what is drawn
  holdRooms();
}

// Where a room resumes: the shown room from what is drawn (none yet: the recent history); a
// room in the background from the last seq heard (the room list's, then its frames').
function seqOf(room) {
  if (room === shown) return stateOf(room).lastSeq;
  const entry = entries.get(room);
  return entry ? entry.lastSeq : 0;
}

function stopSocket() {
  clearRetry();
  clearInterval(pingTimer);
  if (!conn) return;
  const c = conn;
  conn = null;
  c.close();
}

function clearRetry() {
  clearTimeout(retry.timer);
  clearInterval(retry.tick);
  retry.timer = retry.tick = null;
}

function scheduleReconnect(delay) {
  clearRetry();
  if (!me) return;
  if (navigator.onLine === false) return setStatus('offline');
  if (delay === undefined) { // 0.5s doubling to 10s, with jitter
    delay = Math.min(10000, 500 * 2 ** retry.attempt) * (0.8 + 0.4 * Math.random());
    retry.attempt += 1;
  }
  const until = Date.now() + delay;
  retry.timer = setTimeout(connect, delay);
  const tick = () => {
    const s = Math.ceil((until - Date.now()) / 1000);
    setStatus('reconnecting', s > 0 ? `Reconnecting in ${s}s…` : LABELS.reconnecting);
  };
  tick();
  retry.tick = setInterval(tick, 1000);
}

function onClose(c, ev) {
  conn = null;
  clearInterval(pingTimer);
  const state = stateOf(current);
  state.loadingOlder = false;
  updateLoadOlder();
  if (ev.code === 1009) { // a frame of ours was too big (the longest unanswered one): never resend it
    const suspects = state.pending.filter((p) => c.inflight.includes(p.clientId));
    if (suspects.length) {
      dropPending(state, suspects.reduce((a, b) => (b.body.length > a.body.length ? b : a)).clientId);
      showBanner('Message too large: it is over the server\'s frame limit. Shorten it and send again.', 'too_large');
    }
  }
  if (!c.opened && ++retry.failures >= 2) return verifySession(); // refused before accept, again
  if (ev.code === 4000) scheduleReconnect(0); // slow consumer: resume at once
  else if (ev.code === 1001) scheduleReconnect(200 + Math.random() * 800); // server going away
  else scheduleReconnect();
}

async function verifySession() {
  setStatus('reconnecting');
  const r = await checkMe();
  if (!me || conn || retry.timer) return; // signed out, or reconnecting already
  if (r.signedOut) showSignin('Your session expired. Please sign in again.');
  else scheduleReconnect();
}

function ping(c) {
  if (conn !== c) return;
  if (Date.now() - c.lastHeard > STALE_MS) { // half-open: drop it and resume
    stopSocket();
    return scheduleReconnect(0);
  }
  c.send({ type: 'ping' });
}

// Every frame of the socket. The shown room's are drawn; the other rooms' move their badges.
function onFrame(c, f) {
  if (f.type === 'rooms') return refreshRooms(); // the user's room list changed
  if (f.type === 'pong') return;
  if (typeof f.room !== 'string') { // an error about a frame that could not be read
    if (f.type === 'error') onServerError(c, stateOf(current), f);
    return;
  }
  if (f.type === 'read') return onRead(f);
  // Subscribed to a room the server did not list: now a member, so the list has it (and the room
  // stays on the socket, its badge live, once it goes to the background).
  if (f.type === 'ready' && entries.get(f.room)?.known === false) refreshRooms();
  if (f.room !== shown) return onBackground(f);
  const state = stateOf(f.room);
  if (state.refresh) { // subscribed while in the background: heard, then again from what is drawn
    if (f.type === 'ready') { state.refresh = false; c.refresh(f.room); } else onBackground(f);
    return;
  }
  if (f.type === 'messages') {
    keepBottom(() => { for (const m of Array.isArray(f.messages) ? f.messages : []) onMessage(state, m); });
  } else if (f.type === 'message') keepBottom(() => onMessage(state, f));
  else if (f.type === 'ready') onReady(c, state, f);
  else if (f.type === 'join' || f.type === 'leave') onPresence(f);
  else if (f.type === 'typing') onTyping(f);
  else if (f.type === 'ack') onAck(c, state, f);
  else if (f.type === 'history') onHistory(state, f);
  else if (f.type === 'error') onServerError(c, state, f);
  // unsubscribed, removed, and anything newer than this page: nothing to draw
  if (f.type === 'error' && (f.code === 'removed' || f.code === 'no_such_room') && typeof f.client_id !== 'string') {
    refreshRooms();
  }
}

function onMessage(state, m) {
  if (!m || typeof m !== 'object') return;
  if (Number.isInteger(m.target_seq)) onChange(state, m);
  else addMessage(state, m, false);
  updateEntry(shown, (en) => roomList.onMessage(en, m, me, mentionsMe(m)));
}

// Whether a message (or an edit's new text) mentions this user, as the server counts it.
function mentionsMe(m) {
  return (!Number.isInteger(m.target_seq) || m.kind === 'edit') && m.author !== me && mentions(m.body, me);
}

// A room in the background: its messages count (unread, mentions, a notification), nothing drawn.
function onBackground(f) {
  const entry = entries.get(f.room);
  if (!entry) return;
  if (f.type === 'message' || f.type === 'messages') {
    const list = f.type === 'message' ? [f] : (Array.isArray(f.messages) ? f.messages : []);
    for (const m of list) {
      if (!m || !Number.isInteger(m.seq)) continue;
      // A replay of a room the server did not list (a room only this browser knew) is history, not news.
      // (A `messages` frame after the room's ready is live: one commit's messages, ?live=batch.)
      if (f.type === 'messages' && !entry.known && !conn?.isReady(f.room)) {
        updateEntry(f.room, (en) => roomList.heard(en, m.seq));
        continue;
      }
      const mine = mentionsMe(m);
      const before = entries.get(f.room);
      updateEntry(f.room, (en) => roomList.onMessage(en, m, me, mine));
      if (mine && !Number.isInteger(m.target_seq) && entries.get(f.room) !== before) notify(f.room, m);
    }
  } else if (f.type === 'ack') {
    onAck(conn, stateOf(f.room), f); // a send made before the room went to the background
  } else if (f.type === 'ready') {
    updateEntry(f.room, (en) => roomList.heard(en, f.last_seq));
    // Sends typed in this room before it went to the background: the same client_id again.
    for (const p of stateOf(f.room).pending) transmit(conn, p);
  } else if (f.type === 'error' && (f.code === 'removed' || f.code === 'no_such_room') && typeof f.client_id !== 'string') {
    refreshRooms();
  }
}

function onChange(state, f) { // an edit, delete, react or unreact: its own seq, applied once, in order
  if (!Number.isInteger(f.seq) || f.seq <= state.lastSeq) return;
  state.lastSeq = f.seq;
  ChatChanges.apply(f);
}

function onPresence(f) {
  if (f.type === 'join') online.add(f.user);
  else { online.delete(f.user); typists.delete(f.user); renderTyping(); }
  renderOnline();
  if (f.user === me) return; // one's own join is not news, and every reconnect would repeat it
  addEvent(`${f.user || 'someone'} ${f.type === 'join' ? 'joined' : 'left'}`);
}

// --- who is online, who is typing ------------------------------------------------------------

const online = new Set();
const typists = new Map(); // user -> when their indicator lapses
const TYPING_SHOWN_MS = 5000;
const TYPING_EVERY_MS = 2000; // the server drops more frequent typing frames anyway
let typingSentAt = 0;
let typingTimer = null;

function renderOnline() {
  const items = [...online].sort().map((user) => {
    const li = node('li', user === me ? 'online-user me' : 'online-user', user);
    return li;
  });
  el.onlineList.replaceChildren(...items);
  el.onlineCount.textContent = online.size ? `${online.size} online` : '';
}

function onTyping(f) {
  if (!f.user || f.user === me) return;
  typists.set(f.user, Date.now() + TYPING_SHOWN_MS);
  renderTyping();
}

function renderTyping() {
  const now = Date.now();
  for (const [user, until] of typists) if (until <= now) typists.delete(user);
  const names = [...typists.keys()].sort();
  el.typing.textContent = names.length === 0 ? ''
    : names.length === 1 ? `${names[0]} is typing…`
    : names.length <= 3 ? `${names.join(', ')} are typing…` : 'Several people are typing…';
  clearTimeout(typingTimer);
  if (names.length) typingTimer = setTimeout(renderTyping, 500);
}

function sendTyping() {
  if (!el.messageInput.value.trim() || !conn || !conn.isReady(current)) return;
  if (Date.now() - typingSentAt < TYPING_EVERY_MS) return;
  typingSentAt = Date.now();
  conn.send({ type: 'typing', room: current });
}

function onReady(c, state, f) {
  if (typeof f.last_seq === 'number' && f.last_seq < state.lastSeq) {
    // The room's history went backwards (a restored database): start the room over.
    Object.assign(state, { lastSeq: 0, minSeq: null, exhausted: false });
    state.seen.clear();
    el.messages.replaceChildren();
    return c.refresh(f.room);
  }
  el.scroller.dataset.ready = 'true';
  online.clear();
  for (const user of Array.isArray(f.online) ? f.online : []) online.add(user);
  renderOnline();
  retry.attempt = retry.failures = 0;
  setStatus('connected');
  for (const p of state.pending) transmit(c, p); // the same client_id: the server stores it once
  updateLoadOlder();
  placeUnreadLine(state);
  markRead();
}

function transmit(c, p) {
  const frame = { type: 'send', room: p.room, body: p.body, client_id: p.clientId };
  if (p.replyTo) frame.reply_to = p.replyTo;
  if (c.send(frame)) c.inflight.push(p.clientId); // else: resent after the reconnect
}

function takePending(state, clientId) {
  const i = state.pending.findIndex((p) => p.clientId === clientId);
  return i < 0 ? null : state.pending.splice(i, 1)[0];
}

function dropPending(state, clientId) {
  const p = takePending(state, clientId);
  if (!p) return;
  p.el.remove();
  if (!el.messageInput.value) { // give the text back for editing
    el.messageInput.value = p.body;
    fitComposer();
  }
}

function onAck(c, state, f) {
  const i = c.inflight.indexOf(f.client_id);
  if (i >= 0) c.inflight.splice(i, 1);
  const p = takePending(state, f.client_id);
  if (!p) return;
  if (!Number.isInteger(f.seq) || f.seq <= state.lastSeq || state.seen.has(f.seq)) {
    p.el.remove();
  } else { // stays on screen until the message itself arrives
    p.el.querySelector('.state').textContent = 'sent';
    state.awaiting.set(f.seq, p.el);
  }
}

function onServerError(c, state, f) {
  // An error answering a send names its client_id; any other error is about no message of ours.
  const clientId = typeof f.client_id === 'string' ? f.client_id : null;
  const p = clientId ? state.pending.find((q) => q.clientId === clientId) : null;
  if (clientId) {
    const i = c.inflight.indexOf(clientId);
    if (i >= 0) c.inflight.splice(i, 1);
  } else if (state.loadingOlder) { // a refused history request: let the button be clicked again
    state.loadingOlder = false;
    updateLoadOlder();
  }
  if (p && f.code === 'unavailable' && p.retries < 5) { // not stored: the same client_id again, later
    p.retries += 1;
    p.el.querySelector('.state').textContent = 'retrying…';
    setTimeout(() => { if (conn === c && c.isReady(p.room) && state.pending.includes(p)) transmit(c, p); }, 1000 * 2 ** p.retries);
    return;
  }
  if (p && SEND_ERRORS.has(f.code)) dropPending(state, clientId); // never sent: the text goes back to the composer
  showBanner(errorText(f), f.code);
}

function errorText(f) {
  const detail = typeof f.detail === 'string' && f.detail ? f.detail : String(f.code || 'unknown error');
  if (f.code === 'too_large') return `Message too large: ${detail}. Shorten it and send again.`;
  if (SEND_ERRORS.has(f.code)) return `Message not sent: ${detail}.`;
  return `Error: ${detail}.`;
}

// --- rendering -------------------------------------------------------------------------------

function scrollToBottom() {
  el.scroller.scrollTop = el.scroller.scrollHeight;
}

function keepBottom(fn) { // follow new messages only when the reader is at the bottom already
  const s = el.scroller;
  const stick = s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  fn();
  if (stick) scrollToBottom();
}

function renderMessage(m) {
  return render.renderMessage(m, me, ChatChanges.decorate);
}

function renderBody(li, body, text) {
  render.renderBody(li, body, text, me);
}

function decorate(li) {
  render.decorate(el.messages, li);
}

function decorateAll() {
  render.decorateAll(el.messages);
}

function addMessage(state, m, older) {
  if (!m || !Number.isInteger(m.seq) || state.seen.has(m.seq)) return;
  if (!older && m.seq <= state.lastSeq) return; // never a duplicate, never out of order
  state.seen.add(m.seq);
  if (!older && typists.delete(m.author)) renderTyping(); // their message ends their typing
  // Insert in seq order: after the last message with a smaller seq (the newest go after notices).
  const msgs = el.messages.getElementsByClassName('msg');
  let i = msgs.length - 1;
  while (i >= 0 && Number(msgs[i].dataset.seq) > m.seq) i -= 1;
  const li = renderMessage(m);
  const next = msgs[i + 1];
  if (next) {
    el.messages.insertBefore(li, next.previousElementSibling && next.previousElementSibling.classList.contains('day') ? next.previousElementSibling : next);
  } else {
    el.messages.append(li);
  }
  decorate(li);
  if (next) decorate(next);
  if (!older && shown) {
    if (m.author !== me && document.hidden && mentions(m.body, me)) notify(shown, m);
    markRead();
  }
  state.lastSeq = Math.max(state.lastSeq, m.seq);
  state.minSeq = state.minSeq === null ? m.seq : Math.min(state.minSeq, m.seq);
  const acked = state.awaiting.get(m.seq);
  if (acked) {
    acked.remove();
    state.awaiting.delete(m.seq);
  }
  if (m.client_id && m.author === me) {
    const p = takePending(state, m.client_id);
    if (p) p.el.remove();
  }
  if (!older) updateLoadOlder();
}

function addEvent(text) {
  keepBottom(() => el.messages.append(node('li', 'event', text)));
}

// --- composer and history --------------------------------------------------------------------

function sendComposer() {
  const body = el.messageInput.value;
  if (!body.trim() || !current) return;
  const change = ChatChanges.submit(body);
  if (change.handled) { // an edit: sent as its own frame
    el.messageInput.value = '';
    fitComposer();
    return;
  }
  const state = stateOf(current);
  const p = { clientId: newClientId(), room: current, body, retries: 0, el: node('li', 'pending'), replyTo: change.replyTo };
  const meta = node('div', 'meta');
  meta.append(node('span', 'pending-author', me), node('span', 'state', 'sending…'));
  p.el.append(meta, node('div', 'pending-body', body));
  p.el.dataset.clientId = p.clientId;
  state.pending.push(p);
  el.outbox.append(p.el);
  el.messageInput.value = '';
  fitComposer();
  el.banner.hidden = true; // the last error was about an earlier message
  scrollToBottom();
  if (conn && conn.isReady(current)) transmit(conn, p);
}

function fitComposer() { // grow with the text, wrapped lines included, up to the CSS max-height
  const t = el.messageInput;
  if (!t.offsetParent) return; // hidden: nothing to measure
  keepBottom(() => { // the message list gets shorter as the composer grows: keep the newest in view
    t.style.height = 'auto';
    t.style.height = `${t.scrollHeight + t.offsetHeight - t.clientHeight}px`;
  });
}

function updateLoadOlder() {
  const s = current ? roomState.get(current) : null;
  const hide = !s || s.exhausted || s.minSeq === null || s.minSeq <= 1;
  if (hide && document.activeElement === el.loadOlder) el.scroller.focus();
  el.loadOlder.hidden = hide;
  // aria-disabled, not disabled: a disabled button drops the keyboard focus to <body>
  el.loadOlder.setAttribute('aria-disabled', String(!!(s && s.loadingOlder) || !(conn && conn.isReady(current))));
  el.loadOlder.textContent = s && s.loadingOlder ? 'Loading…' : 'Load older messages';
}

function loadOlder() {
  const s = stateOf(current);
  if (!conn || !conn.isReady(current) || s.loadingOlder || s.minSeq === null || s.minSeq <= 1) return;
  if (!conn.send({ type: 'history', room: current, before: s.minSeq, limit: HISTORY_LIMIT })) return;
  s.loadingOlder = true;
  updateLoadOlder();
}

function onHistory(state, f) {
  state.loadingOlder = false;
  const list = Array.isArray(f.messages) ? f.messages : [];
  const s = el.scroller;
  const fromBottom = s.scrollHeight - s.scrollTop; // keep the view where it was
  for (const m of list) addMessage(state, Number.isInteger(f.as_of) ? { ...m, as_of: f.as_of } : m, true);
  decorateAll();
  s.scrollTop = s.scrollHeight - fromBottom;
  // The beginning: never ask again. Not "fewer than asked": the server clamps a page to
  // CHAT_HISTORY_PAGE_MAX (and to a byte budget), so a short page may still have more before it.
  if (f.has_more === false || (f.has_more === undefined && !list.length)) state.exhausted = true;
  updateLoadOlder();
}

// --- notifications, DMs, search ----------------------------------------------------------------

function notify(room, m) {
  if (!('Notification' in window) || Notification.permission !== 'granted') return;
  const entry = entries.get(room);
  try {
    const n = new Notification(`${m.author} in ${entry ? entry.label : room}`, { body: m.body.slice(0, 200), tag: `${room}:${m.seq}` });
    n.onclick = () => { window.focus(); openRoom(room); n.close(); };
  } catch (e) { /* not allowed here */ }
}

function updateNotifyButton() {
  const supported = 'Notification' in window;
  el.notifyEnable.hidden = !supported || Notification.permission !== 'default';
}

async function onDmSubmit(e) {
  e.preventDefault();
  const user = el.dmInput.value.trim();
  if (!user) return;
  const r = await http.openDm(user);
  if (!r.ok || !r.data) {
    showText(el.dmError, `Cannot message ${user}: ${detailOf(r.data, `the server answered ${r.status}`)}.`);
    return;
  }
  showText(el.dmError, '');
  el.dmInput.value = '';
  if (!rooms.includes(r.data.name)) rooms.push(r.data.name);
  if (!entries.has(r.data.name)) entries.set(r.data.name, roomList.fromServer([{ ...r.data, last_seq: 0, read_seq: 0 }])[0]);
  renderRoomList();
  openRoom(r.data.name);
  refreshRooms();
}

async function onSearchSubmit(e) {
  e.preventDefault();
  const q = el.searchInput.value.trim();
  if (!q) return;
  const where = el.searchScope.value === 'all' ? rooms.slice(0, 20) : [current];
  el.searchResults.replaceChildren(node('li', 'search-note', 'Searching…'));
  el.searchResults.hidden = false;
  const found = [];
  for (const room of where) { // one at a time: the server runs a few searches per user at once
    const r = await http.search(room, q);
    if (r.ok && r.data && Array.isArray(r.data.results)) found.push(...r.data.results);
  }
  found.sort((a, b) => b.rank - a.rank || b.seq - a.seq);
  const items = found.slice(0, 30).map((m) => {
    const li = node('li', 'search-hit');
    const btn = node('button', 'search-open');
    btn.type = 'button';
    btn.dataset.room = m.room;
    btn.dataset.seq = String(m.seq);
    const entry = entries.get(m.room);
    btn.append(node('span', 'search-where', `${entry ? entry.label : m.room} · ${m.author}`), node('span', 'search-body', m.body));
    li.append(btn);
    return li;
  });
  el.searchResults.replaceChildren(...(items.length ? items : [node('li', 'search-note', 'Nothing found.')]));
}

// Open a search result: its room, with the messages around it loaded, scrolled to it.
async function openAt(room, seq) {
  openRoom(room);
  const state = stateOf(room);
  const r = await http.around(room, seq);
  if (r.ok && r.data && Array.isArray(r.data.messages) && shown === room) {
    for (const m of r.data.messages) addMessage(state, m, true);
    decorateAll();
    updateLoadOlder();
  }
  const target = el.messages.querySelector(`.msg[data-seq="${seq}"]`);
  if (!target) return;
  for (const old of el.messages.querySelectorAll('.hit')) old.classList.remove('hit');
  target.classList.add('hit');
  target.tabIndex = -1;
  target.scrollIntoView({ block: 'center' });
  target.focus({ preventScroll: true });
  el.searchResults.hidden = true;
}

// --- start -----------------------------------------------------------------------------------

function bind() {
  for (const n of document.querySelectorAll('[id]')) {
    el[n.id.replace(/-([a-z])/g, (_, ch) => ch.toUpperCase())] = n; // 'token-input' -> el.tokenInput
  }
  el.banner = el.errorBanner;
  el.signinForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const token = el.tokenInput.value.trim();
    if (token) signIn(token);
    else showText(el.signinError, 'Enter your access token.');
  });
  el.signout.addEventListener('click', signOut);
  el.roomForm.addEventListener('submit', onRoomSubmit);
  el.roomList.addEventListener('click', (e) => {
    const btn = e.target.closest('button[data-room]');
    if (btn) openRoom(btn.dataset.room);
  });
  el.loadOlder.addEventListener('click', loadOlder);
  el.dmForm.addEventListener('submit', onDmSubmit);
  el.searchForm.addEventListener('submit', onSearchSubmit);
  el.searchResults.addEventListener('click', (e) => {
    const btn = e.target.closest('button[data-seq]');
    if (btn) openAt(btn.dataset.room, Number(btn.dataset.seq));
  });
  el.notifyEnable.addEventListener('click', async () => {
    try { await Notification.requestPermission(); } catch (e) { /* refused */ }
    updateNotifyButton();
  });
  updateNotifyButton();
  el.scroller.addEventListener('scroll', markRead, { passive: true });
  document.addEventListener('visibilitychange', () => { if (!document.hidden) { markRead(); refreshRooms(); } });
  // Signed out in another tab, or the session ended: a reconnect finds out (verifySession).
  el.errorDismiss.addEventListener('click', () => { el.banner.hidden = true; el.messageInput.focus(); });
  el.composer.addEventListener('submit', (e) => { e.preventDefault(); sendComposer(); });
  ChatChanges.install({
    me: () => me,
    send: (frame) => {
      if (!conn || !conn.isReady(current) || !conn.send({ ...frame, room: current })) {
        showBanner('Not connected: try again in a moment.');
        return false;
      }
      return true;
    },
    list: el.messages,
    body: (li, text) => renderBody(li, li.querySelector('.body'), text),
    input: el.messageInput,
    bar: el.composeMode,
  });
  el.messageInput.addEventListener('keydown', (e) => {
    if (ChatChanges.onKey(e)) return;
    if (e.key !== 'Enter' || e.shiftKey || e.isComposing || e.keyCode === 229) return; // Shift+Enter, IME
    e.preventDefault();
    sendComposer();
  });
  el.messageInput.addEventListener('input', () => { fitComposer(); sendTyping(); });
  window.addEventListener('resize', fitComposer);
  window.addEventListener('online', () => { if (me && !conn) { retry.attempt = 0; connect(); } });
  window.addEventListener('offline', () => { if (me && !conn) { clearRetry(); setStatus('offline'); } });
  window.addEventListener('hashchange', () => {
    const token = tokenFromHash();
    if (token) signInFromLink(token);
  });
}

async function boot() {
  bind();
  const token = tokenFromHash();
  if (token) return signInFromLink(token);
  const r = await checkMe();
  if (r.user) startChat(r.user);
  else showSignin(r.error ? `Could not check your session: ${r.error}.` : '');
}

boot();
