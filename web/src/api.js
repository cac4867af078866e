// Small fetch helpers for the dashboard's endpoints and the NGSI-LD API.

export class HttpError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function read(resp) {
  const text = await resp.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!resp.ok) throw new HttpError(resp.status, body);
  return body;
}

export async function dash(path, params = {}, signal) {
  const qs = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null));
  const resp = await fetch(`/dashboard/api/${path}?${qs}`, { signal, cache: 'no-store' });
  return read(resp);
}

export async function ngsi(path, tenant, signal) {
  const headers = { Accept: 'application/json' };
  if (tenant) headers['NGSILD-Tenant'] = tenant;
  const resp = await fetch(`/ngsi-ld/v1${path}`, { headers, signal, cache: 'no-store' });
  return read(resp);
}
