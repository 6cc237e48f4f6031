// The model being served (#/model): GET /v1/model, refreshed so that a hot swap to a
// newer or promoted checkpoint shows up.

import { get } from './api.js';
import { errorText, every, facts, h, replace, time } from './ui.js';

export function render(container) {
  const body = h('section', { class: 'card', id: 'model' });
  container.append(h('div', { class: 'page-head' }, h('h1', {}, 'Model')), body);
  return every(5000, async () => {
    let info;
    try {
      info = await get('/v1/model');
    } catch (e) {
      replace(body, h('p', { class: 'muted' },
        e.status === 503 ? 'No model is loaded yet: the server loads one once a checkpoint is registered.' : errorText(e)));
      return;
    }
    replace(
      body,
      facts([
        ['Checkpoint', `#${info.checkpoint_id}`],
        ['Run', h('a', { href: `#/runs/${info.run_id}` }, `#${info.run_id}`)],
        ['Step', info.step],
        ['Device', h('span', { id: 'model-device' }, info.device)],
        ['Classes', info.classes.length ? h('ol', { class: 'classes', start: '0' }, info.classes.map((c) => h('li', {}, c))) : 'unconditional'],
        ['Image', `${info.image_size} × ${info.image_size}, ${info.channels} channel${info.channels === 1 ? '' : 's'}`],
        ['Timesteps (T)', info.timesteps],
        ['Parameters', info.parameters.toLocaleString()],
        ['File', h('code', {}, info.checkpoint_path)],
        ['Written', time(info.checkpoint_created_at)],
        ['Loaded', time(info.loaded_at)],
      ]),
    );
  });
}
