// The Managed Agents pages: agents (versions, create, archive) and environments (create,
// archive), through the Anthropic-shaped API at /anthropic/v1 with the same key. The server
// scopes every list to the key's tenant; the page shows what it is given.
import { get, post } from '/ui/api.js';
import { h, toast, attempt } from '/ui/app.js';

const enc = encodeURIComponent;
const MA = '/anthropic/v1';
const field = (label, input) => h('label', {}, label, input);
const when = (ts) => (ts ? String(ts).replace('T', ' ').slice(0, 19) : '');

// A cursor-paged list (`{data, next_page, prev_page}`): Older/Newer buttons walk the pages.
function pager(id, load) {
  let cursor = null;
  let last = { next_page: null, prev_page: null };
  const newer = h('button', { type: 'button', id: `${id}-prev`, onclick: () => go(last.prev_page) }, 'Newer');
  const older = h('button', { type: 'button', id: `${id}-next`, onclick: () => go(last.next_page) }, 'Older');
  async function go(c) {
    cursor = c;
    const page = await attempt(() => load(cursor));
    if (!page) return;
    last = page;
    newer.disabled = !page.prev_page;
    older.disabled = !page.next_page;
  }
  return { controls: [newer, older], reload: () => go(cursor), first: () => go(null) };
}

function listPath(kind, archived, cursor) {
  const q = new URLSearchParams({ limit: '50' });
  if (archived) q.set('include_archived', 'true');
  if (cursor) q.set('page', cursor);
  return `${MA}/${kind}?${q}`;
}

// ---- Agents ----

export async function agents(el) {
  const name = h('input', { id: 'agent-name', required: true, placeholder: 'reviewer' });
  const model = h('input', { id: 'agent-model', required: true, value: 'claude-sonnet-4-5' });
  const description = h('input', { id: 'agent-description', placeholder: 'optional' });
  const system = h('textarea', { id: 'agent-system', rows: 2, cols: 40, placeholder: 'system prompt (optional)' });
  const toolset = h('input', { type: 'checkbox', id: 'agent-tools', checked: true });
  const policy = h('select', { id: 'agent-policy' }, ['always_allow', 'always_ask'].map((p) => h('option', { value: p }, p)));
  const archived = h('input', { type: 'checkbox', id: 'agents-archived' });
  const tbody = h('tbody');
  const versions = h('div', { id: 'agent-versions' });
  const form = h('form', { class: 'row', 'aria-label': 'Create an agent', onsubmit: async (e) => {
    e.preventDefault();
    const body = { name: name.value.trim(), model: model.value.trim() };
    if (description.value.trim()) body.description = description.value.trim();
    if (system.value.trim()) body.system = system.value;
    body.tools = toolset.checked ? [{ type: 'agent_toolset_20260401', default_config: { permission_policy: { type: policy.value } } }] : [];
    const a = await attempt(() => post(`${MA}/agents`, body));
    if (!a) return;
    toast(`Created agent ${a.id}`);
    name.value = '';
    await list.first();
  } }, field('Name', name), field('Model', model), field('Description', description), field('System prompt', system),
  h('label', {}, 'Built-in tools', toolset), field('Permission policy', policy), h('button', { class: 'primary', type: 'submit', id: 'create-agent' }, 'Create agent'));

  const list = pager('agents', async (cursor) => {
    const page = await get(listPath('agents', archived.checked, cursor));
    tbody.replaceChildren(...page.data.map((a) => {
      const acts = h('td', {}, h('button', { type: 'button', 'aria-label': `Versions of ${a.name}`, onclick: () => attempt(() => showVersions(a)) }, 'Versions'));
      if (!a.archived_at) {
        acts.append(' ', h('button', { type: 'button', class: 'danger', 'aria-label': `Archive ${a.name}`, onclick: async () => {
          if (!confirm(`Archive agent ${a.name}? New sessions can no longer use it.`)) return;
          if (await attempt(() => post(`${MA}/agents/${enc(a.id)}/archive`)) !== undefined) list.reload();
        } }, 'Archive'));
      }
      return h('tr', { 'data-agent': a.id }, h('td', {}, a.name), h('td', { class: 'mono' }, a.id), h('td', {}, (a.model && a.model.id) || ''),
        h('td', { class: 'num' }, a.version), h('td', {}, (a.tools || []).map((t) => t.type).join(', ')), h('td', {}, when(a.created_at)),
        h('td', { class: 'archived' }, when(a.archived_at)), acts);
    }));
    if (!page.data.length) tbody.append(h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No agents.')));
    return page;
  });

  async function showVersions(a) {
    const page = await get(`${MA}/agents/${enc(a.id)}/versions?limit=100`);
    versions.replaceChildren(h('h2', {}, 'Versions of ', h('span', { class: 'mono' }, a.name)),
      h('table', { id: 'versions' }, h('thead', {}, h('tr', {}, ['Version', 'Updated', 'Model', 'Name', 'System prompt'].map((t) => h('th', {}, t)))),
        h('tbody', {}, page.data.map((v) => h('tr', { 'data-version': v.version }, h('td', { class: 'num' }, v.version), h('td', {}, when(v.updated_at)),
          h('td', {}, (v.model && v.model.id) || ''), h('td', {}, v.name), h('td', {}, h('pre', {}, (v.system || '').slice(0, 400))))))));
    versions.querySelector('h2').scrollIntoView({ block: 'nearest' });
  }

  archived.addEventListener('change', () => list.first());
  el.append(h('h1', {}, 'Agents'), h('p', { class: 'muted' }, 'Managed Agents API agents (', h('span', { class: 'mono' }, `${MA}/agents`), '): each update is a new version.'), form,
    h('div', { class: 'row' }, h('label', {}, 'Show archived', archived), ...list.controls),
    h('table', { id: 'agents' }, h('thead', {}, h('tr', {}, ['Name', 'Id', 'Model', 'Version', 'Tools', 'Created', 'Archived', ''].map((t) => h('th', {}, t)))), tbody), versions);
  await list.first();
}

// ---- Environments ----

export async function environments(el) {
  const name = h('input', { id: 'env-name', required: true, placeholder: 'python-dev' });
  const description = h('input', { id: 'env-description', placeholder: 'optional' });
  const hosts = h('input', { id: 'env-hosts', placeholder: 'api.github.com, *.example.com' });
  const pkgs = h('input', { type: 'checkbox', id: 'env-packages' });
  const archived = h('input', { type: 'checkbox', id: 'envs-archived' });
  const tbody = h('tbody');
  const form = h('form', { class: 'row', 'aria-label': 'Create an environment', onsubmit: async (e) => {
    e.preventDefault();
    const allowed = hosts.value.split(',').map((s) => s.trim()).filter(Boolean);
    const body = { name: name.value.trim(), config: { type: 'cloud', networking: { type: 'limited', allowed_hosts: allowed, allow_package_managers: pkgs.checked } } };
    if (description.value.trim()) body.description = description.value.trim();
    const env = await attempt(() => post(`${MA}/environments`, body));
    if (!env) return;
    toast(`Created environment ${env.id}`);
    name.value = '';
    await list.first();
  } }, field('Name', name), field('Description', description), field('Allowed hosts', hosts), h('label', {}, 'Package registries', pkgs),
  h('button', { class: 'primary', type: 'submit', id: 'create-env' }, 'Create environment'));

  const list = pager('envs', async (cursor) => {
    const page = await get(listPath('environments', archived.checked, cursor));
    tbody.replaceChildren(...page.data.map((env) => {
      const net = (env.config && env.config.networking) || {};
      const acts = h('td', {});
      if (!env.archived_at) {
        acts.append(h('button', { type: 'button', class: 'danger', 'aria-label': `Archive ${env.name}`, onclick: async () => {
          if (!confirm(`Archive environment ${env.name}?`)) return;
          if (await attempt(() => post(`${MA}/environments/${enc(env.id)}/archive`)) !== undefined) list.reload();
        } }, 'Archive'));
      }
      return h('tr', { 'data-env': env.id }, h('td', {}, env.name), h('td', { class: 'mono' }, env.id), h('td', {}, env.description || ''),
        h('td', { class: 'mono hosts' }, (net.allowed_hosts || []).join(', ') + (net.allow_package_managers ? ' + package registries' : '')),
        h('td', {}, when(env.created_at)), h('td', { class: 'archived' }, when(env.archived_at)), acts);
    }));
    if (!page.data.length) tbody.append(h('tr', {}, h('td', { colspan: 7, class: 'muted' }, 'No environments.')));
    return page;
  });

  archived.addEventListener('change', () => list.first());
  el.append(h('h1', {}, 'Environments'), h('p', { class: 'muted' }, 'Managed Agents API environments (', h('span', { class: 'mono' }, `${MA}/environments`), '): a session\'s box reaches only the allowed hosts.'), form,
    h('div', { class: 'row' }, h('label', {}, 'Show archived', archived), ...list.controls),
    h('table', { id: 'environments' }, h('thead', {}, h('tr', {}, ['Name', 'Id', 'Description', 'Network allow', 'Created', 'Archived', ''].map((t) => h('th', {}, t)))), tbody));
  await list.first();
}
