// The JSON API, with the bearer token the user typed. Every page goes through here: the
// console makes no request that the documented API (/openapi.json) does not answer.
//
// The token lives in localStorage (asked for once per browser, until "forget") and only
// ever travels in the Authorization header of same-origin requests, never in a URL.

const TOKEN_KEY = 'ddpm.token';

export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

export function token() {
  try {
    return localStorage.getItem(TOKEN_KEY);
  } catch {
    return null; // storage disabled: ask again each time
  }
}

export function setToken(value) {
  try {
    localStorage.setItem(TOKEN_KEY, value);
  } catch {
    memoryToken = value;
  }
  tokenListeners.forEach((f) => f());
}

export function forgetToken() {
  try {
    localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* nothing kept */
  }
  memoryToken = null;
  tokenListeners.forEach((f) => f());
}

let memoryToken = null;
const tokenListeners = [];
export function onTokenChange(f) {
  tokenListeners.push(f);
}

function currentToken() {
  return token() ?? memoryToken;
}

// Set by main.js: shows the token dialog and resolves once the user saved a token. Many
// requests may be refused at once; they all wait for the one dialog.
let askForToken = async () => {
  throw new ApiError(401, 'unauthorized', 'an API token is needed');
};
let pendingAsk = null;
export function setTokenPrompt(f) {
  askForToken = f;
}

function ask(refused) {
  if (!pendingAsk) {
    pendingAsk = askForToken(refused).finally(() => {
      pendingAsk = null;
    });
  }
  return pendingAsk;
}

async function apiError(response) {
  let code = `http_${response.status}`;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code ?? code;
      message = body.error.message ?? message;
    }
  } catch {
    /* not JSON: keep the status line */
  }
  const retry = Number(response.headers.get('retry-after'));
  return new ApiError(response.status, code, message, Number.isFinite(retry) ? retry : null);
}

// Sends one request; on 401 asks for a (new) token and sends it again. Returns the
// Response for `raw`, else the parsed JSON body.
export async function request(path, { method = 'GET', body, accept = 'application/json', signal, raw = false } = {}) {
  for (;;) {
    const headers = { accept };
    const sent = currentToken();
    if (sent) headers.authorization = `Bearer ${sent}`;
    if (body !== undefined) headers['content-type'] = 'application/json';
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
    });
    if (response.status === 401) {
      // The token changed while this request was out: try the new one first.
      if (currentToken() !== sent) continue;
      await ask(Boolean(sent));
      continue;
    }
    if (!response.ok) throw await apiError(response);
    return raw ? response : response.json();
  }
}

export const get = (path, options) => request(path, options);
export const post = (path, body, options = {}) => request(path, { ...options, method: 'POST', body });

// An image behind the token as an object URL. Checkpoint grids never change, so each
// is fetched once per page load.
const blobUrls = new Map();
export async function imageUrl(path) {
  if (!blobUrls.has(path)) {
    const pending = request(path, { accept: 'image/png', raw: true })
      .then((r) => r.blob())
      .then((b) => URL.createObjectURL(b));
    pending.catch(() => blobUrls.delete(path));
    blobUrls.set(path, pending);
  }
  return blobUrls.get(path);
}

// POST /v1/samples as Server-Sent Events: calls onEvent(name, data) for each event until
// the stream ends; aborting `signal` closes it, and the server drops the request's work.
export async function stream(path, body, onEvent, signal) {
  const response = await request(path, { method: 'POST', body, accept: 'text/event-stream', signal, raw: true });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue; // keep-alive comment
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') event = text;
        else if (field === 'data') data.push(text);
      }
      if (data.length) onEvent(event, JSON.parse(data.join('\n')));
    }
  }
}
