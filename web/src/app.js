// Borough command center: tenant picker, clustered map, layers, alerts and the
// live feed. Clusters come from the server for the visible box and zoom, so the
// page holds only what it shows.

import { dash, HttpError } from './api.js';
import { offlineLayer } from './basemap.js';
import { EntityPanel } from './panel.js';

const $ = (id) => document.getElementById(id);
const PALETTE = {
  ParkingSpot: '#3b82f6', OffStreetParking: '#6366f1', Streetlight: '#eab308', AirQualityObserved: '#14b8a6',
  WeatherObserved: '#06b6d4', ElectricityMeter: '#a855f7', WaterMeter: '#0ea5e9', WasteContainer: '#84cc16',
  TrafficFlowObserved: '#f97316', EVChargingStation: '#22c55e',
};
const EXTRA = ['#f472b6', '#fb7185', '#c084fc', '#2dd4bf', '#facc15', '#60a5fa', '#4ade80', '#fdba74'];
const DIM_STATES = new Set(['occupied', 'off', 'full']);

function colorOf(type) {
  if (PALETTE[type]) return PALETTE[type];
  let h = 0;
  for (const c of String(type)) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return EXTRA[h % EXTRA.length];
}

const fmt = (n) => (n === undefined || n === null ? '–' : Number(n).toLocaleString('en-US'));

const state = {
  config: null,
  tenant: new URLSearchParams(location.search).get('tenant') || '',
  summary: null,
  layers: new Map(), // type -> shown
  alerts: new Map(), // id -> summary with alert
  alertFilter: 'all',
  map: null,
  clusterLayer: null,
  markerLayer: null,
  markers: new Map(), // id -> circle marker
  fetchAbort: null,
  fetchTimer: null,
  refetchSoon: null,
  source: null,
  liveCount: 0,
  firstRender: false,
};

const panel = new EntityPanel({ colorOf, onClose: () => {} });

// ---------- page states ----------

function overlay(kind, title, text) {
  const o = $('overlay');
  if (!kind) { o.hidden = true; return; }
  o.hidden = false;
  o.dataset.kind = kind;
  $('overlay-title').textContent = title;
  $('overlay-text').innerHTML = text;
}

function setPageState(s) { document.body.dataset.state = s; }

function setLive(mode, text) {
  $('live').dataset.live = mode;
  $('live-text').textContent = text;
  const banner = $('banner');
  if (mode === 'reconnecting' || mode === 'offline') {
    banner.hidden = false;
    banner.textContent = 'Connection to the server lost: reconnecting… (the map shows the last known state)';
  } else {
    banner.hidden = true;
  }
}

// ---------- tenants and summary ----------

async function loadTenants() {
  const { tenants } = await dash('tenants');
  const sel = $('tenant');
  const names = tenants.map((t) => t.name);
  if (!names.includes(state.tenant)) names.push(state.tenant);
  sel.replaceChildren(...names.map((n) => {
    const t = tenants.find((x) => x.name === n);
    const label = `${n || 'default'}${t ? ` · ${fmt(t.entities)}` : ' · unknown'}`;
    return new Option(label, n);
  }));
  sel.value = state.tenant;
}

async function selectTenant(name) {
  state.tenant = name;
  const url = new URL(location.href);
  if (name) url.searchParams.set('tenant', name); else url.searchParams.delete('tenant');
  history.replaceState(null, '', url);
  panel.close();
  state.alerts.clear();
  state.layers.clear();
  await loadSummary(true);
  connectLive();
}

async function loadSummary(fit) {
  let s;
  try {
    s = await dash('summary', { tenant: state.tenant });
  } catch (e) {
    state.summary = null;
    clearMap();
    renderLayers();
    renderAlerts();
    ['kpi-entities', 'kpi-visible', 'kpi-critical', 'kpi-warning'].forEach((k) => { $(k).textContent = '–'; });
    if (e instanceof HttpError && e.status === 404) {
      setPageState('unknown-tenant');
      overlay('unknown-tenant', `Tenant “${state.tenant}” does not exist`,
        'No data has been written for this tenant. Pick another tenant above; this page will show it as soon as data arrives.');
    } else {
      setPageState('error');
      overlay('error', 'The server cannot be reached', `${e.message}. Retrying…`);
      setTimeout(() => loadSummary(fit), 3000);
    }
    return;
  }
  state.summary = s;
  $('kpi-entities').textContent = fmt(s.entities);
  $('kpi-critical').textContent = fmt(s.alerts.critical);
  $('kpi-warning').textContent = fmt(s.alerts.warning);
  for (const { type } of s.types) if (!state.layers.has(type)) state.layers.set(type, true);
  for (const t of [...state.layers.keys()]) if (!s.types.some((x) => x.type === t)) state.layers.delete(t);
  renderLayers();
  if (!state.map) {
    // The missing-library notice stays; alerts and entity details still work.
  } else if (s.entities === 0 || !s.extent) {
    setPageState('empty');
    overlay('empty', s.entities === 0 ? 'This city is empty' : 'No entity has a location',
      s.entities === 0
        ? 'No entities in this tenant yet. The map fills in by itself as soon as devices report (try <code>borough simulate</code>).'
        : 'Entities exist but none has a <code>location</code>; see the alerts panel.');
    clearMap();
  } else {
    overlay(null);
    setPageState('ready');
    if (fit && state.map) {
      const [w, s2, e, n] = s.extent;
      const pad = Math.max(e - w, n - s2) * 0.05 + 0.002;
      state.map.fitBounds([[s2 - pad, w - pad], [n + pad, e + pad]]);
    }
    scheduleFetch(0);
  }
  loadAlerts();
}

// ---------- layers ----------

function renderLayers() {
  const ul = $('layers');
  const types = state.summary ? state.summary.types : [];
  $('layers-empty').hidden = types.length > 0;
  ul.replaceChildren(...types.map(({ type, count }) => {
    const li = document.createElement('li');
    li.dataset.type = type;
    const cb = document.createElement('input');
    cb.type = 'checkbox';
    cb.checked = state.layers.get(type) !== false;
    cb.setAttribute('aria-label', type);
    const sw = document.createElement('span');
    sw.className = 'sw';
    sw.style.background = colorOf(type);
    const name = document.createElement('span');
    name.textContent = type.replace(/([a-z])([A-Z])/g, '$1 $2');
    const n = document.createElement('span');
    n.className = 'n';
    n.textContent = fmt(count);
    li.append(cb, sw, name, n);
    li.addEventListener('click', (e) => {
      if (e.target !== cb) cb.checked = !cb.checked;
      state.layers.set(type, cb.checked);
      scheduleFetch(0);
    });
    return li;
  }));
}

function setAllLayers(on) {
  for (const t of state.layers.keys()) state.layers.set(t, on);
  renderLayers();
  scheduleFetch(0);
}

// ---------- map ----------

function initMap() {
  if (typeof L === 'undefined') {
    setPageState('no-map-library');
    overlay('no-map-library', 'Map library missing',
      'This binary was built without the dashboard’s map library (npm was not available at build time). Run <code>npm ci</code> in <code>web/</code> and rebuild. Alerts and entity details still work.');
    return false;
  }
  const cfg = state.config;
  const map = L.map('map', { preferCanvas: true, zoomSnap: 0.5, zoomControl: true, maxZoom: cfg.maxZoom, minZoom: 2, worldCopyJump: false, attributionControl: true });
  if (cfg.tileUrl) {
    L.tileLayer(cfg.tileUrl, { maxZoom: cfg.maxZoom, maxNativeZoom: 19, attribution: cfg.tileAttribution || '' }).addTo(map);
  } else {
    offlineLayer(L).addTo(map);
  }
  map.attributionControl.setPrefix('Borough');
  L.control.scale({ imperial: false, position: 'bottomright' }).addTo(map);
  map.setView([48.85, 2.33], 13);
  state.clusterLayer = L.layerGroup().addTo(map);
  state.markerLayer = L.layerGroup().addTo(map);
  state.renderer = L.canvas({ padding: 0.2 });
  map.on('moveend', () => scheduleFetch(120));
  state.map = map;
  return true;
}

function clearMap() {
  state.clusterLayer?.clearLayers();
  state.markerLayer?.clearLayers();
  state.markers.clear();
  $('kpi-visible').textContent = '–';
}

function scheduleFetch(delay) {
  if (!state.map || !state.summary || !state.summary.extent) return;
  clearTimeout(state.fetchTimer);
  state.fetchTimer = setTimeout(fetchClusters, delay);
}

function viewBox() {
  const b = state.map.getBounds();
  const c = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  return [c(b.getWest(), -180, 180), c(b.getSouth(), -85, 85), c(b.getEast(), -180, 180), c(b.getNorth(), -85, 85)]
    .map((v) => +v.toFixed(6));
}

async function fetchClusters() {
  const shown = [...state.layers.entries()].filter(([, on]) => on).map(([t]) => t);
  if (shown.length === 0) { clearMap(); $('kpi-visible').textContent = '0'; return; }
  const all = shown.length === state.layers.size;
  state.fetchAbort?.abort();
  const ctl = new AbortController();
  state.fetchAbort = ctl;
  const zoom = Math.round(state.map.getZoom());
  let r;
  try {
    r = await dash('clusters', {
      tenant: state.tenant, bbox: viewBox().join(','), zoom, types: all ? undefined : shown.join(','),
    }, ctl.signal);
  } catch (e) {
    if (e.name === 'AbortError') return;
    if (e instanceof HttpError && e.status === 404) { loadSummary(false); return; }
    if (e instanceof HttpError && e.status === 400) { loadSummary(false); return; }
    setLive('reconnecting', 'Server unreachable');
    return;
  }
  if (ctl !== state.fetchAbort) return;
  drawClusters(r);
}

function donut(types, count) {
  let at = 0;
  const stops = types.map((t) => {
    const from = at;
    at += (t.count / count) * 360;
    return `${colorOf(t.type)} ${from.toFixed(1)}deg ${at.toFixed(1)}deg`;
  });
  return `conic-gradient(${stops.join(',')})`;
}

function clusterIcon(c) {
  const size = Math.round(28 + Math.min(22, Math.log10(c.count) * 9));
  const badge = c.alerts ? `<span class="al${c.critical ? '' : ' warn'}">${c.alerts > 99 ? '99+' : c.alerts}</span>` : '';
  const label = c.count >= 10000 ? `${Math.round(c.count / 1000)}k` : c.count >= 1000 ? `${(c.count / 1000).toFixed(1)}k` : c.count;
  const types = c.types.map((t) => t.type).join(' ');
  return L.divIcon({
    className: '',
    iconSize: [size, size],
    html: `<div class="cluster" data-types="${types}" data-count="${c.count}" style="width:${size}px;height:${size}px;background:${donut(c.types, c.count)}"><span class="n">${label}</span>${badge}</div>`,
  });
}

function clusterTip(c) {
  const rows = c.types.slice(0, 6).map((t) => `<div class="tr"><i style="background:${colorOf(t.type)}"></i>${t.type}<b>${fmt(t.count)}</b></div>`).join('');
  const more = c.types.length > 6 ? `<div class="tr muted">+ ${c.types.length - 6} more types</div>` : '';
  const al = c.alerts ? `<div class="tr alert">${c.alerts} alerting${c.critical ? ` (${c.critical} critical)` : ''}</div>` : '';
  return `<div class="tt"><div class="th">${fmt(c.count)} entities</div>${rows}${more}${al}</div>`;
}

function markerStyle(m) {
  const color = colorOf(m.type);
  const ring = m.alert === 'critical' ? '#ef4444' : m.alert === 'warning' ? '#f59e0b' : 'rgba(10,15,26,0.9)';
  return {
    renderer: state.renderer,
    radius: (m.alert ? 7 : 6) + (state.map && state.map.getZoom() >= 18 ? 2 : 0),
    color: ring,
    weight: m.alert ? 3 : 1.5,
    fillColor: color,
    fillOpacity: DIM_STATES.has(m.state) ? 0.45 : 0.95,
  };
}

function drawClusters(r) {
  const cl = state.clusterLayer;
  const ml = state.markerLayer;
  cl.clearLayers();
  ml.clearLayers();
  state.markers.clear();
  for (const c of r.clusters) {
    const m = L.marker([c.lat, c.lon], { icon: clusterIcon(c), keyboard: false });
    m.bindTooltip(clusterTip(c), { className: 'tip', direction: 'top', offset: [0, -14] });
    m.on('click', () => state.map.setView([c.lat, c.lon], Math.min(state.map.getZoom() + 2, state.config.maxZoom)));
    cl.addLayer(m);
  }
  for (const mk of r.markers) {
    const m = L.circleMarker([mk.lat, mk.lon], markerStyle(mk));
    m.data = mk;
    m.bindTooltip(() => `<b>${m.data.type}</b><br>${m.data.id}${m.data.state ? `<br>${m.data.state}` : ''}`, { className: 'tip', direction: 'top' });
    m.on('click', () => openEntity(m.data.id, m.data));
    ml.addLayer(m);
    state.markers.set(mk.id, m);
  }
  $('kpi-visible').textContent = fmt(r.total);
  document.body.dataset.clusters = String(r.clusters.length);
  document.body.dataset.markers = String(r.markers.length);
  document.body.dataset.zoom = String(r.zoom);
  if (!state.firstRender) {
    state.firstRender = true;
    window.__boroughFirstRender = performance.now();
    document.body.dataset.rendered = 'true';
  }
}

// ---------- entity panel ----------

function openEntity(id, info) {
  panel.open(state.tenant, id);
  const a = state.alerts.get(id);
  panel.setAlert(a ? a.alert : (info && info.alert && typeof info.alert === 'object' ? info.alert : null));
}

// ---------- alerts ----------

async function loadAlerts() {
  try {
    const r = await dash('alerts', { tenant: state.tenant, limit: 1000 });
    state.alerts.clear();
    for (const a of r.alerts) state.alerts.set(a.id, a);
    state.alertsTotal = r.total;
  } catch {
    state.alerts.clear();
  }
  renderAlerts();
}

function renderAlerts(fresh = new Set()) {
  const list = [...state.alerts.values()]
    .filter((a) => state.alertFilter === 'all' || a.alert.severity === state.alertFilter)
    .sort((a, b) => (a.alert.severity === b.alert.severity ? a.id.localeCompare(b.id) : a.alert.severity === 'critical' ? -1 : 1));
  const crit = [...state.alerts.values()].filter((a) => a.alert.severity === 'critical').length;
  $('alerts-count').textContent = fmt(state.alerts.size);
  if (state.summary) {
    $('kpi-critical').textContent = fmt(crit);
    $('kpi-warning').textContent = fmt(state.alerts.size - crit);
  }
  const items = list.slice(0, 300).map((a) => {
    const li = document.createElement('li');
    li.dataset.id = a.id;
    if (fresh.has(a.id)) li.className = 'fresh';
    const sev = document.createElement('span');
    sev.className = `sev ${a.alert.severity}`;
    const who = document.createElement('span');
    who.className = 'who';
    who.textContent = a.id.replace(/^urn:ngsi-ld:[^:]*:/, '');
    who.title = a.id;
    const when = document.createElement('span');
    when.className = 'when';
    when.textContent = a.modifiedAt ? new Date(a.modifiedAt / 1000).toLocaleTimeString('en-GB') : '';
    const why = document.createElement('span');
    why.className = 'why';
    const ty = document.createElement('span');
    ty.className = 'ty';
    ty.style.setProperty('--c', colorOf(a.type));
    ty.textContent = a.type || '';
    const reason = document.createElement('span');
    reason.textContent = a.alert.reason;
    reason.title = a.alert.reason;
    why.append(ty, reason);
    li.append(sev, who, when, why);
    li.addEventListener('click', () => {
      if (state.map && a.lat !== undefined) state.map.setView([a.lat, a.lon], Math.max(state.map.getZoom(), 18));
      openEntity(a.id, a);
    });
    return li;
  });
  $('alerts').replaceChildren(...items);
  $('alerts-empty').hidden = state.alerts.size > 0;
}

// ---------- live feed ----------

function connectLive() {
  state.source?.close();
  setLive('connecting', 'Connecting…');
  const src = new EventSource(`/dashboard/api/events?tenant=${encodeURIComponent(state.tenant)}`);
  state.source = src;
  let everConnected = false;
  src.addEventListener('hello', () => {
    const wasDown = everConnected || $('live').dataset.live === 'reconnecting';
    everConnected = true;
    setLive('live', 'Live');
    document.body.dataset.live = 'live';
    // After a reconnection (a server restart) the view may be stale.
    if (wasDown) { loadTenants().catch(() => {}); loadSummary(false); }
  });
  src.addEventListener('changes', (ev) => {
    let changes;
    try { changes = JSON.parse(ev.data); } catch { return; }
    onChanges(changes);
  });
  src.addEventListener('resync', () => { loadSummary(false); });
  src.onerror = () => {
    if (src !== state.source) return;
    document.body.dataset.live = 'down';
    if (src.readyState === EventSource.CLOSED) {
      // The server answered with an error (e.g. the tenant is gone): retry ourselves.
      setLive('offline', 'Disconnected');
      setTimeout(() => { if (src === state.source) { loadSummary(false); connectLive(); } }, 3000);
    } else {
      setLive('reconnecting', 'Reconnecting…');
    }
  };
}

function onChanges(changes) {
  state.liveCount += changes.length;
  document.body.dataset.lastChange = String(Date.now());
  if (!state.summary || state.summary.entities === 0 || !state.summary.extent) {
    // An empty city that starts to fill in.
    clearTimeout(state.refetchSoon);
    state.refetchSoon = setTimeout(() => loadSummary(true), 500);
    return;
  }
  const fresh = new Set();
  let inView = false;
  const bounds = state.map ? state.map.getBounds() : null;
  for (const c of changes) {
    if (c.deleted || !c.alert) {
      state.alerts.delete(c.id);
    } else {
      if (!state.alerts.has(c.id)) fresh.add(c.id);
      state.alerts.set(c.id, c);
    }
    const m = state.markers.get(c.id);
    if (m && !c.deleted) {
      m.data = { ...m.data, state: c.state, alert: c.alert ? c.alert.severity : undefined };
      m.setStyle(markerStyle(m.data));
    }
    if (bounds && c.lat !== undefined && bounds.contains([c.lat, c.lon])) inView = true;
    if (panel.isOpen && panel.id === c.id) {
      panel.setAlert(c.alert || null);
      panel.refresh();
    }
  }
  renderAlerts(fresh);
  // Clusters' alert badges: refresh the view now and then, not on every change.
  if (inView && !state.refetchSoon) {
    state.refetchSoon = setTimeout(() => { state.refetchSoon = null; scheduleFetch(0); }, 3000);
  }
}

setInterval(() => {
  const rate = state.liveCount / 5;
  state.liveCount = 0;
  $('live-rate').textContent = $('live').dataset.live === 'live' ? `${rate.toFixed(rate < 10 ? 1 : 0)} upd/s` : '';
}, 5000);

// ---------- start ----------

// ---------- sign-in ----------

// A server with access control wants an API key once; the session lives in
// an HttpOnly cookie that every request of the page then carries.
function showSignIn() {
  setPageState('signin');
  $('signin').hidden = false;
  $('signin-key').focus();
  $('signin-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    $('signin-error').hidden = true;
    const resp = await fetch('/dashboard/api/login', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ apiKey: $('signin-key').value.trim() }),
    });
    if (resp.ok) { location.reload(); return; }
    let detail = `HTTP ${resp.status}`;
    try { detail = (await resp.json()).detail || detail; } catch { /* keep the status */ }
    $('signin-error').textContent = detail;
    $('signin-error').hidden = false;
  });
}

async function signOut() {
  await fetch('/dashboard/api/logout', { method: 'POST' });
  location.reload();
}

async function start() {
  try {
    state.config = await dash('config');
  } catch (e) {
    overlay('error', 'The server cannot be reached', `${e.message}. Retrying…`);
    setTimeout(start, 3000);
    return;
  }
  if (state.config.auth && !state.config.signedIn) {
    showSignIn();
    return;
  }
  if (state.config.auth) {
    $('signout').hidden = false;
    $('signout').addEventListener('click', signOut);
  }
  initMap();
  $('tenant').addEventListener('change', (e) => selectTenant(e.target.value));
  $('layers-all').addEventListener('click', () => setAllLayers(true));
  $('layers-none').addEventListener('click', () => setAllLayers(false));
  for (const chip of document.querySelectorAll('.filters .chip')) {
    chip.addEventListener('click', () => {
      state.alertFilter = chip.dataset.filter;
      document.querySelectorAll('.filters .chip').forEach((c) => c.classList.toggle('on', c === chip));
      renderAlerts();
    });
  }
  try { await loadTenants(); } catch { /* shown by the summary */ }
  await loadSummary(true);
  connectLive();
}

window.borough = { state, openEntity };
start();
