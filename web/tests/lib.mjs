// Shared helpers of the dashboard's browser tests and benchmark: start the
// borough binary, wait for it, launch Debian's Chromium through playwright-core.

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

export function hasChromium() { return existsSync(CHROMIUM); }

export async function launch() {
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
}

/**
 * Starts `borough serve` and resolves with its base URL once it prints
 * `listening on`. With `keyFile`, access control is on and the operator key
 * is kept in (or read from) that file; without, the server runs open.
 */
export function startServer(bin, { data, http = '127.0.0.1:0', env = {}, keyFile }) {
  return new Promise((resolve, reject) => {
    const auth = keyFile ? ['--auth', 'on', '--operator-key-file', keyFile] : ['--auth', 'off'];
    const child = spawn(bin, ['serve', '--http', http, '--data', data, '--log-level', 'warn', '--mqtt', 'off', ...auth], {
      stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, ...env },
    });
    let out = '';
    const timer = setTimeout(() => reject(new Error(`server did not start: ${out}`)), 30000);
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/\S+)/);
      if (m) { clearTimeout(timer); resolve({ child, url: m[1] }); }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`server exited with ${code}: ${out}`)); });
  });
}

export async function stopServer(child) {
  if (!child || child.exitCode !== null) return;
  const done = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), 10000);
  await done;
  clearTimeout(t);
}

/** Runs `borough simulate` in the background; resolves once the city is provisioned. */
export async function simulate(bin, url, { tenant, devices, rate = 20, duration = '15m', seed = 7, apiKey }) {
  const args = ['simulate', '--target', url, '--devices', String(devices), '--rate', String(rate),
    '--duration', duration, '--seed', String(seed), '--quiet'];
  if (tenant) args.push('--tenant', tenant);
  const env = { ...process.env };
  if (apiKey) env.BOROUGH_API_KEY = apiKey;
  const child = spawn(bin, args, { stdio: ['ignore', 'ignore', 'inherit'], env });
  const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  const deadline = Date.now() + 120000;
  for (;;) {
    if (child.exitCode !== null && child.exitCode !== 0) throw new Error(`simulate exited with ${child.exitCode}`);
    try {
      const r = await fetch(`${url}/dashboard/api/summary?tenant=${encodeURIComponent(tenant || '')}`, { headers });
      if (r.ok && (await r.json()).entities >= devices) return child;
    } catch { /* not yet */ }
    if (Date.now() > deadline) throw new Error('the simulated city was not provisioned in time');
    await new Promise((r) => setTimeout(r, 300));
  }
}

export async function until(what, f, timeout = 15000) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try { last = await f(); if (last) return last; } catch (e) { last = e; }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
