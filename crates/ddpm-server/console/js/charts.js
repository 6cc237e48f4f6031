// A run's metric charts (uPlot): loss, learning rate, gradient norm, images/s and, once
// checkpoints are scored, their Fréchet distance. Controls: smoothing, the x axis (step,
// time since the run's first point, wall clock), zoom (drag across a chart; the range is
// fetched again, so zooming shows full detail however long the run), log scale, and other
// runs overlaid.
//
// Each run's series is GET /v1/runs/{id}/metrics?max_points=…, which the server
// downsamples: the browser never holds more than MAX_POINTS points per run and chart.

import { get } from './api.js';
import { banner, errorText, h, num, replace } from './ui.js';

const MAX_POINTS = 1000;
const COLOURS = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#be185d', '#4d7c0f'];
const SETTINGS_KEY = 'ddpm.charts';

const CHARTS = [
  { id: 'loss', title: 'Loss (ε-MSE)', value: (p) => p.loss, smooth: true, log: true },
  { id: 'lr', title: 'Learning rate', value: (p) => p.learning_rate, smooth: false },
  { id: 'grad', title: 'Gradient norm', value: (p) => p.grad_norm, smooth: true },
  { id: 'ips', title: 'Images / s', value: (p) => p.images_per_sec, smooth: true },
];

function loadSettings() {
  try {
    return { smoothing: 0.6, axis: 'step', log: false, ...JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? '{}') };
  } catch {
    return { smoothing: 0.6, axis: 'step', log: false };
  }
}

// TensorBoard's smoothing: an exponential moving average, debiased so that the first
// points are not pulled towards zero. Gaps (null) are carried over, not smoothed through.
export function smooth(values, weight) {
  if (!weight) return values;
  let last = 0;
  let n = 0;
  return values.map((v) => {
    if (v === null || v === undefined || !Number.isFinite(v)) return null;
    last = last * weight + (1 - weight) * v;
    n++;
    return last / (1 - weight ** n);
  });
}

// The x value of each point on the chosen axis.
function xs(series, axis) {
  const points = series.points;
  if (axis === 'step') return points.map((p) => p.step);
  const t = points.map((p) => new Date(p.recorded_at).getTime() / 1000);
  if (axis === 'wall') return t;
  const t0 = series.t0 ?? t[0] ?? 0;
  return t.map((x) => (x - t0) / 3600);
}

// The steps of `series` whose x falls in [a, b], widened by one point on each side so
// that the zoomed chart still reaches its edges.
function stepRange(series, axis, a, b) {
  const x = xs(series, axis);
  let first = x.findIndex((v) => v >= a);
  let last = x.findLastIndex((v) => v <= b);
  if (first < 0 || last < 0 || last < first) return null;
  first = Math.max(0, first - 1);
  last = Math.min(x.length - 1, last + 1);
  return [series.points[first].step, series.points[last].step];
}

export function metricCharts(run) {
  const settings = loadSettings();
  const state = { range: null, overlays: new Set(), series: new Map(), t0: new Map() };
  const plots = new Map(); // chart id -> { plot, key }
  const grid = h('div', { class: 'charts' });
  const zoomNote = h('span', { class: 'muted small' });

  const save = () => localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
  const smoothing = h('input', {
    type: 'range', min: '0', max: '0.99', step: '0.01', value: String(settings.smoothing), id: 'smoothing',
    oninput: (e) => {
      settings.smoothing = Number(e.target.value);
      smoothingValue.textContent = settings.smoothing.toFixed(2);
      save();
      draw();
    },
  });
  const smoothingValue = h('output', {}, settings.smoothing.toFixed(2));
  const axis = h(
    'select',
    {
      id: 'x-axis', 'aria-label': 'x axis',
      onchange: (e) => {
        settings.axis = e.target.value;
        save();
        state.range = null;
        reload();
      },
    },
    [['step', 'step'], ['relative', 'hours since start'], ['wall', 'wall clock']].map(([v, t]) =>
      h('option', { value: v, selected: settings.axis === v }, t)),
  );
  const log = h('input', {
    type: 'checkbox', id: 'log-loss', checked: settings.log,
    onchange: (e) => {
      settings.log = e.target.checked;
      save();
      draw();
    },
  });
  const resetZoom = h('button', { type: 'button', id: 'reset-zoom', class: 'small', hidden: true, onclick: () => { state.range = null; reload(); } }, 'Reset zoom');
  const overlayList = h('div', { class: 'overlay-list' });
  const overlays = h('details', { class: 'overlays' }, h('summary', {}, 'Compare runs'), overlayList);

  const element = h(
    'section',
    { class: 'card', id: 'metrics' },
    h('h2', {}, 'Training'),
    h(
      'div',
      { class: 'controls' },
      h('label', {}, 'Smoothing ', smoothing, ' ', smoothingValue),
      h('label', {}, 'x axis ', axis),
      h('label', {}, log, ' log-scale loss'),
      resetZoom,
      zoomNote,
    ),
    overlays,
    grid,
  );

  function listOverlays(runs) {
    replace(
      overlayList,
      runs.filter((r) => r.id !== run.id).map((r) =>
        h('label', { class: 'overlay' },
          h('input', {
            type: 'checkbox', value: String(r.id), checked: state.overlays.has(r.id),
            onchange: (e) => {
              if (e.target.checked) state.overlays.add(r.id);
              else state.overlays.delete(r.id);
              reload();
            },
          }),
          ` #${r.id} ${r.status} (${r.current_step} steps)`)),
    );
    if (!overlayList.childElementCount) overlayList.append(h('p', { class: 'muted small' }, 'No other runs.'));
  }

  async function fetchSeries(id) {
    const q = new URLSearchParams({ max_points: MAX_POINTS });
    const r = state.range?.get(id);
    if (r) {
      q.set('from_step', r[0]);
      q.set('to_step', r[1]);
    }
    const series = await get(`/v1/runs/${id}/metrics?${q}`);
    // Relative time counts from the run's first point, also while zoomed.
    if (!r && series.points.length) state.t0.set(id, new Date(series.points[0].recorded_at).getTime() / 1000);
    series.t0 = state.t0.get(id);
    return series;
  }

  async function reload() {
    const ids = [run.id, ...state.overlays];
    const all = await Promise.all(ids.map((id) => fetchSeries(id).then((s) => [id, s])));
    state.series = new Map(all);
    resetZoom.hidden = !state.range;
    zoomNote.textContent = state.range ? '' : 'Drag across a chart to zoom; double-click to reset.';
    draw();
    // When the charts first stood on the page, for DevTools' timeline (and the tests).
    if (!performance.getEntriesByName('ddpm:charts-drawn').length) performance.mark('ddpm:charts-drawn');
  }

  function zoomTo(a, b) {
    if (!(b > a)) return;
    const range = new Map();
    for (const [id, series] of state.series) {
      const r = stepRange(series, settings.axis, a, b);
      if (r) range.set(id, r);
    }
    if (!range.size) return;
    state.range = range;
    reload().catch((e) => banner(errorText(e)));
  }

  function chartData(spec) {
    // One [x, y…] table per run, joined on x (runs log at different steps and times).
    const tables = [];
    const series = [{}];
    for (const [i, [id, s]] of [...state.series].entries()) {
      if (!s.points.length) continue;
      const colour = COLOURS[i % COLOURS.length];
      const x = xs(s, settings.axis);
      const raw = s.points.map((p) => spec.value(p) ?? null);
      const ys = [];
      const name = id === run.id ? '' : `#${id} `;
      if (spec.smooth && settings.smoothing > 0) {
        if (id === run.id) {
          ys.push(raw);
          series.push({ label: `${name}raw`, stroke: `${colour}55`, width: 1, spanGaps: true });
        }
        ys.push(smooth(raw, settings.smoothing));
        series.push({ label: `${name}smoothed`, stroke: colour, width: 2, spanGaps: true });
      } else {
        ys.push(raw);
        series.push({ label: id === run.id ? spec.title : `#${id}`, stroke: colour, width: id === run.id ? 2 : 1.5, spanGaps: true });
      }
      tables.push([x, ...ys]);
    }
    if (!tables.length) return null;
    const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
    return { data, series };
  }

  function scoreData() {
    const tables = [];
    const series = [{}];
    for (const [i, [id, s]] of [...state.series].entries()) {
      const scores = s.scores.filter((c) => Number.isFinite(c.fd));
      if (!scores.length) continue;
      const colour = COLOURS[i % COLOURS.length];
      const x = scores.map((c) => {
        if (settings.axis === 'step') return c.step;
        const t = new Date(c.created_at).getTime() / 1000;
        return settings.axis === 'wall' ? t : (t - (s.t0 ?? t)) / 3600;
      });
      tables.push([x, scores.map((c) => c.fd)]);
      series.push({
        label: id === run.id ? 'FD' : `#${id} FD`, stroke: colour, width: 1.5, spanGaps: true,
        points: { show: true, size: 7, fill: colour },
      });
    }
    if (!tables.length) return null;
    return { data: tables.length === 1 ? tables[0] : uPlot.join(tables), series };
  }

  // Draws every chart: new data into a chart whose series are unchanged, a new chart
  // where they changed (another axis, scale, overlay or smoothing on or off).
  function draw() {
    const specs = [...CHARTS.map((c) => ({ ...c, build: () => chartData(c) })),
      { id: 'fd', title: 'Checkpoint FD (lower is better)', build: scoreData }];
    const wanted = new Set();
    for (const spec of specs) {
      const built = spec.build();
      if (!built) continue;
      wanted.add(spec.id);
      const logY = spec.log && settings.log;
      const key = JSON.stringify([settings.axis, logY, built.series.map((s) => s.label)]);
      const existing = plots.get(spec.id);
      if (existing && existing.key === key) {
        existing.plot.setData(built.data);
        continue;
      }
      if (existing) existing.plot.destroy();
      let box = grid.querySelector(`#chart-${spec.id}`);
      if (!box) {
        box = h('figure', { class: 'chart', id: `chart-${spec.id}` }, h('figcaption', {}, spec.title));
        grid.append(box);
      }
      box.querySelector('.uplot')?.remove();
      const plot = new uPlot(options(spec, built.series, logY, box), built.data, box);
      plots.set(spec.id, { plot, key });
    }
    for (const [id, { plot }] of plots) {
      if (wanted.has(id)) continue;
      plot.destroy();
      plots.delete(id);
      grid.querySelector(`#chart-${id}`)?.remove();
    }
    if (!wanted.size) replace(grid, h('p', { class: 'muted' }, 'No metrics recorded yet.'));
    else grid.querySelector(':scope > p')?.remove();
  }

  function options(spec, series, logY, box) {
    const time = settings.axis === 'wall';
    const xLabel = { step: 'step', relative: 'hours', wall: 'time' }[settings.axis];
    return {
      width: Math.max(240, box.clientWidth || grid.clientWidth || 320),
      height: 220,
      series: [{ label: xLabel }, ...series.slice(1)],
      scales: {
        x: { time },
        y: logY ? { distr: 3 } : {},
      },
      axes: [
        { label: settings.axis === 'wall' ? undefined : xLabel, size: 40 },
        { size: 60, values: (u, splits) => splits.map((v) => num(v, 4)) },
      ],
      legend: { live: true },
      cursor: {
        sync: { key: `run-${run.id}` },
        drag: { x: true, y: false, setScale: false },
      },
      hooks: {
        setSelect: [
          (u) => {
            if (u.select.width < 4) return;
            const a = u.posToVal(u.select.left, 'x');
            const b = u.posToVal(u.select.left + u.select.width, 'x');
            u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
            zoomTo(a, b);
          },
        ],
        ready: [
          (u) => u.over.addEventListener('dblclick', () => {
            if (state.range) {
              state.range = null;
              reload().catch((e) => banner(errorText(e)));
            }
          }),
        ],
      },
    };
  }

  // Charts follow their column's width (the page reflows from desktop to phone).
  const resize = new ResizeObserver(() => {
    for (const [id, { plot }] of plots) {
      const box = grid.querySelector(`#chart-${id}`);
      const width = Math.max(240, box?.clientWidth ?? 0);
      if (width && Math.abs(width - plot.width) > 2) plot.setSize({ width, height: 220 });
    }
  });
  resize.observe(grid);

  return {
    element,
    // Fetches again (not while zoomed: a live refresh would undo the zoom).
    refresh: async () => {
      if (!state.range) await reload();
    },
    reload,
    listOverlays,
    destroy: () => {
      resize.disconnect();
      for (const { plot } of plots.values()) plot.destroy();
      plots.clear();
    },
  };
}
