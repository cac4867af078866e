// The entity panel: current attributes, a chart of one attribute's history
// (NGSI-LD temporal API), the entity's alert, and its commands when it has any.

import { ngsi, HttpError } from './api.js';
import { commandsOf, forgetDevices, sendCommand } from './commands.js';

const UNITS = {
  CEL: '°C', C62: '', KWT: 'kW', KWH: 'kWh', MQH: 'm³/h', MTQ: 'm³', GQ: 'µg/m³', MTS: 'm/s',
  MMT: 'mm', KMH: 'km/h', LTR: 'L', MTR: 'm', E50: 'veh/h', P1: '%',
};
const HIDDEN = new Set(['id', 'type', '@context']);
const $ = (id) => document.getElementById(id);

function ago(iso) {
  if (!iso) return '';
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (!Number.isFinite(s)) return '';
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleString();
}

function formatValue(attr) {
  if (!attr || typeof attr !== 'object') return String(attr);
  if (attr.type === 'Relationship') return attr.object;
  if (attr.type === 'GeoProperty') {
    const v = attr.value || {};
    if (v.type === 'Point') return `${v.coordinates[1].toFixed(5)}, ${v.coordinates[0].toFixed(5)}`;
    return v.type || 'geometry';
  }
  let v = attr.value;
  if (typeof v === 'number') {
    const unit = UNITS[attr.unitCode] ?? attr.unitCode ?? '';
    const n = Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : String(+v.toFixed(3));
    return unit ? `${n} ${unit}` : n;
  }
  if (Array.isArray(v)) return v.join(', ');
  if (v && typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

export class EntityPanel {
  constructor({ colorOf, onClose }) {
    this.colorOf = colorOf;
    this.onClose = onClose;
    this.tenant = '';
    this.id = null;
    this.entity = null;
    this.chartAttr = null;
    this.plot = null;
    this.series = [[], []];
    this.history = false;
    this.abort = null;
    $('panel-close').addEventListener('click', () => this.close());
    $('chart-attr').addEventListener('change', (e) => this.showChart(e.target.value));
  }

  get isOpen() { return this.id !== null; }

  close() {
    this.id = null;
    this.entity = null;
    $('panel').hidden = true;
    document.body.dataset.panel = '';
    if (this.plot) { this.plot.destroy(); this.plot = null; }
    this.onClose?.();
  }

  async open(tenant, id) {
    this.tenant = tenant;
    this.id = id;
    this.chartAttr = null;
    $('panel').hidden = false;
    $('panel-id').textContent = id;
    $('panel-type').textContent = '…';
    $('attrs').innerHTML = '';
    $('chart').innerHTML = '';
    $('chart-note').textContent = '';
    document.body.dataset.panel = 'loading';
    forgetDevices();
    await this.refresh(true);
  }

  /** Reloads the entity (after a live change); adds the charted value as a new point. */
  async refresh(first = false) {
    if (!this.id) return;
    const id = this.id;
    this.abort?.abort();
    this.abort = new AbortController();
    let entity;
    try {
      entity = await ngsi(`/entities/${encodeURIComponent(id)}`, this.tenant, this.abort.signal);
    } catch (e) {
      if (e.name === 'AbortError' || id !== this.id) return;
      if (e instanceof HttpError && e.status === 404) {
        $('panel-type').textContent = 'gone';
        $('attrs').innerHTML = '<tr><td class="k">This entity no longer exists.</td></tr>';
        document.body.dataset.panel = 'gone';
        return;
      }
      $('panel-modified').textContent = `Cannot load: ${e.message}`;
      return;
    }
    if (id !== this.id) return;
    const previous = this.entity;
    this.entity = entity;
    this.renderHeader(entity);
    this.renderAttrs(entity, previous);
    this.renderCommands(entity);
    if (first) {
      this.fillChartChoices(entity);
    } else if (this.chartAttr) {
      this.appendLive(entity);
    }
    document.body.dataset.panel = 'open';
  }

  setAlert(alert) {
    const box = $('panel-alert');
    if (!alert) { box.hidden = true; return; }
    box.hidden = false;
    box.className = `panel-alert ${alert.severity}`;
    box.textContent = `${alert.severity === 'critical' ? 'Critical' : 'Warning'} · ${alert.reason}`;
  }

  renderHeader(e) {
    const type = Array.isArray(e.type) ? e.type[0] : e.type;
    const badge = $('panel-type');
    badge.textContent = String(type).replace(/([a-z])([A-Z])/g, '$1 $2');
    badge.style.setProperty('--c', this.colorOf(type));
    const times = Object.values(e).map((a) => a && a.observedAt).filter(Boolean).sort();
    const last = times[times.length - 1];
    $('panel-modified').textContent = last ? `Last observation ${ago(last)}` : '';
  }

  renderAttrs(e, previous) {
    const rows = [];
    for (const [name, attr] of Object.entries(e)) {
      if (HIDDEN.has(name)) continue;
      const a = Array.isArray(attr) ? attr[0] : attr;
      const numeric = a && a.type === 'Property' && typeof a.value === 'number';
      const before = previous && JSON.stringify(previous[name]?.value) !== JSON.stringify(a?.value);
      const tr = document.createElement('tr');
      tr.dataset.attr = name;
      if (numeric) tr.className = 'num';
      if (before) tr.classList.add('changed');
      const k = document.createElement('td');
      k.className = 'k';
      k.textContent = name;
      if (numeric) k.addEventListener('click', () => { $('chart-attr').value = name; this.showChart(name); });
      const v = document.createElement('td');
      v.className = 'v';
      v.textContent = formatValue(a);
      if (a && a.observedAt) {
        const t = document.createElement('span');
        t.className = 't';
        t.textContent = ago(a.observedAt);
        v.appendChild(t);
      }
      tr.append(k, v);
      rows.push(tr);
    }
    $('attrs').replaceChildren(...rows);
  }

  async renderCommands(e) {
    const id = this.id;
    const cmds = await commandsOf(this.tenant, e);
    if (id !== this.id) return;
    $('commands-section').hidden = cmds.length === 0;
    $('commands').replaceChildren(...cmds.map((c) => {
      const li = document.createElement('li');
      li.dataset.command = c.name;
      li.dataset.status = c.status ?? 'none';
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = c.name;
      const status = document.createElement('span');
      status.className = `cmd-status ${c.status ?? 'none'}`;
      status.textContent = c.status ? `${c.status}${c.info ? ` · ${c.info}` : ''}` : 'not sent yet';
      button.addEventListener('click', async () => {
        button.disabled = true;
        try {
          const sent = await sendCommand(this.tenant, c.device, c.name);
          li.dataset.status = sent?.status ?? 'queued';
          status.className = `cmd-status ${li.dataset.status}`;
          status.textContent = li.dataset.status;
        } catch (err) {
          status.className = 'cmd-status failed';
          status.textContent = `not sent: ${err.message}`;
        } finally {
          button.disabled = false;
        }
      });
      li.append(button, status);
      return li;
    }));
  }

  fillChartChoices(e) {
    // Measurements (attributes with observedAt) first: they are what changes.
    const numeric = Object.entries(e)
      .filter(([n, a]) => !HIDDEN.has(n) && a && a.type === 'Property' && typeof a.value === 'number')
      .sort(([, a], [, b]) => Number(!a.observedAt) - Number(!b.observedAt))
      .map(([n]) => n);
    const sel = $('chart-attr');
    sel.replaceChildren(...numeric.map((n) => new Option(n, n)));
    sel.disabled = numeric.length === 0;
    if (numeric.length) {
      this.showChart(numeric[0]);
    } else {
      const status = e.status ? ` (status: ${e.status.value})` : '';
      this.chartMessage(`No numeric attribute to chart${status}.`);
    }
  }

  chartMessage(text) {
    if (this.plot) { this.plot.destroy(); this.plot = null; }
    const div = document.createElement('div');
    div.className = 'nohist';
    div.textContent = text;
    $('chart').replaceChildren(div);
  }

  /** Loads an attribute's history: GET /temporal/entities/{id}?attrs=..&lastN=200&options=temporalValues. */
  async showChart(attr) {
    this.chartAttr = attr;
    this.series = [[], []];
    this.history = false;
    const id = this.id;
    if (typeof uPlot === 'undefined') {
      this.chartMessage('Chart library missing: this build has no uPlot.');
      return;
    }
    document.body.dataset.chart = 'loading';
    let points = [];
    try {
      const q = `attrs=${encodeURIComponent(attr)}&lastN=200&options=temporalValues`;
      const t = await ngsi(`/temporal/entities/${encodeURIComponent(id)}?${q}`, this.tenant);
      const values = t && t[attr] && (t[attr].values || (Array.isArray(t[attr]) ? t[attr][0]?.values : null));
      if (Array.isArray(values)) {
        points = values
          .map(([v, at]) => [Date.parse(at) / 1000, typeof v === 'number' ? v : Number(v)])
          .filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y))
          .sort((a, b) => a[0] - b[0]);
        this.history = true;
      }
    } catch (e) {
      if (!(e instanceof HttpError) || ![400, 404, 405, 501].includes(e.status)) {
        $('chart-note').textContent = `History unavailable: ${e.message}`;
      }
    }
    if (id !== this.id || attr !== this.chartAttr) return;
    // The current value is the newest point in any case.
    const cur = this.entity && this.entity[attr];
    if (cur && typeof cur.value === 'number') {
      const at = cur.observedAt ? Date.parse(cur.observedAt) / 1000 : Date.now() / 1000;
      if (!points.length || points[points.length - 1][0] < at) points.push([at, cur.value]);
    }
    this.series = [points.map((p) => p[0]), points.map((p) => p[1])];
    $('chart-note').textContent = this.history
      ? `${points.length} points · last ${Math.min(points.length, 200)} values`
      : 'No history yet: showing live values since this panel opened.';
    document.body.dataset.chart = this.history ? 'history' : 'live';
    this.draw();
  }

  appendLive(e) {
    const cur = e[this.chartAttr];
    if (!cur || typeof cur.value !== 'number') return;
    const at = cur.observedAt ? Date.parse(cur.observedAt) / 1000 : Date.now() / 1000;
    const xs = this.series[0];
    if (xs.length && xs[xs.length - 1] >= at) return;
    this.series[0].push(at);
    this.series[1].push(cur.value);
    if (this.series[0].length > 400) { this.series[0].shift(); this.series[1].shift(); }
    if (this.plot) this.plot.setData(this.series); else this.draw();
  }

  draw() {
    if (this.plot) { this.plot.destroy(); this.plot = null; }
    const el = $('chart');
    el.replaceChildren();
    const type = this.entity ? (Array.isArray(this.entity.type) ? this.entity.type[0] : this.entity.type) : '';
    const color = this.colorOf(type);
    const unit = UNITS[this.entity?.[this.chartAttr]?.unitCode] ?? '';
    const axis = { stroke: '#8a9ab3', grid: { stroke: 'rgba(148,163,184,0.12)', width: 1 }, ticks: { stroke: 'rgba(148,163,184,0.2)' } };
    this.plot = new uPlot({
      width: Math.max(el.clientWidth, 300),
      height: 190,
      legend: { show: true },
      cursor: { points: { size: 6 } },
      scales: {
        // A lone point gets a ten-minute window instead of uPlot's years.
        x: { time: true, range: (u, min, max) => (max - min < 1 ? [min - 600, max + 60] : [min, max]) },
      },
      series: [
        {},
        { label: `${this.chartAttr}${unit ? ` (${unit})` : ''}`, stroke: color, width: 2, fill: `${color}22`, points: { show: this.series[0].length < 40, size: 5, fill: color } },
      ],
      axes: [axis, { ...axis, size: 50 }],
    }, this.series, el);
  }
}
