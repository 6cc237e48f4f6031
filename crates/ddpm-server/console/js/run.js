// One run (#/runs/{id}): status and progress, the operator's actions (cancel, resume,
// restart from scratch: run control, which the API guards with the token), the checkpoint
// being served, the metric charts, the checkpoint strip, and the config and dataset.
// While the run trains, everything is refreshed every few seconds.

import { get, request } from './api.js';
import { metricCharts } from './charts.js';
import { checkpointStrip } from './checkpoints.js';
import {
  banner, bestScore, errorText, every, facts, h, num, replace, runProgress, speed, statusBadge, time,
} from './ui.js';

const REFRESH_MS = 5000;
const ACTIVE = new Set(['queued', 'running']);

// The newest attempt's rank processes as `ddpm-trainer runs show` writes them:
// "2 ranks (cuda:0, cuda:1)"; null (no attempt has recorded one) shows as '–'.
function worldText(world) {
  if (!world) return null;
  return `${world.size} ${world.size === 1 ? 'rank' : 'ranks'} (${world.devices.join(', ')})`;
}

export function render(container, { id }) {
  const head = h('div', { class: 'page-head' });
  const summary = h('section', { class: 'card', id: 'run-summary' });
  const served = h('p', { class: 'served', id: 'served' });
  const configBox = h('section', { class: 'card', id: 'run-config' });
  let charts = null;
  let strip = null;
  let lastStatus = null;
  let configShown = false;
  container.append(head, summary, served);

  const model = () => get('/v1/model').catch((e) => (e.status === 503 ? null : Promise.reject(e)));

  async function act(label, path, body, confirmText) {
    if (confirmText && !confirm(confirmText)) return;
    try {
      await request(path, { method: 'POST', body });
      banner(`${label}: done.`, 'info');
      await refresh(true);
    } catch (e) {
      banner(`${label} failed: ${errorText(e)}`);
    }
  }

  function actions(run) {
    const buttons = [];
    if (ACTIVE.has(run.status) && !run.cancel_requested_at) {
      buttons.push(h('button', { type: 'button', id: 'cancel-run', onclick: () => act('Cancel', `/v1/runs/${id}/cancel`, undefined, `Cancel run #${id}? A running run saves a training state first.`) }, 'Cancel'));
    }
    if (['failed', 'cancelled', 'interrupted'].includes(run.status)) {
      buttons.push(h('button', { type: 'button', id: 'resume-run', onclick: () => act('Resume', `/v1/runs/${id}/restart`, {}) }, 'Resume'));
    }
    if (!ACTIVE.has(run.status)) {
      buttons.push(h('button', {
        type: 'button', class: 'danger', id: 'restart-run',
        onclick: () => act('Restart from scratch', `/v1/runs/${id}/restart`, { from_scratch: true },
          `Restart run #${id} from step 0? Its checkpoints and metrics are deleted.`),
      }, 'Restart from scratch'));
    }
    return h('div', { class: 'actions' }, buttons);
  }

  function showSummary(run, point, scores) {
    const { stepsPerSec, eta } = speed(run, point);
    const best = bestScore(scores);
    replace(head, h('h1', {}, `Run #${run.id}`), statusBadge(run.status),
      run.cancel_requested_at && run.status === 'running' ? h('span', { class: 'muted' }, 'cancelling…') : null,
      actions(run));
    replace(
      summary,
      runProgress(run, eta, ' steps'),
      facts([
        ['Loss', point ? `${num(point.loss, 4)}${point.loss_smoothed != null ? ` (smoothed ${num(point.loss_smoothed, 4)})` : ''} at step ${point.step}` : '–'],
        ['Speed', stepsPerSec ? `${num(stepsPerSec)} steps/s · ${num(point.images_per_sec)} images/s` : '–'],
        ['Best score', best ? `${best.label} at step ${best.step}` : '–'],
        ['Created', time(run.created_at)],
        ['Started', time(run.started_at)],
        ['Finished', time(run.finished_at)],
        ['Worker', run.host ? `${run.host} (attempt ${run.attempts}${run.crashes ? `, ${run.crashes} crash take-overs` : ''})` : '–'],
        ['World', worldText(run.world)],
        run.launch_key ? ['Launch key', h('code', {}, run.launch_key)] : null,
        run.error ? ['Error', h('span', { class: 'error-text' }, run.error)] : null,
        run.retry_at ? ['Retry at', time(run.retry_at)] : null,
      ]),
    );
  }

  function showServed(info) {
    if (!info) {
      replace(served, 'No model is loaded on this server yet.');
    } else if (info.run_id === id) {
      replace(served, 'Serving this run’s checkpoint #', String(info.checkpoint_id), ` (step ${info.step}) on ${info.device}.`);
    } else {
      replace(served, 'Serving checkpoint #', String(info.checkpoint_id), ' of ',
        h('a', { href: `#/runs/${info.run_id}` }, `run #${info.run_id}`), ` (step ${info.step}).`);
    }
  }

  function showConfig(run) {
    const c = run.config ?? {};
    const d = run.dataset ?? {};
    const t = c.training ?? {};
    const m = c.model ?? {};
    const classes = (d.class_names ?? []).map((name, i) => `${name} (${d.class_counts?.[i] ?? '?'})`).join(', ');
    replace(
      configBox,
      h('h2', {}, 'Config and dataset'),
      h('div', { class: 'two-col' },
        facts([
          ['Preset', c.preset],
          ['Steps', t.steps ?? run.total_steps],
          ['Batch size', t.batch_size],
          ['Learning rate', t.lr ?? t.learning_rate],
          ['Image size', m.image_size],
          ['Base channels', m.base_channels ?? m.channels],
          ['Timesteps (T)', c.schedule?.timesteps],
        ]),
        facts([
          ['Dataset', h('code', {}, d.path ?? c.dataset?.path ?? '–')],
          ['Images', d.image_count],
          ['Classes', classes || 'unconditional'],
          ['Skipped', `${d.skipped_count ?? 0} files or folders`],
        ])),
      d.skipped?.length
        ? h('details', { id: 'skipped' }, h('summary', {}, `Skipped (first ${d.skipped.length} of ${d.skipped_count})`),
          h('ul', { class: 'skipped' }, d.skipped.map((s) => h('li', {}, h('code', {}, s.path), `: ${s.reason}`))))
        : null,
      h('details', {}, h('summary', {}, 'Full config (JSON)'), h('pre', { class: 'json' }, JSON.stringify(c, null, 2))),
    );
  }

  async function refresh(force = false) {
    const [run, info, list, latest] = await Promise.all([
      get(`/v1/runs/${id}`),
      model(),
      get(`/v1/runs/${id}/checkpoints`),
      get(`/v1/runs/${id}/metrics?max_points=1`),
    ]);
    showSummary(run, latest.points.at(-1), latest.scores);
    showServed(info);
    if (!charts) {
      charts = metricCharts(run);
      strip = checkpointStrip(run, { onPromoted: () => refresh(true) });
      container.append(charts.element, strip.element, configBox);
      get('/v1/runs?limit=50').then((r) => charts.listOverlays(r.runs)).catch(() => {});
      await charts.reload();
    } else if (ACTIVE.has(run.status) || run.status !== lastStatus || force) {
      await charts.refresh();
    }
    strip.update(list, info?.checkpoint_id ?? null);
    if (!configShown || run.status !== lastStatus) showConfig(run);
    configShown = true;
    lastStatus = run.status;
  }

  const stop = every(REFRESH_MS, async () => {
    try {
      await refresh();
    } catch (e) {
      if (e.status === 404) {
        stop();
        replace(container, h('p', {}, `Run #${id} does not exist (deleted?). `, h('a', { href: '#/runs' }, 'All runs')));
        return;
      }
      throw e;
    }
  });
  return () => {
    stop();
    charts?.destroy();
    strip?.destroy();
  };
}
