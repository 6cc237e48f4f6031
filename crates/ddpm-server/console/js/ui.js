// Small DOM and formatting helpers. Pages build elements with h(), never from HTML
// strings, so text from the API (run configs, file names, error messages) is never markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key in el && typeof value !== 'string') el[key] = value;
    else el.setAttribute(key, value === true ? '' : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// A message across the top of the page; `error` ones stay until the next navigation.
let bannerTimer = null;
export function banner(message, kind = 'error') {
  const el = document.getElementById('banner');
  clearTimeout(bannerTimer);
  if (!message) {
    el.hidden = true;
    return;
  }
  el.className = `banner ${kind}`;
  el.textContent = message;
  el.hidden = false;
  if (kind !== 'error') bannerTimer = setTimeout(() => (el.hidden = true), 4000);
}

export function errorText(e) {
  if (e && e.status) return `${e.message} (${e.status} ${e.code})`;
  return String(e?.message ?? e);
}

export function statusBadge(status) {
  return h('span', { class: `badge status-${status}` }, status);
}

export function progressBar(fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return h(
    'div',
    { class: 'progress', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': pct.toFixed(0) },
    h('div', { class: 'bar' }),
    h('span', { class: 'label' }, label ?? `${pct.toFixed(0)} %`),
  );
}

// Sets a progress bar's fill (through the CSSOM: the page's policy allows no style
// attributes in markup).
export function setProgress(el, fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  el.querySelector('.bar').style.width = `${pct}%`;
  el.setAttribute('aria-valuenow', pct.toFixed(0));
  if (label !== undefined) el.querySelector('.label').textContent = label;
  return el;
}

export function filledProgress(fraction, label) {
  return setProgress(progressBar(fraction, label), fraction, label);
}

// A run's progress bar: "current / total[unit]", and the time left while it trains.
export function runProgress(run, eta, unit = '') {
  const fraction = run.total_steps ? run.current_step / run.total_steps : 0;
  const left = eta !== null ? ` · ETA ${duration(eta)}` : '';
  return filledProgress(fraction, `${run.current_step} / ${run.total_steps}${unit}${left}`);
}

export function num(x, digits = 3) {
  if (x === null || x === undefined || !Number.isFinite(x)) return '–';
  const abs = Math.abs(x);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return x.toExponential(2);
  return Number(x.toPrecision(digits)).toString();
}

export function bytes(n) {
  if (!Number.isFinite(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '–';
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  const hours = Math.floor(seconds / 3600);
  if (hours < 48) return `${hours} h ${Math.round((seconds % 3600) / 60)} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

export function time(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
}

export function ago(iso) {
  if (!iso) return '';
  const seconds = (Date.now() - new Date(iso).getTime()) / 1000;
  return seconds < 5 ? 'just now' : `${duration(seconds)} ago`;
}

// A two-column table of label → value (values may be elements).
export function facts(rows) {
  return h(
    'dl',
    { class: 'facts' },
    rows.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v ?? '–')]),
  );
}

// Runs `f` now and every `ms` while the page is visible; returns the stop function.
export function every(ms, f) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await f();
      } catch (e) {
        if (e?.name !== 'AbortError') banner(errorText(e));
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

// The steps per second and the time left of a run, from its newest metric point (images
// per second over the logging window) and its batch size.
export function speed(run, point) {
  const batch = run?.config?.training?.batch_size;
  const ips = point?.images_per_sec;
  if (!batch || !ips) return { stepsPerSec: null, eta: null };
  const stepsPerSec = ips / batch;
  const left = run.total_steps - run.current_step;
  const eta = run.status === 'running' && left > 0 ? left / stepsPerSec : null;
  return { stepsPerSec, eta };
}

// The best score of a run's checkpoints: the lowest Fréchet distance, else the highest
// class accuracy.
export function bestScore(scores) {
  const fd = scores.filter((s) => Number.isFinite(s.fd));
  if (fd.length) {
    const best = fd.reduce((a, b) => (b.fd < a.fd ? b : a));
    return { label: `FD ${num(best.fd)}`, step: best.step, score: best };
  }
  const acc = scores.filter((s) => Number.isFinite(s.class_accuracy));
  if (acc.length) {
    const best = acc.reduce((a, b) => (b.class_accuracy > a.class_accuracy ? b : a));
    return { label: `acc ${(best.class_accuracy * 100).toFixed(0)} %`, step: best.step, score: best };
  }
  return null;
}
