// The live-room page against a node that requires tokens (`--auth jwt --allow-anonymous-viewers 'stage-*'`),
// in real headless Chromium: a token in the URL fragment joins with the token's role and name and
// the page shows the identity; a page without a token watches as an anonymous viewer that may not
// publish. The node is this file's own (release binary, in-process broker), started and stopped
// here; scripts/browser-test.sh runs it after live-room.test.mjs.
//
// Environment: GATEWAY_BIN (default ../../target/release/gateway), CHROMIUM, SCREENSHOT_DIR.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';

import { chromium } from 'playwright-core';

const BIN = process.env.GATEWAY_BIN ?? new URL('../../target/release/gateway', import.meta.url).pathname;
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = path.resolve(process.env.SCREENSHOT_DIR ?? new URL('../../target/browser', import.meta.url).pathname);
const SECRET = crypto.randomBytes(24).toString('hex');
const ROOM = `stage-${process.pid}`;
const WAIT = 15_000;
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

/** An HS256 token, as a backend mints it (docs/protocol.md, section 9.6). */
function mint(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ exp: Math.floor(Date.now() / 1000) + 600, ...claims })}`;
  return `${body}.${crypto.createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}

async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

let node;
let base;
let context;
let profile;
const problems = [];

async function openPage(label) {
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('console', (msg) => {
    // The anonymous viewer's refused publish is an `error` event, not a console error; a 401/403
    // of a WebSocket would be one, and fails the test.
    if (msg.type() === 'error') problems.push(`${label} console error: ${msg.text()}`);
  });
  page.on('pageerror', (err) => problems.push(`${label} uncaught: ${err.stack ?? err}`));
  return page;
}

async function expectInFeed(page, text) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll('#feed li .text, #feed li.note')].some((e) => e.textContent.includes(t)),
    text,
    { timeout: WAIT },
  );
}

describe('live room with tokens in headless Chromium', { timeout: 120_000 }, () => {
  before(async () => {
    assert.ok(fs.existsSync(BIN), `${BIN} exists (cargo build --release -p gateway)`);
    const [port, admin] = [await freePort(), await freePort()];
    node = spawn(BIN, [
      '--node-id', 'auth1', '--listen', `127.0.0.1:${port}`, '--admin-listen', `127.0.0.1:${admin}`,
      '--auth', 'jwt', '--allow-anonymous-viewers', 'stage-*', '--drain-seconds', '1',
    ], {
      env: { ...process.env, GATEWAY_JWT_HMAC_SECRETS: SECRET, GATEWAY_API_KEY: 'browser-test-api-key', NO_COLOR: '1' },
      stdio: 'ignore',
    });
    base = `http://127.0.0.1:${port}`;
    for (let i = 0; ; i++) {
      try {
        if ((await fetch(`http://127.0.0.1:${admin}/readyz`)).ok) break;
      } catch {
        // not up yet
      }
      assert.ok(i < 200, 'the node came up');
      await new Promise((r) => setTimeout(r, 100));
    }
    fs.mkdirSync(SHOTS, { recursive: true });
    profile = fs.mkdtempSync(path.join(os.tmpdir(), 'live-room-auth-chromium-'));
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
    node?.kill('SIGKILL');
  });

  afterEach(() => {
    assert.deepEqual(problems.splice(0), [], 'no console errors and no uncaught exceptions');
  });

  let host;
  let guest;

  it('joins with the token in the URL fragment and shows the identity it was admitted as', async () => {
    host = await openPage('host');
    const token = mint({ sub: 'ann-42', name: 'Ann', rooms: [{ room: ROOM, role: 'host' }] });
    await host.goto(`${base}/?room=${ROOM}#token=${token}`);
    assert.equal(await host.evaluate(() => location.hash), '', 'the token left the address bar');
    assert.equal(await host.isVisible('#token-note'), true);
    await host.click('#join-button');
    await host.waitForSelector('#state[data-state="open"]');
    assert.equal(await host.textContent('#you-role'), 'host', "the token's role, not the form's");
    assert.equal(await host.textContent('#you-name'), 'as Ann (user ann-42)');
    await host.fill('#text', 'Doors open with tokens');
    await host.click('#send');
    await expectInFeed(host, 'Doors open with tokens');
    await host.screenshot({ path: path.join(SHOTS, 'host-with-token.png') });
  });

  it('lets a page without a token watch as an anonymous viewer that may not publish', async () => {
    guest = await openPage('guest');
    await guest.goto(`${base}/?room=${ROOM}`);
    await guest.fill('#name', 'Guest');
    await guest.click('#join-button');
    await guest.waitForSelector('#state[data-state="open"]');
    assert.equal(await guest.textContent('#you-role'), 'viewer');
    assert.equal(await guest.textContent('#you-name'), 'as Guest');
    await host.fill('#text', 'Welcome, guests');
    await host.click('#send');
    await expectInFeed(guest, 'Welcome, guests');
    await guest.fill('#text', 'can I talk?');
    await guest.click('#send');
    await expectInFeed(guest, 'you may not publish in this room');
  });
});
