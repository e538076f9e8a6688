// Unit tests of the browser client's logic (gateway/assets/client.js) with node's built-in test
// runner and a fake WebSocket: no network, no browser, no npm packages. Timers and Date are mocked.

import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it, mock } from 'node:test';

import {
  backoffDelay,
  CloseCode,
  RoomClient,
  roomUrl,
  shouldReconnect,
  tokenExpiry,
  validName,
  validRoom,
} from '../../gateway/assets/client.js';

/** A WebSocket the test drives by hand; every instance is recorded in `FakeSocket.all`. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }
  send(text) {
    assert.equal(this.readyState, 1, 'send on an open socket only');
    this.sent.push(text);
  }
  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 2;
  }
  // Test side.
  serverOpen() {
    this.readyState = 1;
    this.onopen?.({});
  }
  serverSend(event) {
    this.onmessage?.({ data: typeof event === 'string' ? event : JSON.stringify(event) });
  }
  welcome(node = 'n1') {
    this.serverOpen();
    this.serverSend({ type: 'welcome', node, room: 'r', role: 'viewer', connection_id: `${node}-1`, name: null });
  }
  serverClose(code, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
}

function latest() {
  return FakeSocket.all[FakeSocket.all.length - 1];
}

function client(extra = {}) {
  const c = new RoomClient({ url: 'ws://lb.test', room: 'r', WebSocket: FakeSocket, ...extra });
  const states = [];
  c.on('state', (s) => states.push(s));
  return { c, states };
}

describe('close-code policy', () => {
  it('reconnects after drops, drains and the 4000-4499 range', () => {
    for (const code of [1001, 1005, 1006, 1011, 1012, 1013, 1014, 4000, 4001, 4499, 3000]) {
      assert.equal(shouldReconnect(code), true, `${code}`);
    }
  });
  it('stops on deliberate closes, client faults, policy and the 4500-4999 range', () => {
    for (const code of [1000, 1002, 1003, 1007, 1008, 1009, 1010, 4500, 4999]) {
      assert.equal(shouldReconnect(code), false, `${code}`);
    }
  });
  it('names the gateway codes', () => {
    assert.equal(CloseCode.SERVER_RESTART, 1012);
    assert.equal(CloseCode.SLOW_CONSUMER, 4000);
    assert.equal(CloseCode.TOKEN_EXPIRED, 4010);
    assert.equal(shouldReconnect(CloseCode.TOKEN_EXPIRED), true, 'get a new token, then reconnect');
    for (const code of [CloseCode.KICKED, CloseCode.BANNED, CloseCode.FORBIDDEN]) {
      assert.equal(shouldReconnect(code), false, `${code}`);
    }
  });
});

describe('backoff', () => {
  it('is full jitter under an exponential ceiling', () => {
    const top = () => 0.999999;
    assert.equal(backoffDelay(0, {}, () => 0), 0);
    assert.equal(backoffDelay(0, {}, top), 499);
    assert.equal(backoffDelay(1, {}, top), 999);
    assert.equal(backoffDelay(3, {}, top), 3999);
    assert.equal(backoffDelay(0, {}, () => 0.5), 250);
  });
  it('is capped by maxDelay, also for huge attempts', () => {
    const top = () => 0.999999;
    assert.equal(backoffDelay(10, {}, top), 29_999);
    assert.equal(backoffDelay(5000, {}, top), 29_999);
    assert.equal(backoffDelay(4, { initialDelay: 100, maxDelay: 1000 }, top), 999);
  });
  it('spreads delays over the whole range', () => {
    const delays = Array.from({ length: 2000 }, () => backoffDelay(2, {}));
    assert.ok(Math.min(...delays) < 200);
    assert.ok(Math.max(...delays) > 1800);
    assert.ok(delays.every((d) => d >= 0 && d < 2000));
  });
});

describe('names and URLs', () => {
  it('validates rooms and names like the server', () => {
    assert.ok(validRoom('Room_1.2:3-x'));
    assert.ok(validRoom('x'.repeat(128)));
    for (const bad of ['', 'a b', 'ä', 'a/b', 'x'.repeat(129), undefined]) assert.ok(!validRoom(bad), bad);
    assert.ok(validName('Zoë B'));
    assert.ok(validName('é'.repeat(32)));
    assert.ok(!validName('é'.repeat(33)), '66 bytes');
    assert.ok(!validName('a\nb'));
    assert.ok(!validName('a\u0085b'));
    assert.ok(!validName(''));
  });
  it('builds room URLs from ws and http bases, keeping prefixes and parameters', () => {
    assert.equal(roomUrl('ws://h:1', 'demo'), 'ws://h:1/ws/demo');
    assert.equal(roomUrl('https://example.com/live/', 'a:b', { role: 'host', name: 'Zoë B' }),
      'wss://example.com/live/ws/a:b?role=host&name=Zo%C3%AB+B');
    assert.equal(roomUrl('http://h/?token=t#x', 'r', { role: 'viewer' }), 'ws://h/ws/r?token=t&role=viewer');
    assert.throws(() => roomUrl('ftp://h', 'r'), TypeError);
    assert.throws(() => roomUrl('ws://h', 'bad room'), TypeError);
  });
  it('refuses bad options up front', () => {
    const base = { url: 'ws://h', room: 'r', WebSocket: FakeSocket };
    assert.throws(() => new RoomClient({ ...base, room: 'a/b' }), TypeError);
    assert.throws(() => new RoomClient({ ...base, role: 'server' }), TypeError);
    assert.throws(() => new RoomClient({ ...base, name: 'x'.repeat(65) }), TypeError);
    assert.throws(() => new RoomClient({ ...base, url: undefined }), /url is required/);
    assert.throws(() => new RoomClient({ ...base, url: 'mailto:x' }), TypeError);
  });
});

describe('RoomClient', () => {
  beforeEach(() => {
    FakeSocket.all = [];
    mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'] });
    mock.method(Math, 'random', () => 0.5);
  });
  afterEach(() => {
    mock.timers.reset();
    mock.restoreAll();
  });

  it('joins with its role and name, and is open only after the welcome', () => {
    const { c, states } = client({ role: 'host', name: 'Ann' });
    const events = [];
    c.on('welcome', (w) => events.push(['welcome', w.node]));
    c.on('presence', (p) => events.push(['presence', p.hosts, p.viewers]));
    c.on('message', (m) => events.push(['message', m.data]));
    c.on('error', (e) => events.push(['error', e.code]));
    c.on('pong', () => events.push(['pong']));
    assert.equal(c.state, 'idle');
    c.connect();
    assert.equal(latest().url, 'ws://lb.test/ws/r?role=host&name=Ann');
    assert.equal(c.state, 'connecting');
    latest().serverOpen();
    assert.equal(c.publish('early'), false, 'not joined yet');
    latest().welcome('n7');
    assert.equal(c.state, 'open');
    assert.equal(c.node, 'n7');
    latest().serverSend({ type: 'presence', room: 'r', hosts: 1, viewers: 3 });
    latest().serverSend({ type: 'message', room: 'r', from: 'Ann', role: 'host', data: { text: 'hi' }, id: 'x', ts: 1 });
    latest().serverSend({ type: 'error', code: 'rate_limited', message: 'slow down' });
    latest().serverSend('not json');
    latest().serverSend({ type: 'pong', ts: 2 });
    assert.deepEqual(events, [
      ['welcome', 'n7'], ['presence', 1, 3], ['message', { text: 'hi' }], ['error', 'rate_limited'], ['pong'],
    ]);
    assert.deepEqual(states.map((s) => s.state), ['connecting', 'open']);
    assert.equal(states[1].rejoined, false);
  });

  it('keeps the member list: paged read, diffs during the read, versions, reset and the bound', () => {
    const { c } = client({ members: true });
    const seen = [];
    c.on('members', (e) => seen.push(e));
    c.connect();
    latest().welcome();
    assert.deepEqual(latest().sent, ['{"type":"members"}']);
    latest().serverSend({ type: 'members', room: 'r', v: 4, members: [{ sub: 'a', name: 'Ann', role: 'host' }], cursor: '7' });
    assert.deepEqual(latest().sent.slice(1), ['{"type":"members","cursor":"7"}'], 'follows the cursor');
    // Diffs that arrive during the read wait for it; one the pages already include is skipped.
    latest().serverSend({ type: 'members_diff', room: 'r', v: 4, joined: [{ sub: 'old', role: 'viewer' }] });
    latest().serverSend({ type: 'members_diff', room: 'r', v: 5, joined: [{ sub: 'c', role: 'viewer' }], left: [{ sub: 'a', reason: 'client_closed' }] });
    assert.equal(seen.length, 0, 'nothing before the read ends');
    latest().serverSend({ type: 'members', room: 'r', v: 5, members: [{ sub: 'b', role: 'viewer' }], cursor: null });
    assert.deepEqual(c.members.map((m) => m.sub), ['b', 'c']);
    assert.equal(seen.length, 2);
    assert.deepEqual(seen[0].members.map((m) => m.sub), ['a', 'b']);
    assert.deepEqual(seen[1].left, [{ sub: 'a', reason: 'client_closed' }]);
    // An old diff changes nothing; a newer one applies.
    latest().serverSend({ type: 'members_diff', room: 'r', v: 5, left: [{ sub: 'b', reason: 'kicked' }] });
    latest().serverSend({ type: 'members_diff', room: 'r', v: 6, left: [{ sub: 'c', reason: 'node_lost' }] });
    assert.deepEqual(c.members.map((m) => m.sub), ['b']);
    // Reset: read again from the first page.
    latest().serverSend({ type: 'members_diff', room: 'r', v: 9, reset: true });
    assert.equal(latest().sent[latest().sent.length - 1], '{"type":"members"}');
    latest().serverSend({ type: 'members', room: 'r', v: 9, members: [{ sub: 'z', role: 'viewer' }], cursor: null });
    assert.deepEqual(c.members.map((m) => m.sub), ['z']);
    // Over the bound: not listing.
    latest().serverSend({ type: 'members_diff', room: 'r', v: 10, over_limit: true });
    assert.deepEqual(seen[seen.length - 1], { listing: false, over_limit: true });
  });

  it('publishes JSON commands, text included', () => {
    const { c } = client();
    c.connect();
    latest().welcome();
    assert.equal(c.publish('42'), true);
    assert.equal(c.publish({ a: [1, null] }), true);
    assert.equal(c.publish(null), true);
    assert.equal(c.ping(), true);
    assert.throws(() => c.publish(undefined), TypeError);
    assert.deepEqual(latest().sent, [
      '{"type":"publish","data":"42"}',
      '{"type":"publish","data":{"a":[1,null]}}',
      '{"type":"publish","data":null}',
      '{"type":"ping"}',
    ]);
  });

  it('reconnects after a drain (1012) and rejoins its room', () => {
    const { c, states } = client({ name: 'Vic' });
    const welcomes = [];
    c.on('welcome', (w) => welcomes.push(w.node));
    c.connect();
    latest().welcome('n1');
    latest().serverClose(1012, 'service restart');
    assert.equal(c.state, 'reconnecting');
    const r = states.at(-1);
    assert.deepEqual([r.code, r.reason, r.delay, r.attempt], [1012, 'service restart', 250, 1]);
    assert.equal(c.publish('lost'), false, 'nothing is queued while reconnecting');
    mock.timers.tick(249);
    assert.equal(FakeSocket.all.length, 1);
    mock.timers.tick(1);
    assert.equal(FakeSocket.all.length, 2);
    assert.equal(latest().url, 'ws://lb.test/ws/r?role=viewer&name=Vic', 'same room, role and name');
    latest().welcome('n2');
    assert.equal(c.state, 'open');
    assert.equal(c.node, 'n2');
    assert.equal(states.at(-1).rejoined, true);
    assert.deepEqual(welcomes, ['n1', 'n2']);
  });

  it('backs off exponentially while attempts fail, and resets after a welcome', () => {
    const { c, states } = client();
    c.connect();
    latest().welcome();
    const delays = [];
    for (let i = 0; i < 5; i++) {
      latest().serverClose(1006);
      delays.push(states.at(-1).delay);
      mock.timers.tick(states.at(-1).delay);
    }
    assert.deepEqual(delays, [250, 500, 1000, 2000, 4000]);
    latest().welcome();
    latest().serverClose(4000, 'slow consumer');
    assert.equal(states.at(-1).delay, 250, 'a welcome resets the backoff');
  });

  it('stops on codes that mean do not retry', () => {
    for (const code of [1008, 1009, 4500, 1000]) {
      FakeSocket.all = [];
      const { c, states } = client();
      c.connect();
      latest().welcome();
      latest().serverClose(code, 'x');
      assert.equal(c.state, 'closed', `${code}`);
      assert.equal(states.at(-1).code, code);
      mock.timers.tick(60_000);
      assert.equal(FakeSocket.all.length, 1, `no new socket after ${code}`);
    }
  });

  it('does not reconnect when told not to', () => {
    const { c } = client({ reconnect: false });
    c.connect();
    latest().welcome();
    latest().serverClose(1012);
    assert.equal(c.state, 'closed');
  });

  it('tries the next URL of a list after a failure', () => {
    const { c } = client({ url: ['ws://a', 'http://b/'] });
    c.connect();
    assert.equal(new URL(latest().url).host, 'a');
    latest().serverClose(1006);
    mock.timers.tick(30_000);
    assert.equal(latest().url, 'ws://b/ws/r?role=viewer');
    latest().serverClose(1006);
    mock.timers.tick(30_000);
    assert.equal(new URL(latest().url).host, 'a');
  });

  it('gives up on a connection without a welcome after connectTimeout', () => {
    const { c, states } = client({ connectTimeout: 3000 });
    c.connect();
    const first = latest();
    first.serverOpen();
    mock.timers.tick(3000);
    assert.equal(c.state, 'reconnecting');
    assert.equal(states.at(-1).reason, 'connect timeout');
    assert.ok(first.closedWith, 'the stuck socket is closed');
    first.serverClose(1006);
    assert.equal(c.state, 'reconnecting', 'the old socket no longer counts');
  });

  it('pings a silent server and replaces a dead connection', () => {
    const { c, states } = client({ pingInterval: 1000, pongTimeout: 500 });
    c.connect();
    const ws = latest();
    ws.welcome();
    mock.timers.tick(1000);
    assert.deepEqual(ws.sent, ['{"type":"ping"}']);
    ws.serverSend({ type: 'pong', ts: 1 });
    mock.timers.tick(1000);
    assert.equal(ws.sent.length, 2, 'pings again after the next silence');
    mock.timers.tick(500);
    assert.equal(c.state, 'reconnecting');
    assert.deepEqual([states.at(-1).code, states.at(-1).reason], [1006, 'heartbeat timeout']);
    assert.ok(ws.closedWith);
  });

  it('stays quiet while the server talks', () => {
    const { c } = client({ pingInterval: 1000, pongTimeout: 500 });
    c.connect();
    const ws = latest();
    ws.welcome();
    for (let i = 0; i < 20; i++) {
      mock.timers.tick(400);
      ws.serverSend({ type: 'presence', room: 'r', hosts: 0, viewers: 1 });
    }
    assert.deepEqual(ws.sent, []);
    assert.equal(c.state, 'open');
  });

  it('closes for good on close(), and can connect again', () => {
    const { c, states } = client();
    c.connect();
    const ws = latest();
    ws.welcome();
    c.close();
    assert.deepEqual(ws.closedWith, { code: 1000, reason: '' });
    assert.equal(c.state, 'closed');
    ws.serverClose(1000);
    mock.timers.tick(60_000);
    assert.equal(FakeSocket.all.length, 1);
    c.connect();
    assert.equal(FakeSocket.all.length, 2);
    assert.deepEqual(states.map((s) => s.state), ['connecting', 'open', 'closed', 'connecting']);
  });

  it('cancels a pending reconnect on close()', () => {
    const { c } = client();
    c.connect();
    latest().serverClose(1006);
    c.close();
    mock.timers.tick(60_000);
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(c.state, 'closed');
  });

  it('survives a throwing listener', () => {
    const reported = [];
    const had = Object.hasOwn(globalThis, 'reportError');
    const saved = globalThis.reportError;
    globalThis.reportError = (e) => reported.push(e.message);
    try {
      const { c } = client();
      c.on('welcome', () => {
        throw new Error('listener bug');
      });
      const off = c.on('welcome', () => reported.push('second listener ran'));
      c.connect();
      latest().welcome();
      assert.equal(c.state, 'open');
      assert.deepEqual(reported, ['listener bug', 'second listener ran']);
      off();
      latest().welcome();
      assert.deepEqual(reported, ['listener bug', 'second listener ran', 'listener bug']);
    } finally {
      if (had) globalThis.reportError = saved;
      else delete globalThis.reportError;
    }
  });
});

/** An unsigned JWT-shaped token with `exp` (the client never verifies; it only reads `exp`). */
function fakeToken(exp, sub = 'u1') {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, exp, rooms: [{ room: 'r', role: 'viewer' }] })}.sig`;
}

/** Lets pending promise callbacks (getToken) run. */
async function settle() {
  for (let i = 0; i < 5; i += 1) await Promise.resolve();
}

describe('RoomClient with tokens', () => {
  beforeEach(() => {
    FakeSocket.all = [];
    mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'], now: 1_000_000_000_000 });
    mock.method(Math, 'random', () => 0.5);
  });
  afterEach(() => {
    mock.timers.reset();
    mock.restoreAll();
  });

  it('reads exp from a token', () => {
    assert.equal(tokenExpiry(fakeToken(1234)), 1234);
    assert.equal(tokenExpiry('not a token'), null);
    assert.equal(tokenExpiry(fakeToken(undefined)), null);
  });

  it('sends the token of getToken() as the token query parameter on every connection', async () => {
    let calls = 0;
    const { c, states } = client({ getToken: async () => fakeToken(2_000_000_000, `u${(calls += 1)}`) });
    c.connect();
    assert.equal(FakeSocket.all.length, 0, 'waits for the token');
    await settle();
    const first = new URL(latest().url);
    assert.equal(tokenExpiry(first.searchParams.get('token')), 2_000_000_000);
    latest().serverOpen();
    latest().serverSend({ type: 'welcome', node: 'n1', room: 'r', role: 'viewer', connection_id: 'c', name: 'Ann', user: 'u1' });
    assert.equal(c.user, 'u1');
    assert.ok(!states.some((s) => String(s.url).includes('token=')), 'state events never carry the token');
    assert.deepEqual(states.map((s) => s.state), ['connecting', 'open']);
    latest().serverClose(1012);
    mock.timers.tick(1000);
    await settle();
    assert.equal(FakeSocket.all.length, 2);
    assert.equal(calls, 2, 'a fresh token for the new connection');
  });

  it('refreshes on the server\'s expiring event and on its own timer before exp', async () => {
    const now = Date.now() / 1000;
    let exp = now + 300;
    const { c } = client({ getToken: () => fakeToken((exp += 300)), pingInterval: 0 });
    const refreshed = [];
    c.on('refreshed', (e) => refreshed.push(e.exp));
    c.connect();
    await settle();
    latest().welcome();
    // The server's warning.
    latest().serverSend({ type: 'expiring', exp: now + 600 });
    await settle();
    const sent = JSON.parse(latest().sent.at(-1));
    assert.equal(sent.type, 'refresh');
    assert.equal(tokenExpiry(sent.token), now + 900);
    latest().serverSend({ type: 'refreshed', exp: now + 900 });
    assert.deepEqual(refreshed, [now + 900]);
    // Its own timer: refreshBefore (60 s) before the new exp, without any server event.
    const refreshes = () => latest().sent.filter((t) => JSON.parse(t).type === 'refresh');
    mock.timers.tick((900 - 60) * 1000 - 10);
    await settle();
    assert.equal(refreshes().length, 1);
    mock.timers.tick(20);
    await settle();
    assert.equal(refreshes().length, 2, 'refreshed 60 s before exp');
    assert.equal(tokenExpiry(JSON.parse(refreshes()[1]).token), now + 1200);
    assert.equal(FakeSocket.all.length, 1, 'on the same connection');
    c.close();
  });

  it('does not resend a token that extends nothing', async () => {
    const token = fakeToken(Date.now() / 1000 + 300);
    const { c } = client({ getToken: () => token, pingInterval: 0 });
    c.connect();
    await settle();
    latest().welcome();
    latest().serverSend({ type: 'expiring', exp: Date.now() / 1000 + 300 });
    await settle();
    mock.timers.tick(299_000);
    await settle();
    assert.deepEqual(latest().sent, [], 'the same token is not sent again');
    c.close();
  });

  it('gets a new token after 4010 and reconnects, but stays away after a kick or a ban', async () => {
    let calls = 0;
    const { c } = client({ getToken: () => fakeToken(2_000_000_000, `t${(calls += 1)}`) });
    c.connect();
    await settle();
    latest().welcome();
    latest().serverClose(CloseCode.TOKEN_EXPIRED, 'token expired');
    assert.equal(c.state, 'reconnecting');
    mock.timers.tick(1000);
    await settle();
    assert.equal(calls, 2);
    assert.equal(FakeSocket.all.length, 2);
    latest().welcome();
    for (const code of [CloseCode.KICKED, CloseCode.BANNED, CloseCode.FORBIDDEN]) {
      const sockets = FakeSocket.all.length;
      latest().serverClose(code, 'moderated');
      assert.equal(c.state, 'closed', `${code}`);
      mock.timers.tick(60_000);
      await settle();
      assert.equal(FakeSocket.all.length, sockets, `no reconnect after ${code}`);
      c.connect();
      await settle();
      latest().welcome();
    }
  });

  it('retries with backoff when getToken fails, and drops a token that arrives after close()', async () => {
    let fail = true;
    const errors = [];
    const { c, states } = client({
      getToken: () => (fail ? Promise.reject(new Error('backend down')) : fakeToken(2_000_000_000)),
    });
    c.on('error', (e) => errors.push(e.code));
    c.connect();
    await settle();
    assert.equal(c.state, 'reconnecting');
    assert.match(states.at(-1).reason, /backend down/);
    fail = false;
    mock.timers.tick(1000);
    await settle();
    assert.equal(FakeSocket.all.length, 1);
    latest().welcome();
    assert.equal(c.state, 'open');
    // A refresh whose getToken fails reports it; the connection stays.
    fail = true;
    latest().serverSend({ type: 'expiring', exp: 2_000_000_000 });
    await settle();
    assert.deepEqual(errors, ['refresh_failed']);
    assert.equal(c.state, 'open');
    // close() while a token is on its way: nothing opens.
    fail = false;
    c.close();
    c.connect();
    c.close();
    await settle();
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(c.state, 'closed');
  });
});

describe('resume (continuity)', () => {
  beforeEach(() => {
    FakeSocket.all = [];
    mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'] });
    mock.method(Math, 'random', () => 0.5);
  });
  afterEach(() => {
    mock.timers.reset();
    mock.restoreAll();
  });

  const msg = (offset, epoch = 'E1') => ({ type: 'message', room: 'r', from: null, role: 'host', data: offset, id: `m${offset}`, ts: 1, offset, epoch });
  const welcome = (extra) => ({ type: 'welcome', node: 'n1', room: 'r', role: 'viewer', connection_id: 'c', name: null, ...extra });

  it('asks for a backlog on the first join only, then resumes with since on every reconnect', () => {
    const { c } = client({ backlog: 20 });
    const got = [];
    c.on('message', (m) => got.push(m.offset));
    c.connect();
    assert.equal(latest().url, 'ws://lb.test/ws/r?role=viewer&backlog=20');
    latest().serverOpen();
    latest().serverSend(welcome({ epoch: 'E1', offset: 5 }));
    for (const o of [4, 5, 6, 7]) latest().serverSend(msg(o)); // backlog 4, 5, then live 6, 7
    assert.deepEqual(c.position, { epoch: 'E1', offset: 7 });
    latest().serverClose(1012, 'drain');
    mock.timers.tick(1000);
    assert.equal(latest().url, 'ws://lb.test/ws/r?role=viewer&since=E1%3A7');
    latest().serverOpen();
    latest().serverSend(welcome({ epoch: 'E1', offset: 9, recovered: true }));
    for (const o of [7, 8, 9, 10]) latest().serverSend(msg(o)); // 7 again is dropped
    assert.deepEqual(got, [4, 5, 6, 7, 8, 9, 10]);
    assert.deepEqual(c.position, { epoch: 'E1', offset: 10 });
  });

  it('emits recovery when the server could not replay everything, and starts over from the welcome', () => {
    const { c } = client();
    const recoveries = [];
    c.on('recovery', (r) => recoveries.push(r));
    c.connect();
    latest().welcome();
    latest().serverSend(msg(1));
    latest().serverClose(1006);
    mock.timers.tick(1000);
    assert.match(latest().url, /since=E1%3A1$/);
    latest().serverOpen();
    latest().serverSend(welcome({ epoch: 'E2', offset: 3, recovered: false }));
    assert.deepEqual(recoveries, [{ recovered: false, reason: 'not_recovered', epoch: 'E2', offset: 3 }]);
    assert.deepEqual(c.position, { epoch: 'E2', offset: 3 });
    latest().serverSend(msg(4, 'E2'));
    assert.deepEqual(c.position, { epoch: 'E2', offset: 4 });
  });

  it('resumes at once on a gap in offsets, and reports an epoch change while connected', () => {
    const { c } = client();
    const got = [];
    const recoveries = [];
    c.on('message', (m) => got.push(`${m.epoch}:${m.offset}`));
    c.on('recovery', (r) => recoveries.push(r.reason));
    c.connect();
    latest().serverOpen();
    latest().serverSend(welcome({ epoch: 'E1', offset: 2 }));
    latest().serverSend(msg(3));
    const first = latest();
    first.serverSend(msg(6)); // 4 and 5 never reached this node
    assert.equal(FakeSocket.all.length, 2, 'a new connection at once, no backoff');
    assert.deepEqual(first.closedWith, { code: 1000, reason: 'resync' });
    assert.match(latest().url, /since=E1%3A3$/);
    latest().serverOpen();
    latest().serverSend(welcome({ epoch: 'E1', offset: 6, recovered: true }));
    for (const o of [4, 5, 6]) latest().serverSend(msg(o));
    latest().serverSend(msg(1, 'E9')); // Redis lost the room's history meanwhile
    latest().serverSend({ type: 'message', room: 'r', from: null, role: 'server', data: 'plain', id: 'p', ts: 1 });
    assert.deepEqual(got, ['E1:3', 'E1:4', 'E1:5', 'E1:6', 'E9:1', 'undefined:undefined']);
    assert.deepEqual(recoveries, ['epoch']);
  });

  it('resumes from a saved position and publishes with idempotency keys', () => {
    const { c } = client({ since: { epoch: 'E5', offset: 40 } });
    const acks = [];
    c.on('ack', (a) => acks.push(a));
    c.connect();
    assert.match(latest().url, /since=E5%3A40$/);
    latest().serverOpen();
    latest().serverSend(welcome({ epoch: 'E5', offset: 40, recovered: true }));
    assert.equal(c.publish({ bid: 3 }, { key: 'bid-1' }), true);
    assert.equal(latest().sent.at(-1), '{"type":"publish","data":{"bid":3},"key":"bid-1"}');
    assert.throws(() => c.publish(1, { key: '' }), TypeError);
    assert.throws(() => c.publish(1, { key: 'x'.repeat(129) }), TypeError);
    latest().serverSend({ type: 'ack', key: 'bid-1', offset: 41, epoch: 'E5', id: 'i', duplicate: false });
    assert.deepEqual(acks.map((a) => [a.key, a.offset]), [['bid-1', 41]]);
  });
});

describe('tokens and resume together', () => {
  beforeEach(() => {
    FakeSocket.all = [];
    mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'], now: 1_000_000_000_000 });
    mock.method(Math, 'random', () => 0.5);
  });
  afterEach(() => {
    mock.timers.reset();
    mock.restoreAll();
  });

  const msg = (offset, epoch = 'E1') => ({ type: 'message', room: 'r', from: null, role: 'host', data: offset, id: `m${offset}`, ts: 1, offset, epoch });
  const welcome = (extra) => ({ type: 'welcome', node: 'n1', room: 'r', role: 'viewer', connection_id: 'c', name: null, user: 'u1', ...extra });

  it('puts the token and the backlog or since in every URL; a 4010 resumes with a fresh token', async () => {
    let calls = 0;
    const { c, states } = client({ backlog: 10, getToken: async () => fakeToken(2_000_000_000, `u${(calls += 1)}`) });
    const got = [];
    c.on('message', (m) => got.push(m.offset));
    c.connect();
    await settle();
    let url = new URL(latest().url);
    assert.equal(url.searchParams.get('backlog'), '10');
    assert.equal(url.searchParams.get('since'), null);
    assert.equal(tokenExpiry(url.searchParams.get('token')), 2_000_000_000);
    latest().serverOpen();
    latest().serverSend(welcome({ epoch: 'E1', offset: 2 }));
    for (const o of [1, 2, 3]) latest().serverSend(msg(o));
    latest().serverClose(CloseCode.TOKEN_EXPIRED, 'token expired');
    assert.equal(c.state, 'reconnecting');
    mock.timers.tick(1000);
    await settle();
    assert.equal(calls, 2, 'a fresh token for the new connection');
    url = new URL(latest().url);
    assert.equal(url.searchParams.get('since'), 'E1:3');
    assert.equal(url.searchParams.get('backlog'), null);
    assert.ok(url.searchParams.get('token'));
    latest().serverOpen();
    latest().serverSend(welcome({ epoch: 'E1', offset: 4, recovered: true }));
    for (const o of [3, 4]) latest().serverSend(msg(o));
    assert.deepEqual(got, [1, 2, 3, 4]);
    // A gap resyncs at once, with a token again; state events never carry the token.
    latest().serverSend(msg(7));
    await settle();
    assert.equal(calls, 3);
    url = new URL(latest().url);
    assert.equal(url.searchParams.get('since'), 'E1:4');
    assert.ok(url.searchParams.get('token'));
    assert.ok(!states.some((s) => String(s.url).includes('token=')), 'state events never carry the token');
    // A kick stops for good; the position is kept for a later connect().
    latest().serverOpen();
    latest().serverSend(welcome({ epoch: 'E1', offset: 7, recovered: true }));
    latest().serverClose(CloseCode.KICKED, 'kicked');
    assert.equal(c.state, 'closed');
    assert.deepEqual(c.position, { epoch: 'E1', offset: 4 });
  });
});
