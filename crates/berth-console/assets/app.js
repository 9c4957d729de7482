// The console's shell: sign-in, navigation (`#/page/id` routes), theme, messages.
import { auth, get, ApiError } from '/ui/api.js';
import { pages } from '/ui/pages.js';

const main = document.getElementById('main');
let leave = null; // the current page's clean-up (streams, timers, sockets)

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return el;
}

export function toast(text, isError) {
  const box = document.getElementById('toast');
  const m = h('div', { class: 'msg' + (isError ? ' err' : '') }, text);
  box.appendChild(m);
  setTimeout(() => m.remove(), isError ? 8000 : 4000);
}

// Run an action and report its failure (a signed-out key sends the user to sign in).
export async function attempt(fn) {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) { signOut(); return undefined; }
    toast(e.message || String(e), true);
    return undefined;
  }
}

function signOut() {
  auth.clear();
  route();
}

function signIn() {
  const err = h('p', { class: 'error', role: 'alert' });
  const input = h('input', { type: 'password', id: 'key', autocomplete: 'off', required: true, 'aria-describedby': 'key-help' });
  const form = h('form', { class: 'signin card', onsubmit: async (e) => {
    e.preventDefault();
    auth.set(input.value.trim());
    input.value = '';
    try {
      await get('/v1/boxes');
      route();
    } catch (ex) {
      auth.clear();
      err.textContent = ex.status === 401 ? 'That key was not accepted.' : ex.message;
    }
  } },
  h('h1', {}, 'Sign in'),
  h('label', { for: 'key' }, 'API key', input),
  h('p', { id: 'key-help', class: 'muted' }, 'Kept in this tab only (session storage), sent as a header; never in a URL or a cookie.'),
  h('button', { class: 'primary', type: 'submit' }, 'Sign in'), err);
  main.replaceChildren(form);
  input.focus();
}

async function whoAmI() {
  // Admin keys may list keys; a tenant's key gets 403.
  try {
    await get('/v1/keys');
    auth.admin = true;
  } catch (_) {
    auth.admin = false;
  }
  document.getElementById('nav-keys').hidden = !auth.admin;
}

async function route() {
  if (leave) { try { leave(); } catch (_) { /* already gone */ } leave = null; }
  const nav = document.getElementById('nav');
  const out = document.getElementById('signout');
  if (!auth.key) {
    nav.hidden = true; out.hidden = true;
    return signIn();
  }
  nav.hidden = false; out.hidden = false;
  if (auth.admin === false && !route.checked) { route.checked = true; await whoAmI(); }
  const [, name = 'boxes', id] = (location.hash || '#/boxes').split('/').map(decodeURIComponent);
  for (const a of nav.querySelectorAll('a')) {
    if (a.getAttribute('href') === `#/${name}` || (name === 'box' && a.getAttribute('href') === '#/boxes')
      || (name === 'session' && a.getAttribute('href') === '#/sessions')) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const page = pages[name] || pages.boxes;
  main.replaceChildren();
  const cleanups = [];
  await attempt(() => page(main, id, { onLeave: (f) => cleanups.push(f) }));
  leave = () => cleanups.forEach((f) => f());
  main.focus({ preventScroll: true });
}

function theme() {
  const root = document.documentElement;
  const saved = localStorage.getItem('berth.theme');
  if (saved) root.dataset.theme = saved;
  document.getElementById('theme').addEventListener('click', () => {
    const dark = root.dataset.theme === 'dark'
      || (!root.dataset.theme && matchMedia('(prefers-color-scheme: dark)').matches);
    root.dataset.theme = dark ? 'light' : 'dark';
    localStorage.setItem('berth.theme', root.dataset.theme);
  });
}

document.getElementById('signout').addEventListener('click', () => { route.checked = false; auth.admin = false; signOut(); });
window.addEventListener('hashchange', route);
theme();
route();
