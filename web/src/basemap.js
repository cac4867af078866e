// The offline base layer: drawn in the browser, no tile server needed. A dark
// ground with a graticule whose spacing follows the zoom, so that distances
// and movement read clearly. An online raster layer (OSM) replaces it when the
// server is started with --map-tiles.

const STEPS = [10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001];

function stepFor(zoom) {
  // About four minor lines per 256-pixel tile.
  const degPerTile = 360 / Math.pow(2, zoom);
  return STEPS.find((s) => s <= degPerTile / 4) || STEPS[STEPS.length - 1];
}

export function offlineLayer(L) {
  const Grid = L.GridLayer.extend({
    createTile(coords) {
      const tile = document.createElement('canvas');
      const size = this.getTileSize();
      const ratio = window.devicePixelRatio || 1;
      tile.width = size.x * ratio;
      tile.height = size.y * ratio;
      const ctx = tile.getContext('2d');
      ctx.scale(ratio, ratio);
      const g = ctx.createLinearGradient(0, 0, size.x, size.y);
      g.addColorStop(0, '#0c1526');
      g.addColorStop(1, '#0a1220');
      ctx.fillStyle = g;
      ctx.fillRect(0, 0, size.x, size.y);
      const map = this._map;
      const z = coords.z;
      const nw = map.unproject([coords.x * size.x, coords.y * size.y], z);
      const se = map.unproject([(coords.x + 1) * size.x, (coords.y + 1) * size.y], z);
      const step = stepFor(z);
      const major = step * 5;
      const line = (isMajor) => {
        ctx.strokeStyle = isMajor ? 'rgba(56,189,248,0.16)' : 'rgba(148,163,184,0.07)';
        ctx.lineWidth = isMajor ? 1 : 1;
      };
      const near = (v, m) => Math.abs(v / m - Math.round(v / m)) < 1e-6;
      for (let lon = Math.ceil(nw.lng / step) * step; lon <= se.lng; lon += step) {
        const p = map.project([nw.lat, lon], z).x - coords.x * size.x;
        line(near(lon, major));
        ctx.beginPath(); ctx.moveTo(p + 0.5, 0); ctx.lineTo(p + 0.5, size.y); ctx.stroke();
      }
      for (let lat = Math.ceil(se.lat / step) * step; lat <= nw.lat; lat += step) {
        const p = map.project([lat, nw.lng], z).y - coords.y * size.y;
        line(near(lat, major));
        ctx.beginPath(); ctx.moveTo(0, p + 0.5); ctx.lineTo(size.x, p + 0.5); ctx.stroke();
      }
      return tile;
    },
  });
  return new Grid({ attribution: 'Offline base layer', maxZoom: 20 });
}
