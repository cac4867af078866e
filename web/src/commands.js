// Device commands: an actuator's commands (from the device registry,
// /api/v1/devices) with their status as its entity shows it
// (`{command}_status`, `{command}_info`), and sending one.

import { HttpError } from './api.js';

const REGISTRY_TTL_MS = 10000;
let registry = { tenant: null, at: 0, byEntity: new Map() };

function headers(tenant, json = false) {
  const h = { Accept: 'application/json' };
  if (json) h['Content-Type'] = 'application/json';
  if (tenant) h['NGSILD-Tenant'] = tenant;
  return h;
}

/** Forgets the cached registry: the next look-up reads it again (on opening an entity). */
export function forgetDevices() {
  registry = { tenant: null, at: 0, byEntity: new Map() };
}

/** The tenant's devices by the entity they feed (cached for a few seconds). */
async function devicesByEntity(tenant) {
  if (registry.tenant === tenant && Date.now() - registry.at < REGISTRY_TTL_MS) return registry.byEntity;
  const byEntity = new Map();
  try {
    const resp = await fetch('/api/v1/devices', { headers: headers(tenant), cache: 'no-store' });
    if (resp.ok) {
      for (const d of await resp.json()) byEntity.set(d.entityId, d);
    }
  } catch {
    // No registry reachable: no commands to offer.
  }
  registry = { tenant, at: Date.now(), byEntity };
  return byEntity;
}

/** The commands the entity's device offers: [{device, name, status, info}]. */
export async function commandsOf(tenant, entity) {
  const device = (await devicesByEntity(tenant)).get(entity.id);
  if (!device || !device.commands || device.commands.length === 0) return [];
  return device.commands.map((name) => ({
    device: device.id,
    name,
    status: entity[`${name}_status`]?.value ?? null,
    info: describe(entity[`${name}_info`]?.value),
  }));
}

/** A short text of a command's info (the device's answer, or an error). */
function describe(info) {
  if (info === null || info === undefined) return null;
  if (typeof info !== 'object') return String(info);
  const inner = info.info ?? info.error ?? info.reason ?? null;
  if (inner === null || inner === undefined) return null;
  return typeof inner === 'object' ? JSON.stringify(inner) : String(inner);
}

/** Queues a command; answers the command as the registry holds it. */
export async function sendCommand(tenant, device, name, value = null) {
  const resp = await fetch(`/api/v1/devices/${encodeURIComponent(device)}/commands`, {
    method: 'POST',
    headers: headers(tenant, true),
    body: JSON.stringify({ name, value }),
  });
  const text = await resp.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!resp.ok) throw new HttpError(resp.status, body);
  return body;
}
