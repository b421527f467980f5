// The connection: ONE /socket for all the rooms the page follows (README "One socket for many
// rooms"). It subscribes to the rooms it is asked to hold (at most the server's
// CHAT_SOCKET_ROOMS_MAX), resumes each room after a reconnect from the last seq the page holds
// for it, and hands every frame to the page. Reconnecting is the page's decision (chat.js).
// The pure parts (which rooms, which frames) are exported for tests/js/connection.test.mjs.

// The rooms to hold on the socket: the shown room first, then the room list's order (most
// recently active first), at most `max`. The rest are not followed live: their badges come from
// the server's room list (at load, at each reconnect, and when the list changes).
export function wanted(order, current, max) {
  const out = [];
  if (current) out.push(current);
  for (const name of order) {
    if (out.length >= max) break;
    if (!out.includes(name)) out.push(name);
  }
  return out.slice(0, Math.max(0, max));
}

// A subscribe resuming at `after` (the last seq the page holds; none: the server's recent history).
export function subscribeFrame(room, after) {
  const frame = { type: 'subscribe', room };
  if (Number.isInteger(after) && after > 0) frame.after = after;
  return frame;
}

// From the rooms held (name -> 'subscribing' | 'ready' | 'leaving') to the rooms wanted.
export function plan(held, want) {
  const subscribe = want.filter((room) => !held.has(room));
  const unsubscribe = [...held.keys()].filter((room) => !want.includes(room) && held.get(room) !== 'leaving');
  return { subscribe, unsubscribe };
}

// Errors that end (or refuse) a room's subscription on this socket: the room is no longer held.
const ENDS_ROOM = new Set(['removed', 'no_such_room', 'forbidden', 'invalid_room', 'too_many_rooms',
  'too_many_rooms_created', 'unavailable']);

// What a frame from the server does to the rooms held (a new Map, or the same one).
export function track(held, f) {
  if (!f || typeof f.room !== 'string' || !held.has(f.room)) return held;
  let next = null;
  if ((f.type === 'ready' || (f.type === 'error' && f.code === 'already_subscribed'))
      && held.get(f.room) === 'subscribing') next = 'ready';
  else if (f.type === 'unsubscribed') next = null;
  else if (f.type === 'error' && ENDS_ROOM.has(f.code) && typeof f.client_id !== 'string'
           && (held.get(f.room) === 'subscribing' || f.code === 'removed')) next = null;
  else return held;
  const out = new Map(held);
  if (next === null) out.delete(f.room);
  else out.set(f.room, next);
  return out;
}

export class Connection {
  // url: the /socket URL; seqOf(room): the last seq the page holds for a room (to resume from);
  // onFrame(frame), onOpen(), onClose(event): the page's handlers.
  constructor({ url, seqOf, onFrame, onOpen, onClose }) {
    Object.assign(this, { url, seqOf, onFrame, onOpen, onClose });
    this.held = new Map();
    this.want = [];
    this.opened = false;
    this.inflight = []; // client_ids of sends not answered yet
    this.lastHeard = Date.now();
    this.ws = new WebSocket(url);
    this.ws.onopen = () => { this.opened = true; this.onOpen(); this.apply(); };
    this.ws.onmessage = (ev) => this.receive(ev.data);
    this.ws.onclose = (ev) => { this.held = new Map(); this.onClose(ev); };
  }

  receive(data) {
    this.lastHeard = Date.now();
    let f;
    try { f = JSON.parse(data); } catch (e) { return; }
    if (!f || typeof f !== 'object') return;
    const before = this.held.get(f.room);
    this.held = track(this.held, f);
    this.onFrame(f);
    // An unsubscribe answered: a room still wanted (refresh) is subscribed again, from its seq.
    if (before === 'leaving' && f.type === 'unsubscribed') this.apply();
  }

  send(frame) {
    if (!this.opened || this.ws.readyState !== WebSocket.OPEN) return false;
    try { this.ws.send(JSON.stringify(frame)); } catch (e) { return false; }
    return true;
  }

  isReady(room) { return this.held.get(room) === 'ready'; }

  // Hold exactly these rooms (in this order of priority).
  hold(rooms) {
    this.want = rooms.slice();
    this.apply();
  }

  // Subscribe to a held room again (the page shows it now and wants its replay and presence).
  refresh(room) {
    if (this.held.get(room) === 'subscribing' || this.held.get(room) === 'leaving') return;
    if (this.held.has(room) && this.send({ type: 'unsubscribe', room })) this.held.set(room, 'leaving');
    else this.apply();
  }

  apply() {
    if (!this.opened) return;
    const { subscribe, unsubscribe } = plan(this.held, this.want);
    for (const room of unsubscribe) if (this.send({ type: 'unsubscribe', room })) this.held.set(room, 'leaving');
    for (const room of subscribe) if (this.send(subscribeFrame(room, this.seqOf(room)))) this.held.set(room, 'subscribing');
  }

  close() {
    const ws = this.ws;
    ws.onopen = ws.onmessage = ws.onclose = null;
    this.held = new Map();
    try { ws.close(1000); } catch (e) { /* already closed */ }
  }
}
