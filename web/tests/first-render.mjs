// Time to first map render of the dashboard in headless Chromium: a fresh
// browser context loads the page and waits until the first clusters are drawn
// (the page sets window.__boroughFirstRender, in ms since navigation start).
//
//   node tests/first-render.mjs URL [TENANT] [RUNS]
//
// Prints one JSON line: {"runs_ms": [...], "median_ms": .., "max_ms": ..},
// or {"skipped": "why"} when Chromium is not installed.

import { hasChromium, launch, CHROMIUM } from './lib.mjs';

const [url, tenant = '', runs = '3'] = process.argv.slice(2);
if (!url) {
  console.error('usage: first-render.mjs URL [TENANT] [RUNS]');
  process.exit(2);
}
if (!hasChromium()) {
  console.log(JSON.stringify({ skipped: `${CHROMIUM} is not installed (apt-get install chromium)` }));
  process.exit(0);
}
const browser = await launch();
const times = [];
try {
  for (let i = 0; i < Number(runs); i++) {
    const context = await browser.newContext({ viewport: { width: 1600, height: 900 } });
    const page = await context.newPage();
    await page.goto(`${url}/${tenant ? `?tenant=${encodeURIComponent(tenant)}` : ''}`);
    await page.waitForFunction(() => window.__boroughFirstRender !== undefined, null, { timeout: 30000 });
    times.push(await page.evaluate(() => window.__boroughFirstRender));
    await context.close();
  }
} finally {
  await browser.close();
}
const sorted = [...times].sort((a, b) => a - b);
console.log(JSON.stringify({
  runs_ms: times.map((t) => Math.round(t)),
  median_ms: Math.round(sorted[Math.floor(sorted.length / 2)]),
  max_ms: Math.round(sorted[sorted.length - 1]),
}));
