// The live-room page (served at `/`, script at `/page.js`): a form to pick a room and a role, then
// the room — live host and viewer counts, the node this tab is on, the host's latest broadcast and
// the room's feed. All networking is `client.js`; this file only renders. Every piece of text from
// the network goes through `textContent`, never HTML.

import { RoomClient, validName, validRoom } from './client.js';

const $ = (id) => document.getElementById(id);
const FEED_LIMIT = 300;

/** Messages shown from the room's history when joining. */
const BACKLOG = 50;
/** The room position of the first welcome: messages up to it are the backlog. */
let backlogUntil = null;
/** @type {RoomClient | null} */
let client = null;

/**
 * A token handed to the page in the URL fragment (`/#token=JWT`, or `?room=…#token=…`): the
 * fragment never reaches a server or its logs. It is kept in memory only and taken off the address
 * bar. With a token, the server decides the role and the name; without one the page joins as
 * before (a node with `--auth jwt` then admits it only as an anonymous viewer, if at all).
 */
const pageToken = (() => {
  const token = new URLSearchParams(location.hash.slice(1)).get('token');
  if (token) history.replaceState(null, '', location.pathname + location.search);
  return token || null;
})();

function prefill() {
  const params = new URLSearchParams(location.search);
  if (params.has('room')) $('room').value = params.get('room');
  if (params.has('name')) $('name').value = params.get('name');
  const role = params.get('role') === 'host' ? 'host' : 'viewer';
  document.querySelector(`input[name="role"][value="${role}"]`).checked = true;
  if (pageToken) {
    $('token-note').hidden = false;
    $('name').disabled = true;
    $('name').placeholder = 'From your token';
    for (const r of document.querySelectorAll('input[name="role"]')) r.disabled = true;
  }
}

function join() {
  const room = $('room').value.trim();
  const role = document.querySelector('input[name="role"]:checked').value;
  const name = $('name').value.trim();
  if (!validRoom(room)) {
    return formError('Room names are 1–128 characters of A–Z, a–z, 0–9 and _ . : -');
  }
  if (name && !validName(name)) {
    return formError('Names are at most 64 bytes, without control characters.');
  }
  formError('');
  const query = new URLSearchParams({ room, role, ...(name ? { name } : {}) });
  history.replaceState(null, '', `?${query}`);

  // The last messages of the room are shown on join; after a reconnect the client resumes and
  // fills in what was missed, so the feed has no gap and no repeat.
  client = new RoomClient({
    url: new URL('./', location.href).href,
    room,
    ...(pageToken ? { role: null, getToken: () => pageToken } : { role, name }),
    backlog: BACKLOG,
    members: true,
  });
  backlogUntil = null;
  client.on('welcome', (w) => {
    if (backlogUntil === null) backlogUntil = { epoch: w.epoch, offset: w.offset };
  });
  client.on('welcome', showIdentity);
  client.on('recovery', () => note('Some messages were missed while disconnected and could not be replayed.', 'warn'));
  client.on('state', onState);
  client.on('presence', (p) => {
    $('hosts').textContent = p.hosts;
    $('viewers').textContent = p.viewers;
    $('stats').classList.remove('stale');
  });
  client.on('members', showMembers);
  client.on('message', onMessage);
  client.on('error', (e) => note(`The server refused that: ${e.message}`, 'bad'));

  $('room-name').textContent = room;
  showIdentity(pageToken ? { role: 'viewer', name: null, user: null } : { role, name: name || null, user: null });
  $('join').hidden = true;
  $('live').hidden = false;
  document.title = `${room} · Live rooms`;
  client.connect();
}

/** Shows the room's member list (rooms that list it; docs/protocol.md, section 12). */
function showMembers(e) {
  $('members-card').hidden = false;
  $('members-note').hidden = e.listing || !e.over_limit;
  const list = $('members');
  list.replaceChildren();
  if (!e.listing) {
    $('members-card').hidden = !e.over_limit;
    $('members-count').textContent = '';
    return;
  }
  $('members-count').textContent = `(${e.members.length})`;
  for (const m of e.members) {
    const li = document.createElement('li');
    li.textContent = `${m.name ?? m.sub} · ${m.role}`;
    list.append(li);
  }
}

/** Shows who the page joined as: role, name and (with a token) the user id it was admitted as. */
function showIdentity(w) {
  $('you-role').textContent = w.role;
  $('you-role').className = `badge ${w.role}`;
  const parts = [];
  if (w.name) parts.push(`as ${w.name}`);
  if (w.user) parts.push(`(user ${w.user})`);
  $('you-name').textContent = parts.join(' ');
  $('you-name').dataset.user = w.user ?? '';
  const host = w.role === 'host';
  $('text').placeholder = host ? 'Broadcast to the room…' : 'Say something…';
  $('send').textContent = host ? 'Broadcast' : 'Send';
}

function leave() {
  client?.close();
  client = null;
  $('feed').replaceChildren();
  $('feed-count').textContent = '';
  $('hosts').textContent = $('viewers').textContent = '–';
  $('stats').classList.add('stale');
  $('stage-text').textContent = 'Waiting for the host to broadcast…';
  $('stage-text').classList.add('empty');
  $('stage-meta').textContent = '';
  setPill('idle', 'Not connected');
  $('node').textContent = '—';
  $('live').hidden = true;
  $('join').hidden = false;
  document.title = 'Live rooms';
}

const CLOSE_TEXT = {
  1000: 'closed',
  1006: 'connection lost',
  1008: 'refused by policy',
  1009: 'message too large',
  1012: 'the node is restarting',
  4000: 'too slow to keep up',
  4001: 'idle for too long',
  4010: 'the token expired',
  4501: 'removed by a moderator',
  4502: 'banned from this room',
  4503: 'the token no longer grants this room',
};

function describeClose(code, reason) {
  return CLOSE_TEXT[code] ?? (reason || `code ${code}`);
}

function onState(s) {
  const open = s.state === 'open';
  $('text').disabled = $('send').disabled = !open;
  document.body.dataset.state = s.state;
  switch (s.state) {
    case 'connecting':
      setPill('connecting', s.previous === 'reconnecting' ? 'Reconnecting…' : 'Connecting…');
      break;
    case 'open':
      setPill('open', 'Live');
      $('node').textContent = s.node;
      document.body.dataset.node = s.node;
      note(s.rejoined ? `Rejoined on node ${s.node}` : `Joined ${client.room} on node ${s.node}`,
        s.rejoined ? 'ok' : '');
      if (document.activeElement === document.body) $('text').focus();
      break;
    case 'reconnecting': {
      setPill('reconnecting', 'Reconnecting…');
      $('node').textContent = '—';
      $('stats').classList.add('stale');
      const wait = `retrying in ${(s.delay / 1000).toFixed(1)} s`;
      if (s.previous === 'open') note(`Disconnected: ${describeClose(s.code, s.reason)} — ${wait}`, 'warn');
      else if (s.attempt % 5 === 0) note(`Still reconnecting (attempt ${s.attempt}) — ${wait}`, 'warn');
      break;
    }
    case 'closed':
      setPill('closed', 'Disconnected');
      $('node').textContent = '—';
      $('stats').classList.add('stale');
      if (client) note(`Disconnected: ${describeClose(s.code, s.reason)}. Leave and join again to retry.`, 'bad');
      break;
  }
}

function setPill(state, text) {
  $('state').dataset.state = state;
  $('state').textContent = text;
}

/** Text of a message's data: a string as is, `{text}` as its text, other JSON as JSON. */
function messageText(data) {
  if (typeof data === 'string') return data;
  if (data && typeof data.text === 'string') return data.text;
  return JSON.stringify(data);
}

function clock(tsMicros) {
  const d = Number.isFinite(tsMicros) ? new Date(tsMicros / 1000) : new Date();
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

function onMessage(m) {
  const text = messageText(m.data);
  const earlier = backlogUntil !== null && m.epoch === backlogUntil.epoch && m.offset <= backlogUntil.offset;
  const who = m.from ?? (m.role === 'server' ? 'Server' : `Anonymous ${m.role}`);
  const li = el('li', `msg ${m.role}`);
  const avatar = el('div', 'avatar', (m.from ?? (m.role === 'server' ? '⚙' : '?')).slice(0, 1).toUpperCase());
  const body = el('div', 'body');
  const head = el('div', 'head');
  head.append(el('span', 'from', who));
  if (m.role !== 'viewer') head.append(el('span', `badge ${m.role}`, m.role));
  const time = el('time', '', clock(m.ts));
  time.dateTime = new Date(m.ts / 1000).toISOString();
  head.append(time);
  body.append(head, el('p', 'text', text));
  li.append(avatar, body);
  li.dataset.role = m.role;
  if (earlier) li.classList.add('backlog');
  append(li);
  if (m.role === 'host') {
    $('stage-text').textContent = text;
    $('stage-text').classList.remove('empty');
    $('stage-meta').textContent = `${who} · ${clock(m.ts)}`;
  }
}

function note(text, kind = '') {
  append(el('li', `note ${kind}`.trim(), text));
}

function append(li) {
  const feed = $('feed');
  const atBottom = feed.scrollHeight - feed.scrollTop - feed.clientHeight < 60;
  feed.append(li);
  while (feed.children.length > FEED_LIMIT) feed.firstElementChild.remove();
  const messages = feed.querySelectorAll('.msg').length;
  $('feed-count').textContent = messages ? `${messages} message${messages === 1 ? '' : 's'}` : '';
  if (atBottom) feed.scrollTop = feed.scrollHeight;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function formError(text) {
  $('join-error').textContent = text;
  $('join-error').hidden = !text;
}

$('join-form').addEventListener('submit', (e) => {
  e.preventDefault();
  join();
});
$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('text').value.trim();
  if (!text || !client) return;
  if (client.publish(text)) $('text').value = '';
  else note('Not connected: your message was not sent.', 'warn');
});
$('leave').addEventListener('click', leave);
prefill();
