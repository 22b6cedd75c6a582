// The Recheck dashboard: polls the JSON API every 2 s and writes every value as text
// (textContent / DOM nodes, never HTML): reasons come from consumers' CONFIRMs.
'use strict';

// `unused`: reserved ids nobody used, shown apart from `void` (not a failure).
const STATUSES = ['pending', 'resent', 'confirmed', 'void', 'failed', 'rejected', 'unused'];
const POLL_MS = 2000;
const PAGE = 20;
const SVG = 'http://www.w3.org/2000/svg';

// Per list: the `after` cursor of the page shown ('' = first) and the next page's.
const lists = {
  failed: { after: '', next: null },
  rejected: { after: '', next: null },
};
let shown = null; // the message id whose timeline is open

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('data-')) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? '' : String(child)));
  }
  return node;
}

// Times are UTC (the header says so).
function time(ms) {
  if (!ms) return '–';
  return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, '');
}

function short(id) {
  return id.length > 13 ? id.slice(0, 8) + '…' + id.slice(-4) : id;
}

async function api(path, options) {
  const response = await fetch(path, {
    credentials: 'same-origin',
    ...options,
    headers: { 'x-recheck-dashboard': '1', accept: 'application/json' },
  });
  if (response.status === 401) {
    window.location.assign('/dashboard/login');
    throw new Error('signed out');
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function showError(error) {
  const banner = $('error');
  if (error) {
    banner.textContent = String(error.message || error);
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
}

function renderCounts(stats) {
  const tiles = STATUSES.map((s) =>
    el('div', { class: `tile status-${s}`, 'data-status': s },
      el('span', { class: 'n', id: `count-${s}` }, stats.counts[s] ?? 0),
      el('span', { class: 'label' }, s)));
  tiles.push(el('div', { class: 'tile awaiting', title: 'pending or resent, known only from confirms: the CHECK says whether more consumers are expected' },
    el('span', { class: 'n', id: 'count-awaiting-check' }, stats.awaiting_check ?? 0),
    el('span', { class: 'label' }, 'awaiting check')));
  tiles.push(el('div', { class: 'tile total' },
    el('span', { class: 'n', id: 'count-total' }, stats.total),
    el('span', { class: 'label' }, 'total')));
  $('counts').replaceChildren(...tiles);
  $('rate-confirms').textContent = stats.confirms_per_second.toFixed(2);
  $('rate-resends').textContent = stats.resends_per_second.toFixed(2);
  renderSparkline(stats.throughput);
}

function renderSparkline(t) {
  const svg = $('sparkline');
  const [w, h, pad] = [600, 80, 4];
  const max = Math.max(1, ...t.confirms, ...t.resends);
  const n = Math.max(2, t.confirms.length);
  const points = (series) => series
    .map((v, i) => `${((i / (n - 1)) * w).toFixed(1)},${(h - pad - (v / max) * (h - 2 * pad)).toFixed(1)}`)
    .join(' ');
  const line = (series, cls) => {
    const p = document.createElementNS(SVG, 'polyline');
    p.setAttribute('points', points(series));
    p.setAttribute('class', cls);
    return p;
  };
  const base = document.createElementNS(SVG, 'line');
  for (const [k, v] of [['x1', 0], ['x2', w], ['y1', h - pad], ['y2', h - pad]]) base.setAttribute(k, v);
  base.setAttribute('class', 'axis');
  const title = document.createElementNS(SVG, 'title');
  title.textContent = `peak ${max} per ${t.bucket_ms / 1000} s`;
  svg.replaceChildren(title, base, line(t.resends, 'resends'), line(t.confirms, 'confirms'));
}

function messageRow(m) {
  const open = el('button', { type: 'button', class: 'link open', title: m.message_id }, short(m.message_id));
  open.addEventListener('click', () => showMessage(m.message_id));
  const redrive = el('button', { type: 'button', class: 'redrive' }, 'Redrive');
  redrive.addEventListener('click', () => redriveMessage(m.message_id, redrive));
  return el('tr', { 'data-id': m.message_id },
    el('td', { class: 'id' }, open),
    el('td', {}, m.producer || '–'),
    el('td', { class: 'business-key' }, m.business_key || '–'),
    el('td', { class: 'reason' }, m.reason || m.last_error || '–'),
    el('td', { class: 'num' }, m.resend_count),
    el('td', { class: 'when' }, ...time(m.updated_at).split(' ').map((part) => el('span', {}, part))),
    el('td', {}, redrive));
}

async function refreshList(status) {
  const state = lists[status];
  const query = new URLSearchParams({ status, limit: PAGE, after: state.after });
  const page = await api(`/api/messages?${query}`);
  state.next = page.next;
  const rows = page.messages.map(messageRow);
  if (rows.length === 0) {
    rows.push(el('tr', { class: 'empty' }, el('td', { colSpan: 7 }, `no ${status} messages`)));
  }
  $(status).tBodies[0].replaceChildren(...rows);
  const pager = document.querySelector(`.pager[data-list="${status}"]`);
  pager.querySelector('.first').disabled = state.after === '';
  pager.querySelector('.next').disabled = !state.next;
}

async function showMessage(id) {
  shown = id;
  $('lookup-id').value = id;
  await refreshMessage();
}

async function refreshMessage() {
  if (!shown) return;
  const id = shown;
  let body;
  try {
    body = await api(`/api/messages/${encodeURIComponent(id)}`);
  } catch (e) {
    if (shown === id) $('detail-body').hidden = true;
    throw e;
  }
  if (shown !== id) return;
  const m = body.message;
  $('detail-id').textContent = m.message_id;
  const status = $('detail-status');
  status.textContent = m.awaiting_check ? `${m.status} · awaiting its check` : m.status;
  status.className = `badge status-${m.status}`;
  const redrive = $('detail-redrive');
  redrive.hidden = !(m.status === 'failed' || m.status === 'rejected');
  const fields = [
    ['producer', m.producer], ['routing key', m.routing_key], ['business key', m.business_key],
    ['expects', (m.expect || []).join(', ') || 'any consumer'], ['attempt', m.attempt],
    ['resends', m.resend_count], ['last error', m.last_error || '–'], ['published', time(m.published_at)],
    ['updated', time(m.updated_at)],
  ];
  $('detail-fields').replaceChildren(...fields.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
  $('timeline').replaceChildren(...body.timeline.map((e) =>
    el('li', { class: `event ${e.kind}` },
      el('time', {}, time(e.at)),
      el('span', { class: 'title' }, e.title),
      e.detail ? el('span', { class: 'detail' }, e.detail) : '')));
  $('detail-body').hidden = false;
}

async function redriveMessage(id, button) {
  if (button) button.disabled = true;
  try {
    await api(`/api/messages/${encodeURIComponent(id)}/redrive`, { method: 'POST' });
    showError(null);
    await showMessage(id);
    await refresh();
  } catch (e) {
    showError(e);
    if (button) button.disabled = false;
  }
}

// Bulk redrive of one status (at most 1000 a click; the button says when more remain).
async function redriveAll(status, button) {
  if (!window.confirm(`Redrive every ${status} message?`)) return;
  button.disabled = true;
  try {
    const done = await api(`/api/redrive?status=${encodeURIComponent(status)}`, { method: 'POST' });
    button.textContent = `Redriven ${done.message_ids.length}${done.more ? ' (more remain: click again)' : ''}`;
    showError(null);
    await refresh();
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

let refreshing = false;
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    renderCounts(await api('/api/stats'));
    await Promise.all([refreshList('failed'), refreshList('rejected'), refreshMessage()]);
    $('updated').textContent = `updated ${time(Date.now())} (all times UTC)`;
    showError(null);
  } catch (e) {
    showError(e);
  } finally {
    refreshing = false;
  }
}

function init() {
  for (const pager of document.querySelectorAll('.pager')) {
    const state = lists[pager.dataset.list];
    pager.querySelector('.first').addEventListener('click', () => { state.after = ''; refresh(); });
    pager.querySelector('.next').addEventListener('click', () => {
      if (state.next) { state.after = state.next; refresh(); }
    });
  }
  for (const button of document.querySelectorAll('.redrive-all')) {
    button.addEventListener('click', () => redriveAll(button.dataset.status, button));
  }
  $('lookup').addEventListener('submit', (event) => {
    event.preventDefault();
    const id = $('lookup-id').value.trim();
    if (id) showMessage(id).then(() => showError(null), showError);
  });
  $('detail-redrive').addEventListener('click', (event) => redriveMessage(shown, event.target));
  refresh();
  setInterval(refresh, POLL_MS);
}

init();
