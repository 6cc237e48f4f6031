// A run's checkpoints: the EMA ones as a strip of the sample grids the trainer drew with
// them, a step slider, and the selected one large with its size, SHA-256, scores, whether
// it is being served, and Promote (run control: the API asks for the token). Training
// states, which are never served, are listed below.

import { imageUrl, post } from './api.js';
import { banner, bytes, errorText, facts, h, num, replace, time } from './ui.js';

const gridPath = (c) => `/v1/checkpoints/${c.id}/grid.png`;

// Loads a grid into `img` (with the token); a checkpoint without one says so.
async function loadGrid(img, c) {
  try {
    img.src = await imageUrl(gridPath(c));
  } catch (e) {
    img.replaceWith(h('div', { class: 'no-grid' }, e.status === 404 ? 'no grid' : 'grid unavailable'));
  }
}

function scoreFacts(score) {
  if (!score) return h('p', { class: 'muted small' }, 'Not scored.');
  const pct = (x) => (Number.isFinite(x) ? `${(x * 100).toFixed(1)} %` : '–');
  return facts([
    ['Class accuracy', pct(score.class_accuracy)],
    ['FD', `${num(score.fd)} (floor ${num(score.fd_floor)})`],
    ['KID', `${num(score.kid)} ± ${num(score.kid_std)}`],
    ['Diversity', num(score.diversity)],
    ['Probe accuracy', pct(score.probe_accuracy)],
    ['Samples', `${score.samples_per_class} per class vs ${score.holdout_images} held out`],
    ['Scored in', `${num(score.seconds)} s`],
  ]);
}

export function checkpointStrip(run, { onPromoted }) {
  const state = { ema: [], states: [], selected: -1, servedId: null, seen: '' };
  const slider = h('input', {
    type: 'range', min: '0', max: '0', value: '0', id: 'checkpoint-slider', 'aria-label': 'Checkpoint step',
    oninput: (e) => select(Number(e.target.value)),
  });
  const sliderLabel = h('output', { id: 'checkpoint-step' });
  const strip = h('div', { class: 'strip', id: 'checkpoint-strip' });
  const detail = h('div', { class: 'checkpoint-detail' });
  const statesBox = h('div');
  const element = h(
    'section',
    { class: 'card', id: 'checkpoints' },
    h('h2', {}, 'Checkpoints'),
    h('div', { class: 'controls' }, h('label', {}, 'Step ', slider, ' ', sliderLabel)),
    strip,
    detail,
    statesBox,
  );

  // Thumbnails load when they scroll into view: a long run has hundreds.
  const lazy = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      lazy.unobserve(entry.target);
      const c = state.ema[Number(entry.target.dataset.index)];
      if (c) loadGrid(entry.target, c);
    }
  }, { root: strip, rootMargin: '200px' });

  function select(i) {
    if (!state.ema.length) return;
    state.selected = Math.max(0, Math.min(state.ema.length - 1, i));
    slider.value = String(state.selected);
    const c = state.ema[state.selected];
    sliderLabel.textContent = `${c.step}`;
    for (const thumb of strip.children) thumb.classList.toggle('selected', Number(thumb.dataset.index) === state.selected);
    // Bring the thumbnail into the strip's view without scrolling the page to it.
    const thumb = strip.children[state.selected];
    if (thumb) strip.scrollLeft = thumb.offsetLeft - strip.offsetLeft - (strip.clientWidth - thumb.offsetWidth) / 2;
    const big = h('img', { class: 'grid-main', alt: `Sample grid at step ${c.step}`, dataset: { checkpointId: c.id } });
    loadGrid(big, c);
    const serving = c.id === state.servedId;
    replace(
      detail,
      h('div', { class: 'grid-frame' }, big),
      h(
        'div',
        { class: 'checkpoint-facts' },
        h('h3', {}, `Step ${c.step} `, serving ? h('span', { class: 'badge serving' }, 'serving') : null),
        facts([
          ['Checkpoint', `#${c.id} (${c.kind})`],
          ['Written', time(c.created_at)],
          ['Size', bytes(c.size_bytes)],
          ['SHA-256', h('code', { class: 'sha' }, c.sha256)],
          ['File', h('code', {}, c.path)],
        ]),
        h('h4', {}, 'Scores'),
        scoreFacts(c.score),
        h('div', { class: 'actions' },
          // Also for the served checkpoint: a promotion is what servers with
          // --serve-policy promoted follow, whatever this one serves now.
          h('button', { type: 'button', id: 'promote', onclick: () => promote(c) }, 'Promote…')),
      ),
    );
  }

  async function promote(c) {
    const reason = prompt(`Why serve checkpoint #${c.id} (step ${c.step})? Recorded with the promotion.`);
    if (!reason || !reason.trim()) return;
    try {
      await post(`/v1/checkpoints/${c.id}/promote`, { reason: reason.trim(), by: 'console' });
      banner(`Checkpoint #${c.id} promoted: servers with --serve-policy promoted swap to it.`, 'info');
      onPromoted?.();
    } catch (e) {
      banner(`Promote failed: ${errorText(e)}`);
    }
  }

  function update(list, servedId) {
    const ema = list.checkpoints.filter((c) => c.kind === 'ema');
    const states = list.checkpoints.filter((c) => c.kind !== 'ema');
    const seen = JSON.stringify([list.checkpoints.map((c) => [c.id, c.score?.step]), servedId]);
    if (seen === state.seen) return; // nothing new: keep the user's place
    const wasNewest = state.selected === state.ema.length - 1;
    const selectedId = state.ema[state.selected]?.id;
    Object.assign(state, { ema, states, servedId, seen });
    slider.max = String(Math.max(0, ema.length - 1));
    slider.disabled = ema.length < 2;
    replace(
      strip,
      ema.map((c, i) =>
        h('button', { type: 'button', class: 'thumb', dataset: { index: i }, onclick: () => select(i), title: `step ${c.step}` },
          h('img', { alt: `step ${c.step}`, dataset: { index: i } }),
          h('span', {}, `${c.step}`, c.id === servedId ? ' ●' : ''))),
    );
    for (const img of strip.querySelectorAll('img')) lazy.observe(img);
    if (!ema.length) {
      replace(detail, h('p', { class: 'muted' }, 'No EMA checkpoints yet.'));
      sliderLabel.textContent = '';
    } else {
      const keep = ema.findIndex((c) => c.id === selectedId);
      select(wasNewest || keep < 0 ? ema.length - 1 : keep);
    }
    replace(
      statesBox,
      states.length
        ? h('details', {}, h('summary', {}, `Training states (${states.length}), kept for resuming`),
          h('div', { class: 'table-wrap' }, h('table', {},
            h('thead', {}, h('tr', {}, ['Step', 'Size', 'Written', 'SHA-256'].map((t) => h('th', {}, t)))),
            h('tbody', {}, states.map((c) => h('tr', {},
              h('td', {}, c.step), h('td', {}, bytes(c.size_bytes)), h('td', {}, time(c.created_at)),
              h('td', {}, h('code', { class: 'sha' }, c.sha256.slice(0, 16) + '…'))))))))
        : null,
    );
  }

  return { element, update, destroy: () => lazy.disconnect() };
}
