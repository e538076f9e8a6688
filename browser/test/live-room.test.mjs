// The live-room page and the JavaScript client in real headless Chromium, against a real cluster
// (redis-server, gateway nodes, HAProxy in front) that scripts/browser-test.sh starts. The pages
// load from the load balancer and connect through it, as in a deployment.
//
// Environment (set by the script):
//   GATEWAY_URL    the load balancer, e.g. http://127.0.0.1:8000
//   GATEWAY_NODES  JSON [{"id":"n1","pid":123,"client":"127.0.0.1:8001"}, …]
//   CHROMIUM       the browser binary (default /usr/bin/chromium)
//   SCREENSHOT_DIR where the screenshots go (default ../target/browser)
//
// The steps run in order and share two pages: a host and a viewer, in one room.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';

import { chromium } from 'playwright-core';

const BASE = process.env.GATEWAY_URL;
const NODES = JSON.parse(process.env.GATEWAY_NODES ?? '[]');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = path.resolve(process.env.SCREENSHOT_DIR ?? new URL('../../target/browser', import.meta.url).pathname);
const ROOM = `concert-${process.pid}`;
const WAIT = 15_000;

// Chromium's connections are refused here without the background-networking flags; the rest
// keeps a test browser quiet and reproducible.
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

let context;
let profile;
/** @type {import('playwright-core').Page} */ let host;
/** @type {import('playwright-core').Page} */ let viewer;
/** Console errors and uncaught exceptions of every page: any one fails the test. */
const problems = [];

async function openPage(label) {
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`${label} console error: ${msg.text()} (${msg.location().url})`);
  });
  page.on('pageerror', (err) => problems.push(`${label} uncaught: ${err.stack ?? err}`));
  return page;
}

/** Fills in the join form the way a person does and waits until the page is live. */
async function join(page, { role, name }) {
  await page.goto(`${BASE}/`);
  await page.fill('#room', ROOM);
  await page.check(`input[name="role"][value="${role}"]`);
  await page.fill('#name', name);
  await page.click('#join-button');
  await page.waitForSelector('#state[data-state="open"]');
  return nodeOf(page);
}

async function nodeOf(page) {
  const node = await page.textContent('#node');
  assert.ok(NODES.some((n) => n.id === node), `the page shows a node of the cluster, got ${node}`);
  return node;
}

async function say(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
  await expectInFeed(page, text);
}

async function expectInFeed(page, text, role) {
  const selector = role ? `#feed li.msg.${role} .text` : '#feed li.msg .text';
  await page.waitForFunction(
    ([sel, t]) => [...document.querySelectorAll(sel)].some((e) => e.textContent === t),
    [selector, text],
    { timeout: WAIT },
  );
}

async function expectCounts(page, hosts, viewers) {
  await page.waitForFunction(
    ([h, v]) => document.querySelector('#hosts').textContent === String(h)
      && document.querySelector('#viewers').textContent === String(v)
      && !document.querySelector('#stats').classList.contains('stale'),
    [hosts, viewers],
    { timeout: WAIT },
  );
}

/** Waits for the page's `n`-th rejoin after a lost connection; returns the new node. */
async function expectRejoin(page, n) {
  await page.waitForFunction(
    (count) => document.querySelectorAll('#feed li.note.ok').length >= count
      && document.body.dataset.state === 'open',
    n,
    { timeout: WAIT },
  );
  return nodeOf(page);
}

function pidOf(nodeId) {
  const node = NODES.find((n) => n.id === nodeId);
  assert.ok(node, `node ${nodeId} is known`);
  return node.pid;
}

async function exited(pid, ms) {
  for (const end = Date.now() + ms; Date.now() < end;) {
    try {
      process.kill(pid, 0);
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return false;
}

async function shoot(page, name) {
  const file = path.join(SHOTS, name);
  await page.screenshot({ path: file });
  assert.ok(fs.statSync(file).size > 10_000, `${file} has content`);
}

describe('live room in headless Chromium', { timeout: 180_000 }, () => {
  before(async () => {
    assert.ok(BASE, 'GATEWAY_URL is set (run scripts/browser-test.sh)');
    assert.ok(NODES.length >= 3, 'GATEWAY_NODES lists three nodes: two in use and one to fail over to');
    fs.mkdirSync(SHOTS, { recursive: true });
    profile = fs.mkdtempSync(path.join(os.tmpdir(), 'live-room-chromium-'));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1280, height: 800 },
    });
  });

  after(async () => {
    await context?.close();
    if (profile) fs.rmSync(profile, { recursive: true, force: true });
  });

  afterEach(() => {
    // Reported by the step in which they happened.
    assert.deepEqual(problems.splice(0), [], 'no console errors and no uncaught exceptions');
  });

  it('serves the page and the client through the load balancer', async () => {
    const page = await fetch(`${BASE}/`);
    assert.equal(page.status, 200);
    assert.equal(page.headers.get('content-type'), 'text/html; charset=utf-8');
    assert.match(page.headers.get('content-security-policy'), /script-src 'self'/);
    assert.match(page.headers.get('cache-control'), /max-age=\d+/);
    assert.match(await page.text(), /<script type="module" src=".\/page.js">/);

    const js = await fetch(`${BASE}/client.js`);
    assert.equal(js.status, 200);
    assert.equal(js.headers.get('content-type'), 'text/javascript; charset=utf-8');
    assert.match(await js.text(), /export class RoomClient/);
    const etag = js.headers.get('etag');
    const again = await fetch(`${BASE}/client.js`, { headers: { 'if-none-match': etag } });
    assert.equal(again.status, 304);

    const head = await fetch(`${BASE}/`, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal((await head.text()).length, 0);
  });

  it('puts a host and a viewer on two different nodes in one room', async () => {
    host = await openPage('host');
    viewer = await openPage('viewer');
    const hostNode = await join(host, { role: 'host', name: 'Hana' });
    const viewerNode = await join(viewer, { role: 'viewer', name: 'Vic' });
    assert.notEqual(hostNode, viewerNode, 'the load balancer spreads the two pages over two nodes');
  });

  it('shows live presence counts on both pages', async () => {
    await expectCounts(host, 1, 1);
    await expectCounts(viewer, 1, 1);
  });

  it('lists both members on both pages (the room lists its members: --list-rooms)', async () => {
    for (const page of [host, viewer]) {
      await page.waitForFunction(
        () => {
          const items = [...document.querySelectorAll('#members li')].map((li) => li.textContent).sort();
          return !document.querySelector('#members-card').hidden
            && document.querySelector('#members-count').textContent === '(2)'
            && items.join('|') === 'Hana · host|Vic · viewer';
        },
        null,
        { timeout: WAIT },
      );
    }
  });

  it("shows the host's broadcast on the viewer page, on stage and in the feed", async () => {
    const text = 'Welcome everyone, the show starts in five minutes!';
    await say(host, text);
    await expectInFeed(viewer, text, 'host');
    assert.equal(await viewer.textContent('#stage-text'), text);
  });

  it("shows the viewer's chat on the host page", async () => {
    const text = 'Hi from Lisbon, so excited!';
    await say(viewer, text);
    await expectInFeed(host, text, 'viewer');
  });

  it('lets a raw browser WebSocket join, say hello world! and reach everyone', async () => {
    const raw = await openPage('raw');
    await raw.goto(`${BASE}/`);
    const result = await raw.evaluate(async (room) => {
      const url = (path) => `${location.origin.replace(/^http/, 'ws')}${path}`;
      const open = (path) => new Promise((resolve, reject) => {
        const ws = new WebSocket(url(path));
        const frames = [];
        ws.onmessage = (ev) => frames.push(JSON.parse(ev.data));
        ws.onerror = () => reject(new Error(`WebSocket ${path} failed`));
        ws.onopen = () => resolve({ ws, frames });
      });
      const until = async (frames, pred) => {
        for (let i = 0; i < 100; i++) {
          const hit = frames.find(pred);
          if (hit) return hit;
          await new Promise((r) => setTimeout(r, 50));
        }
        throw new Error(`not received: ${JSON.stringify(frames)}`);
      };
      const member = await open(`/ws/${room}`);
      const welcome = await until(member.frames, (f) => f.type === 'welcome');
      member.ws.send('hello world!');
      const echo = await until(member.frames, (f) => f.type === 'message' && f.data === 'hello world!');
      const lobby = await open('/');
      const lobbyWelcome = await until(lobby.frames, (f) => f.type === 'welcome');
      member.ws.close();
      lobby.ws.close();
      return { welcome, echo, lobbyWelcome };
    }, ROOM);
    assert.equal(result.welcome.room, ROOM);
    assert.equal(result.welcome.role, 'viewer');
    assert.equal(result.echo.role, 'viewer');
    assert.equal(result.echo.from, null);
    assert.equal(result.lobbyWelcome.room, 'lobby', 'an upgrade on / joins the lobby');
    await expectInFeed(host, 'hello world!', 'viewer');
    await expectInFeed(viewer, 'hello world!', 'viewer');
    await raw.close();
    await expectCounts(host, 1, 1);
  });

  it('produces screenshots of both pages', async () => {
    await shoot(host, 'host.png');
    await shoot(viewer, 'viewer.png');
  });

  it("reconnects the viewer after its node drains (1012), rejoins and gets the next broadcast", async () => {
    const hostNode = await nodeOf(host);
    const drained = await nodeOf(viewer);
    process.kill(pidOf(drained), 'SIGTERM');
    const now = await expectRejoin(viewer, 1);
    assert.notEqual(now, drained, 'the viewer moved off the draining node');
    await viewer.waitForSelector('#feed li.note.warn >> text=the node is restarting');
    assert.equal(await nodeOf(host), hostNode, 'the host stayed where it was');

    const text = 'Next song: the drain did not stop the show';
    await say(host, text);
    await expectInFeed(viewer, text, 'host');
    await expectCounts(host, 1, 1);
    await expectCounts(viewer, 1, 1);
    assert.ok(await exited(pidOf(drained), 10_000), 'the drained node exited');
  });

  it("reconnects the viewer after its node is killed (1006), rejoins and gets the next broadcast", async () => {
    const killed = await nodeOf(viewer);
    const hostAlsoThere = (await nodeOf(host)) === killed;
    process.kill(pidOf(killed), 'SIGKILL');
    const now = await expectRejoin(viewer, 2);
    assert.notEqual(now, killed, 'the viewer moved off the dead node');
    await viewer.waitForSelector('#feed li.note.warn >> text=connection lost');
    if (hostAlsoThere) await expectRejoin(host, 1);

    const text = 'Still here after a crash';
    await say(host, text);
    await expectInFeed(viewer, text, 'host');
    // The dead node's presence report expires after three presence intervals.
    await expectCounts(host, 1, 1);
    await expectCounts(viewer, 1, 1);
    await shoot(viewer, 'viewer-after-failover.png');
  });
});
