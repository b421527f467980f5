// The HTTP API client: same-origin fetches with the session cookie; answers as {ok, status, data}.

export async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = null;
  try { data = await res.json(); } catch (e) { /* 204, or not JSON */ }
  return { ok: res.ok, status: res.status, data };
}

export const myRooms = () => api('GET', '/api/me/rooms');
export const openDm = (user) => api('POST', '/api/dms', { user });
export const search = (room, q) => api('GET', `/api/rooms/${encodeURIComponent(room)}/search?q=${encodeURIComponent(q)}&limit=20`);
export const around = (room, seq) => api('GET', `/api/rooms/${encodeURIComponent(room)}/messages?before=${seq + 26}&limit=50`);
