// The load tester's HTML report (`loadtest --html-report`), opened in headless Chromium: it must
// load without a console error or an uncaught exception, draw its four charts with data, and
// fetch nothing from outside the file. Run by scripts/loadtest-tls.sh after a real run.
//
// Environment:
//   REPORT_FILE    the report to open (required)
//   CHROMIUM       the browser binary (default /usr/bin/chromium)
//   SCREENSHOT_DIR where the screenshot goes (default target/browser)

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, it } from 'node:test';

import { chromium } from 'playwright-core';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const REPORT = process.env.REPORT_FILE;
const SHOTS = path.resolve(process.env.SCREENSHOT_DIR ?? new URL('../../target/browser', import.meta.url).pathname);

describe('load test report in headless Chromium', { timeout: 60_000 }, () => {
  it('shows its charts without a console error', async () => {
    assert.ok(REPORT && fs.existsSync(REPORT), 'REPORT_FILE names an existing report');
    fs.mkdirSync(SHOTS, { recursive: true });
    const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'loadtest-report-chromium-'));
    const context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
      viewport: { width: 1000, height: 800 },
    });
    try {
      const page = await context.newPage();
      const problems = [];
      const outside = [];
      page.on('console', (msg) => {
        if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`);
      });
      page.on('pageerror', (err) => problems.push(`uncaught: ${err.stack ?? err}`));
      page.on('request', (req) => {
        if (!req.url().startsWith('file:') && !req.url().startsWith('data:')) outside.push(req.url());
      });
      await page.goto(pathToFileURL(REPORT).href, { waitUntil: 'load' });
      const charts = await page.locator('svg').count();
      assert.equal(charts, 4, 'latency, connections, messages per second, losses');
      const lines = await page.locator('svg polyline').count();
      assert.ok(lines >= 4, `charts have lines (${lines})`);
      const thresholds = await page.locator('svg line.threshold').count();
      assert.ok(thresholds >= 1, 'rule thresholds are drawn');
      assert.match(await page.title(), /Load test [0-9a-f]{8}: (PASS|FAIL)/);
      const file = path.join(SHOTS, 'loadtest-report.png');
      await page.screenshot({ path: file, fullPage: true });
      assert.ok(fs.statSync(file).size > 10_000, `${file} has content`);
      assert.deepEqual(outside, [], 'nothing fetched from outside the file');
      assert.deepEqual(problems, [], 'no console errors and no uncaught exceptions');
    } finally {
      await context.close();
      fs.rmSync(profile, { recursive: true, force: true });
    }
  });
});
