// The runs list (#/runs?status=…&page=…): status, progress with an ETA, steps/s, the
// newest loss and the best checkpoint score, refreshed every few seconds.
//
// Per run it asks GET /v1/runs/{id}/metrics?max_points=1: the newest point and every
// checkpoint score. A run's answer is kept until the run's `updated_at` moves, so
// finished runs are asked once and only the training ones on each refresh.

import { get } from './api.js';
import { ago, bestScore, every, h, num, replace, runProgress, speed, statusBadge, time } from './ui.js';

const STATUSES = ['queued', 'running', 'completed', 'failed', 'interrupted', 'cancelled'];
const PAGE = 25;
const REFRESH_MS = 3000;

const summaries = new Map(); // run id -> { updated_at, point, scores }

async function summary(run) {
  const cached = summaries.get(run.id);
  if (cached && cached.updated_at === run.updated_at) return cached;
  const series = await get(`/v1/runs/${run.id}/metrics?max_points=1`);
  const fresh = { updated_at: run.updated_at, point: series.points.at(-1) ?? null, scores: series.scores };
  summaries.set(run.id, fresh);
  return fresh;
}

export function render(container, { params }) {
  const status = params.get('status') ?? '';
  const page = Math.max(0, Number(params.get('page') ?? 0) || 0);
  const filter = h(
    'select',
    {
      id: 'status-filter',
      'aria-label': 'Filter by status',
      onchange: (e) => {
        location.hash = e.target.value ? `#/runs?status=${e.target.value}` : '#/runs';
      },
    },
    h('option', { value: '' }, 'all statuses'),
    STATUSES.map((s) => h('option', { value: s, selected: s === status }, s)),
  );
  const body = h('tbody');
  const footer = h('div', { class: 'pager' });
  const updated = h('span', { class: 'muted small' });
  container.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Runs'), filter, updated),
    h(
      'div',
      { class: 'table-wrap' },
      h(
        'table',
        { id: 'runs', class: 'runs' },
        h(
          'thead',
          {},
          h('tr', {}, ['Run', 'Status', 'Progress', 'Steps/s', 'Loss', 'Best score', 'Started', 'Finished'].map((t) => h('th', {}, t))),
        ),
        body,
      ),
    ),
    footer,
  );

  const refresh = async () => {
    const q = new URLSearchParams({ limit: PAGE, offset: page * PAGE });
    if (status) q.set('status', status);
    const list = await get(`/v1/runs?${q}`);
    const rows = await Promise.all(list.runs.map(async (run) => row(run, await summary(run))));
    replace(body, rows.length ? rows : h('tr', {}, h('td', { colspan: 8, class: 'empty' }, emptyText(status))));
    replace(footer, pager(list, status, page));
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
  };
  return every(REFRESH_MS, refresh);
}

function emptyText(status) {
  return status
    ? `No ${status} runs.`
    : 'No runs yet: queue one with `ddpm-trainer submit RUN.toml` (see the README).';
}

function row(run, { point, scores }) {
  const { stepsPerSec, eta } = speed(run, point);
  const best = bestScore(scores);
  const link = `#/runs/${run.id}`;
  // data-label: a phone shows each row as a card of labelled values (app.css).
  return h(
    'tr',
    { dataset: { runId: run.id } },
    h('td', { 'data-label': 'Run' }, h('a', { href: link }, `#${run.id}`)),
    h('td', { class: 'status', 'data-label': 'Status' }, statusBadge(run.status), run.cancel_requested_at && run.status === 'running' ? ' cancelling' : ''),
    h('td', { class: 'progress-cell', 'data-label': 'Progress' }, runProgress(run, eta)),
    h('td', { class: 'num', 'data-label': 'Steps/s' }, stepsPerSec ? num(stepsPerSec) : '–'),
    h('td', { class: 'num loss', 'data-label': 'Loss' }, num(point?.loss_smoothed ?? point?.loss, 4)),
    h('td', { class: 'num', 'data-label': 'Best score' }, best ? h('span', { title: `checkpoint at step ${best.step}` }, best.label) : '–'),
    h('td', { title: time(run.started_at), 'data-label': 'Started' }, run.started_at ? ago(run.started_at) : '–'),
    h('td', { 'data-label': 'Finished' }, time(run.finished_at)),
  );
}

function pager(list, status, page) {
  const pages = Math.max(1, Math.ceil(list.total / PAGE));
  const href = (p) => {
    const q = new URLSearchParams();
    if (status) q.set('status', status);
    if (p) q.set('page', p);
    return `#/runs${q.size ? `?${q}` : ''}`;
  };
  return [
    h('span', {}, `${list.total} run${list.total === 1 ? '' : 's'} · page ${page + 1} of ${pages}`),
    page > 0 ? h('a', { href: href(page - 1) }, '← newer') : null,
    page + 1 < pages ? h('a', { href: href(page + 1) }, 'older →') : null,
  ];
}
