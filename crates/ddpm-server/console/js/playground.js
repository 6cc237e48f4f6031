// The sampling playground (#/playground): a form over POST /v1/samples, answered as
// Server-Sent Events so that the progress bar moves, previews sharpen and each image shows
// as soon as it is done; every image can be downloaded. "Same seed, different guidance"
// sends one request per guidance scale with the form's seed and shows what w does.
//
// The form's limits come from the API: the classes and T from GET /v1/model, the
// samplers, the sampler options' choices and the largest n from the served /openapi.json.
// The sampler options left at "server default" (or empty) are not sent, so the server's
// defaults apply.

import { get, post, stream } from './api.js';
import { banner, errorText, filledProgress, h, replace, setProgress } from './ui.js';

const MAX_SEED = 2 ** 32;

function pngUrl(base64) {
  const raw = atob(base64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return URL.createObjectURL(new Blob([bytes], { type: 'image/png' }));
}

function fileName(image, guidance) {
  const cls = (image.class ?? 'unconditional').replace(/[^\w.-]+/g, '_');
  return `ddpm-run${image.run_id}-step${image.step}-${cls}-seed${image.seed}-w${guidance}.png`;
}

// One image's place in the results: a preview while it is sampled, then the image and
// its download link.
function slot(label) {
  const img = h('img', { class: 'sample pending', alt: label });
  const caption = h('figcaption', {}, label);
  const figure = h('figure', { class: 'slot' }, img, caption);
  return {
    figure,
    preview(base64) {
      if (!img.classList.contains('pending')) return;
      img.src = pngUrl(base64);
      img.classList.add('preview');
    },
    done(image, guidance, text) {
      img.src = pngUrl(image.png_base64);
      img.classList.remove('pending', 'preview');
      img.alt = text;
      img.dataset.width = image.width;
      replace(caption, text, ' ', h('a', { href: img.src, download: fileName(image, guidance), class: 'download' }, 'download'));
    },
    failed(message) {
      img.classList.remove('pending', 'preview');
      replace(caption, h('span', { class: 'error-text' }, message));
    },
  };
}

async function limits() {
  const [info, doc] = await Promise.all([get('/v1/model'), get('/openapi.json').catch(() => null)]);
  const props = doc?.components?.schemas?.SampleRequest?.properties ?? {};
  const samplers = props.sampler?.enum ?? props.sampler?.oneOf?.flatMap((s) => s.enum ?? []) ?? [];
  const names = (prop, fallback) => {
    const listed = (props[prop]?.enum ?? []).filter((s) => typeof s === 'string');
    return listed.length ? listed : fallback;
  };
  return {
    info,
    spacings: names('timestep_spacing', ['leading', 'trailing', 'linspace']),
    variances: names('variance_type', ['fixed_small', 'fixed_large']),
    algorithms: names('algorithm_type', ['dpmsolver++', 'sde-dpmsolver++']),
    thresholdings: names('thresholding', ['none', 'static', 'dynamic']),
    samplers: samplers.filter((s) => typeof s === 'string').length ? samplers.filter((s) => typeof s === 'string') : ['ddim', 'ddpm', 'dpmpp_2m'],
    maxN: Number.isFinite(props.n?.maximum) ? props.n.maximum : 16,
  };
}

export function render(container) {
  let controller = null;
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading the model…'));
  container.append(h('div', { class: 'page-head' }, h('h1', {}, 'Playground')), body);

  limits().then(build, (e) => {
    replace(body, h('p', { class: 'error-text' },
      e.status === 503 ? 'No model is loaded yet: the server serves one once a checkpoint is registered.' : errorText(e)));
  });

  function build({ info, samplers, spacings, variances, algorithms, thresholdings, maxN }) {
    const field = (label, input, hint) => h('label', { class: 'field' }, h('span', {}, label), input, hint ? h('small', { class: 'muted' }, hint) : null);
    const classSelect = h('select', { name: 'class', id: 'pg-class' },
      info.classes.length ? info.classes.map((c, i) => h('option', { value: String(i) }, c)) : h('option', { value: '' }, 'unconditional'));
    const n = h('input', { name: 'n', id: 'pg-n', type: 'number', min: '1', max: String(maxN), value: '4', required: true });
    // Left at "server default", sampler and steps are not sent: the server's
    // --default-sampler and --default-steps apply.
    const sampler = h('select', { name: 'sampler', id: 'pg-sampler' },
      h('option', { value: '' }, 'server default'), samplers.map((s) => h('option', { value: s }, s)));
    const steps = h('input', { name: 'steps', id: 'pg-steps', type: 'number', min: '1', max: String(info.timesteps), placeholder: 'server default' });
    const guidance = h('input', { name: 'guidance', id: 'pg-guidance', type: 'number', min: '0', step: '0.1', value: '3', required: true });
    const seed = h('input', { name: 'seed', id: 'pg-seed', type: 'number', min: '0', step: '1', placeholder: 'random' });
    const dice = h('button', { type: 'button', class: 'small', title: 'A random seed', onclick: () => (seed.value = String(Math.floor(Math.random() * MAX_SEED))) }, 'random');
    const eta = h('input', { name: 'eta', id: 'pg-eta', type: 'number', min: '0', max: '1', step: '0.1', value: '0' });
    const choice = (name, id, values) => h('select', { name, id },
      h('option', { value: '' }, 'server default'), values.map((v) => h('option', { value: v }, v)));
    const spacing = choice('timestep_spacing', 'pg-spacing', spacings);
    const variance = choice('variance_type', 'pg-variance', variances);
    const algorithm = choice('algorithm_type', 'pg-algorithm', algorithms);
    const thresholding = choice('thresholding', 'pg-thresholding', thresholdings);
    const number = (name, id, attrs) => h('input', { name, id, type: 'number', placeholder: 'server default', ...attrs });
    const ratio = number('dynamic_thresholding_ratio', 'pg-threshold-ratio', { min: '0.01', max: '1', step: '0.005' });
    const maxValue = number('sample_max_value', 'pg-sample-max', { min: '1', max: '1000', step: '0.5' });
    const rescale = number('guidance_rescale', 'pg-rescale', { min: '0', max: '1', step: '0.1' });
    const last = String(info.timesteps - 1);
    const intervalLo = number('guidance_interval_lo', 'pg-interval-lo', { min: '0', max: last, step: '1', placeholder: 'from t' });
    const intervalHi = number('guidance_interval_hi', 'pg-interval-hi', { min: '0', max: last, step: '1', placeholder: 'to t' });
    const previews = h('input', { type: 'checkbox', id: 'pg-previews', checked: true });
    const go = h('button', { type: 'submit', id: 'generate' }, 'Generate');
    const stopButton = h('button', { type: 'button', id: 'stop', hidden: true, onclick: () => controller?.abort() }, 'Stop');
    const progress = filledProgress(0, 'idle');
    const statusLine = h('p', { class: 'muted small', id: 'pg-status' });
    const results = h('div', { class: 'results', id: 'results' });
    const strip = h('div', { class: 'results', id: 'guidance-strip' });
    const values = h('input', { id: 'pg-guidance-values', value: '0, 1, 2, 4, 7', 'aria-label': 'Guidance scales' });
    const compare = h('button', { type: 'button', id: 'compare-guidance', onclick: () => compareGuidance() }, 'Compare guidance');

    const syncEta = () => {
      eta.disabled = sampler.value !== 'ddim';
      // The variance is ddpm's (the server's default sampler may be ddpm).
      variance.disabled = sampler.value !== 'ddpm' && sampler.value !== '';
      algorithm.disabled = sampler.value !== 'dpmpp_2m' && sampler.value !== '';
      ratio.disabled = maxValue.disabled = thresholding.value !== 'dynamic';
    };
    sampler.addEventListener('change', syncEta);
    thresholding.addEventListener('change', syncEta);
    syncEta();

    function requestBody(overrides = {}) {
      const b = { n: Number(n.value), guidance_scale: Number(guidance.value) };
      if (sampler.value) b.sampler = sampler.value;
      if (steps.value !== '') b.steps = Number(steps.value);
      if (info.classes.length) b.class = Number(classSelect.value);
      if (seed.value !== '') b.seed = Number(seed.value);
      if (sampler.value === 'ddim') b.eta = Number(eta.value);
      if (spacing.value) b.timestep_spacing = spacing.value;
      if (variance.value && !variance.disabled) b.variance_type = variance.value;
      if (algorithm.value && !algorithm.disabled) b.algorithm_type = algorithm.value;
      if (thresholding.value) b.thresholding = thresholding.value;
      if (thresholding.value === 'dynamic' && ratio.value !== '') b.dynamic_thresholding_ratio = Number(ratio.value);
      if (thresholding.value === 'dynamic' && maxValue.value !== '') b.sample_max_value = Number(maxValue.value);
      if (rescale.value !== '') b.guidance_rescale = Number(rescale.value);
      if (intervalLo.value !== '' || intervalHi.value !== '') {
        b.guidance_interval = [Number(intervalLo.value || 0), Number(intervalHi.value || last)];
      }
      return { ...b, ...overrides };
    }

    async function generate(e) {
      e.preventDefault();
      controller?.abort();
      controller = new AbortController();
      const b = requestBody();
      if (previews.checked) b.preview_every = Math.max(1, Math.round((b.steps ?? 50) / 10));
      const slots = Array.from({ length: b.n }, (_, i) => slot(`image ${i + 1}`));
      replace(results, slots.map((s) => s.figure));
      setProgress(progress, 0, 'sending…');
      go.disabled = true;
      stopButton.hidden = false;
      let finished = false;
      try {
        await stream('/v1/samples', b, (event, data) => {
          if (event === 'queued') {
            statusLine.textContent = `request ${data.id}: ${data.position ? `${data.position} ahead in the queue` : 'started'}`;
          } else if (event === 'progress') {
            setProgress(progress, data.step / data.total, `step ${data.step} / ${data.total} · ${data.images_done} of ${data.images} images`);
          } else if (event === 'preview') {
            slots[data.index]?.preview(data.png_base64);
          } else if (event === 'image') {
            const label = `${data.class ?? 'image'} · seed ${data.seed}`;
            slots[data.index]?.done(data, b.guidance_scale, label);
          } else if (event === 'done') {
            finished = true;
            setProgress(progress, 1, `done: ${data.images} image${data.images === 1 ? '' : 's'}`);
          } else if (event === 'error') {
            finished = true;
            setProgress(progress, 0, 'failed');
            banner(`Sampling failed: ${data.message} (${data.code})`);
          }
        }, controller.signal);
        if (!finished) setProgress(progress, 0, 'the stream ended early');
      } catch (err) {
        if (err.name === 'AbortError') setProgress(progress, 0, 'stopped');
        else {
          setProgress(progress, 0, 'refused');
          banner(errorText(err) + (err.retryAfter ? `: retry in ${err.retryAfter} s` : ''));
        }
        slots.forEach((s) => s.failed(err.name === 'AbortError' ? 'stopped' : 'not generated'));
      } finally {
        go.disabled = false;
        stopButton.hidden = true;
      }
    }

    async function compareGuidance() {
      const ws = values.value.split(/[\s,]+/).filter(Boolean).map(Number);
      if (!ws.length || ws.some((w) => !Number.isFinite(w) || w < 0)) {
        banner('Guidance scales: numbers ≥ 0, separated by commas.');
        return;
      }
      if (seed.value === '') seed.value = String(Math.floor(Math.random() * MAX_SEED));
      const slots = ws.map((w) => slot(`w = ${w}`));
      replace(strip, slots.map((s) => s.figure));
      compare.disabled = true;
      // One request per scale, all at once: the server batches them step by step.
      await Promise.all(ws.map(async (w, i) => {
        try {
          const r = await post('/v1/samples', requestBody({ n: 1, guidance_scale: w }));
          slots[i].done(r.images[0], w, `w = ${w}`);
        } catch (err) {
          slots[i].failed(errorText(err));
        }
      }));
      compare.disabled = false;
    }

    replace(
      body,
      h('form', { id: 'playground-form', class: 'card form-grid', onsubmit: generate },
        field('Class', classSelect),
        field('Images (n)', n, `1–${maxN}`),
        field('Sampler', sampler),
        field('Steps', steps, `1–${info.timesteps}`),
        field('Guidance (w)', guidance, '0: unconditional'),
        field('Seed', h('span', { class: 'inline' }, seed, dice), 'image i uses seed + i'),
        field('η (DDIM)', eta, '0: deterministic'),
        field('Timestep spacing', spacing, 'diffusers’ timestep_spacing'),
        field('Variance (DDPM)', variance, 'σ²: fixed_small = β̃, fixed_large = β'),
        field('Solver (DPM++)', algorithm, 'sde-dpmsolver++: stochastic'),
        field('x̂₀ thresholding', thresholding, 'static: clamp to [−1, 1]'),
        field('Dynamic ratio', ratio, 'quantile of |x̂₀|, (0, 1]'),
        field('Dynamic max', maxValue, 'largest bound, ≥ 1'),
        field('Guidance rescale (φ)', rescale, '0–1, 0: none'),
        field('Guidance interval', h('span', { class: 'inline' }, intervalLo, intervalHi), `timesteps lo ≤ t ≤ hi, 0–${last}; empty: every step`),
        h('label', { class: 'field check' }, previews, h('span', {}, 'Show previews while sampling')),
        h('div', { class: 'actions' }, go, stopButton)),
      h('section', { class: 'card' }, progress, statusLine, results),
      h('section', { class: 'card' },
        h('h2', {}, 'Same seed, different guidance'),
        h('p', { class: 'muted small' }, 'One image per guidance scale, with the form’s class, seed, sampler and steps.'),
        h('div', { class: 'controls' }, h('label', {}, 'Scales ', values), compare),
        strip),
    );
  }

  return () => controller?.abort();
}
