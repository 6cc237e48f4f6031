// The console's shell: the token dialog and the router. Pages live in the URL's fragment
// (#/runs, #/runs/7, #/playground, #/model), so the server serves one page and links,
// reloads and the back button work without it.
//
// Each page module exports render(container, params) and returns a cleanup function that
// stops its polling, streams and charts when the user leaves.

import { forgetToken, onTokenChange, setToken, setTokenPrompt, token } from './api.js';
import { banner } from './ui.js';
import * as runs from './runs.js';
import * as run from './run.js';
import * as playground from './playground.js';
import * as model from './model.js';

const routes = [
  [/^#?\/?(?:runs)?$/, 'runs', runs.render],
  [/^#\/runs\/(\d+)$/, 'runs', run.render],
  [/^#\/playground$/, 'playground', playground.render],
  [/^#\/model$/, 'model', model.render],
];

let cleanup = null;

function route() {
  const [path, query] = location.hash.split('?');
  const params = new URLSearchParams(query ?? '');
  if (cleanup) cleanup();
  cleanup = null;
  banner(null);
  const page = document.getElementById('page');
  for (const [pattern, nav, render] of routes) {
    const match = pattern.exec(path);
    if (!match) continue;
    for (const a of document.querySelectorAll('[data-nav]')) {
      a.classList.toggle('active', a.dataset.nav === nav);
    }
    page.replaceChildren();
    cleanup = render(page, { id: match[1] ? Number(match[1]) : null, params }) ?? null;
    return;
  }
  page.textContent = 'No such page.';
}

// The token dialog. `refused`: a token was sent and the server answered 401.
function promptForToken(refused) {
  const dialog = document.getElementById('token-dialog');
  const message = document.getElementById('token-message');
  const input = document.getElementById('token-input');
  const form = document.getElementById('token-form');
  message.textContent = refused
    ? 'The server refused this token (401 unauthorized). Check it and enter it again.'
    : 'This server needs its API token.';
  message.classList.toggle('error', refused);
  input.value = '';
  return new Promise((resolve) => {
    const submit = (e) => {
      e.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      form.removeEventListener('submit', submit);
      dialog.close();
      setToken(value);
      resolve();
    };
    form.addEventListener('submit', submit);
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
}

function showTokenState() {
  document.getElementById('token-state').hidden = !token();
}

// Escape would leave every waiting request waiting: the dialog stays until a token is given.
document.getElementById('token-dialog').addEventListener('cancel', (e) => e.preventDefault());
// Something the page's Content-Security-Policy blocked is a bug of the console: say so.
document.addEventListener('securitypolicyviolation', (e) => {
  banner(`The page's security policy blocked ${e.violatedDirective} (${e.blockedURI || 'inline'}): please report it.`);
});
// A bug of the console should be seen, not swallowed by the browser's developer tools.
window.addEventListener('error', (e) => banner(`The console hit an error: ${e.message}`));
window.addEventListener('unhandledrejection', (e) => {
  if (e.reason?.name !== 'AbortError') banner(`The console hit an error: ${e.reason?.message ?? e.reason}`);
});
setTokenPrompt(promptForToken);
onTokenChange(showTokenState);
document.getElementById('token-forget').addEventListener('click', () => {
  forgetToken();
  banner('Token forgotten: it is asked for again when the server needs it.', 'info');
});
showTokenState();
window.addEventListener('hashchange', route);
route();
