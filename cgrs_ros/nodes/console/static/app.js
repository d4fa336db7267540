// The cgrs operator console. Everything shown is set with textContent (never innerHTML):
// goals, captions and ids are data, not markup.
'use strict';

const $ = (id) => document.getElementById(id);
const state = { map: null, current: null, drone: null, prior: null, results: [],
  sentAt: null, pendingGoal: null };
// Goal typed -> candidates shown (ms) and the engine's own time, for benchmarks/console_figures.py.
window.cgrsLatencies = [];

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function say(text) { $('message').textContent = text || ''; }

async function post(path, body) {
  const response = await fetch(path, { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body), credentials: 'same-origin' });
  let answer = {};
  try { answer = await response.json(); } catch (e) { answer = { ok: false, message: await response.text() }; }
  if (!response.ok && answer.ok === undefined) answer.ok = false;
  return answer;
}

function fmt(value, digits) {
  return value === null || value === undefined ? '–' : Number(value).toFixed(digits);
}

// ---- results ---------------------------------------------------------------------------
function showResult(result) {
  state.current = result;
  const box = $('result');
  box.hidden = false;
  const held = result.status_name === 'awaiting confirmation';
  box.classList.toggle('held', held);
  $('result-status').textContent = result.status_name +
    (result.selected_rank ? ` · sent #${result.selected_rank}` : '');
  $('confidence').textContent = `confidence ${fmt(result.confidence, 2)} · margin ${fmt(result.margin, 3)}`;
  const t = result.timings_ms || {};
  $('timings').textContent = `${fmt(t.total, 0)} ms (encode ${fmt(t.encode, 0)}, coarse ${fmt(t.coarse, 0)}, captions ${fmt(t.captions, 0)}, rerank ${fmt(t.rerank, 0)})`;
  $('query-line').textContent = `“${result.query}”` + (result.error ? ` — ${result.error}` : '') +
    (result.area ? ` · within ${fmt(result.area.radius_m, 0)} m of the clicked point` : '');
  $('held-actions').hidden = !held;
  const list = $('candidates');
  list.replaceChildren();
  for (const c of result.candidates) {
    const item = el('li', 'candidate');
    item.dataset.rank = c.rank;
    item.dataset.imageId = c.image_id;
    if (c.rank === result.selected_rank) item.classList.add('selected');
    const img = el('img', 'thumb');
    img.alt = c.image_id;
    img.loading = 'lazy';
    img.src = '/thumb/' + encodeURIComponent(c.image_id);
    img.addEventListener('error', () => img.replaceWith(el('div', 'no-image', 'image not served')));
    item.append(img);
    const body = el('div', 'body');
    body.append(el('div', 'title', `#${c.rank} ${c.image_id} · ${c.platform}` + (c.group_id ? ` · ${c.group_id}` : '')));
    body.append(el('div', 'caption', c.caption || '(no caption)'));
    const s = c.scores;
    body.append(el('div', 'scores', `coarse ${fmt(s.coarse, 3)} caption ${fmt(s.caption, 3)} fused ${fmt(s.fused, 3)} rerank ${fmt(s.rerank, 3)} final ${fmt(s.final, 3)}`));
    const send = el('button', 'send-candidate', `Send #${c.rank}`);
    send.type = 'button';
    send.addEventListener('click', () => confirmRank(result.result_id, c.rank));
    body.append(send);
    item.append(body);
    list.append(item);
  }
  drawMap();
}

function addHistory(result) {
  state.results.unshift(result);
  state.results = state.results.slice(0, 50);
  renderHistory();
}

function renderHistory() {
  const list = $('history');
  list.replaceChildren();
  for (const r of state.results) {
    const best = r.candidates.length ? r.candidates[Math.max(r.selected_rank, 1) - 1] : null;
    const when = r.stamp ? new Date(r.stamp * 1000).toLocaleTimeString() : '';
    const item = el('li', '', `${when} “${r.query}” → ${r.status_name}` + (best ? ` (${best.image_id})` : ''));
    item.addEventListener('click', () => showResult(r));
    list.append(item);
  }
}

async function confirmRank(resultId, rank) {
  const answer = await post('/api/confirm', { result_id: resultId, rank: rank });
  say(answer.message);
}

// ---- map -------------------------------------------------------------------------------
function toPixel(x, y) {
  const m = state.map;
  return [(x - m.x_min) / (m.x_max - m.x_min) * m.width, (m.y_max - y) / (m.y_max - m.y_min) * m.height];
}

function drawMap() {
  const m = state.map;
  if (!m) return;
  const canvas = $('map-overlay');
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const metre = m.width / (m.x_max - m.x_min);
  // Canvas pixels per screen pixel: markers keep their on-screen size however the map is scaled.
  const k = canvas.width / Math.max(canvas.clientWidth, 1);
  const ring = (area) => {
    if (!area || area.x === undefined || area.x === null) return;
    const [px, py] = toPixel(area.x, area.y);
    ctx.strokeStyle = '#ffd34a'; ctx.lineWidth = 3 * k;
    ctx.beginPath(); ctx.arc(px, py, area.radius_m * metre, 0, 2 * Math.PI); ctx.stroke();
  };
  if (state.prior && state.prior.set) ring(state.prior);
  const r = state.current;
  if (r) {
    if (r.area) ring(r.area);
    const chosen = Math.max(r.selected_rank, 1);
    for (const c of [...r.candidates].reverse()) {
      const [px, py] = toPixel(c.map_pose.x, c.map_pose.y);
      ctx.fillStyle = c.rank === chosen ? '#3ddc5a' : '#4a8dff';
      ctx.beginPath(); ctx.arc(px, py, (c.rank === chosen ? 11 : 8) * k, 0, 2 * Math.PI); ctx.fill();
      ctx.fillStyle = '#000'; ctx.font = `bold ${Math.round(11 * k)}px sans-serif`; ctx.textAlign = 'center';
      ctx.fillText(String(c.rank), px, py + 4 * k);
    }
  }
  const d = state.drone;
  if (d && d.x !== undefined && d.x !== null) {
    const [px, py] = toPixel(d.x, d.y);
    const yaw = d.yaw || 0;
    ctx.save(); ctx.translate(px, py); ctx.rotate(-yaw); ctx.scale(k, k);
    ctx.fillStyle = '#ff5ad1';
    ctx.beginPath(); ctx.moveTo(16, 0); ctx.lineTo(-10, 9); ctx.lineTo(-10, -9); ctx.closePath(); ctx.fill();
    ctx.restore();
  }
}

async function loadMap() {
  const response = await fetch('/api/map', { credentials: 'same-origin' });
  state.map = await response.json();
  const canvas = $('map-overlay');
  canvas.width = state.map.width;
  canvas.height = state.map.height;
  canvas.addEventListener('click', async (event) => {
    const rect = canvas.getBoundingClientRect();
    const m = state.map;
    const x = m.x_min + (event.clientX - rect.left) / rect.width * (m.x_max - m.x_min);
    const y = m.y_max - (event.clientY - rect.top) / rect.height * (m.y_max - m.y_min);
    const answer = await post('/api/prior', { x: x, y: y });
    say(answer.message);
  });
  drawMap();
}

function showPrior(prior) {
  state.prior = prior;
  const set = prior && prior.set;
  $('prior-text').textContent = set
    ? `Search area: ${fmt(prior.radius_m, 0)} m around (${fmt(prior.lat, 5)}, ${fmt(prior.lon, 5)})`
    : 'Search area: whole gallery (click the map to narrow it)';
  $('clear-prior').hidden = !set;
  drawMap();
}

function showDrone(drone) {
  state.drone = drone;
  let text = 'drone: no data';
  if (drone && drone.status) {
    try { const s = JSON.parse(drone.status); text = `drone: ${s.state || 'unknown'}` + (s.distance_m !== undefined ? ` (${fmt(s.distance_m, 0)} m to go)` : ''); } catch (e) { text = 'drone: status unreadable'; }
  } else if (drone && drone.x !== undefined) {
    text = `drone at (${fmt(drone.x, 0)}, ${fmt(drone.y, 0)})`;
  }
  $('drone-status').textContent = text;
  drawMap();
}

// ---- live events -----------------------------------------------------------------------
function connect() {
  const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
  ws.addEventListener('open', () => { $('connection').textContent = 'connected'; $('connection').className = 'badge ok'; });
  ws.addEventListener('close', () => {
    $('connection').textContent = 'disconnected: retrying'; $('connection').className = 'badge bad';
    setTimeout(connect, 1000);
  });
  ws.addEventListener('message', (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === 'state') {
      state.results = msg.history || [];
      renderHistory();
      if (state.results.length && !state.current) showResult(state.results[0]);
      showDrone(msg.drone);
      if (msg.prior) showPrior(msg.prior);
      $('talk').hidden = !msg.voice;
      if (!msg.connected) say('retrieval_node is not reachable yet');
    } else if (msg.type === 'result') {
      addHistory(msg.result);
      showResult(msg.result);
      if (state.sentAt !== null && msg.result.query === state.pendingGoal) {
        // After the candidates are in the DOM (showResult ran above).
        window.cgrsLatencies.push({ shown_ms: performance.now() - state.sentAt,
          engine_ms: (msg.result.timings_ms || {}).total });
        state.sentAt = null;
      }
    } else if (msg.type === 'feedback') {
      say(`${msg.stage} ${Math.round(msg.progress * 100)}%`);
    } else if (msg.type === 'drone') {
      showDrone(msg.drone);
    } else if (msg.type === 'prior') {
      showPrior(msg.prior);
    } else if (msg.type === 'voice') {
      $('talk').hidden = !msg.available;
    }
  });
}

// ---- push-to-talk: record while the button is held, send 16-bit PCM for voice_node -----
const talk = { ctx: null, stream: null, chunks: [], rate: 0, held: false, recording: false };

async function startTalking() {
  if (talk.held) return;
  talk.held = true;
  try {
    talk.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    talk.ctx = new AudioContext();
    await talk.ctx.audioWorklet.addModule('/static/recorder-worklet.js');
    const source = talk.ctx.createMediaStreamSource(talk.stream);
    const recorder = new AudioWorkletNode(talk.ctx, 'pcm-recorder');
    const mute = talk.ctx.createGain();
    mute.gain.value = 0;   // pulled by the graph, not heard
    talk.chunks = [];
    talk.rate = talk.ctx.sampleRate;
    recorder.port.onmessage = (event) => talk.chunks.push(event.data);
    source.connect(recorder).connect(mute).connect(talk.ctx.destination);
    talk.recording = true;
    $('talk').classList.add('recording');
    say('listening… release to send');
    if (!talk.held) await stopTalking();   // released while the microphone was opening
  } catch (e) {
    talk.held = false;
    stopStream();
    say(`the microphone is not available: ${e.message}`);
  }
}

function stopStream() {
  if (talk.stream) talk.stream.getTracks().forEach((track) => track.stop());
  if (talk.ctx) talk.ctx.close();
  talk.stream = null;
  talk.ctx = null;
  $('talk').classList.remove('recording');
}

async function stopTalking() {
  talk.held = false;
  if (!talk.recording) return;   // still opening: startTalking stops when it is ready
  talk.recording = false;
  stopStream();
  const total = talk.chunks.reduce((n, c) => n + c.length, 0);
  const pcm = new DataView(new ArrayBuffer(total * 2));
  let i = 0;
  for (const chunk of talk.chunks) {
    for (const sample of chunk) {
      pcm.setInt16(2 * i++, Math.max(-1, Math.min(1, sample)) * 32767, true);
    }
  }
  const response = await fetch(`/api/audio?rate=${talk.rate}`, { method: 'POST',
    headers: { 'Content-Type': 'application/octet-stream' }, body: pcm.buffer, credentials: 'same-origin' });
  let answer = {};
  try { answer = await response.json(); } catch (e) { answer = { message: await response.text() }; }
  say(answer.message);
}

// ---- controls --------------------------------------------------------------------------
function setup() {
  $('goal-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = $('goal-text').value.trim();
    if (!text) { say('type a goal first'); return; }
    state.sentAt = performance.now();
    state.pendingGoal = text;
    const answer = await post('/api/goal', { text: text, platform: $('platform').value, policy: $('policy').value });
    say(answer.ok ? 'goal sent' : answer.message);
  });
  $('cancel').addEventListener('click', async () => {
    const answer = await post('/api/cancel', {});
    let text = answer.message;
    const r = state.current;
    if (r && r.status_name === 'awaiting confirmation') {
      const dismissed = await post('/api/confirm', { result_id: r.result_id, rank: 0 });
      text += '; ' + dismissed.message;
    }
    say(text);
  });
  $('confirm-best').addEventListener('click', () => confirmRank(state.current.result_id, 1));
  $('dismiss').addEventListener('click', () => confirmRank(state.current.result_id, 0));
  $('talk').addEventListener('pointerdown', startTalking);
  $('talk').addEventListener('pointerup', stopTalking);
  $('talk').addEventListener('pointerleave', stopTalking);
  $('clear-prior').addEventListener('click', async () => say((await post('/api/prior', { clear: true })).message));
  loadMap();
  connect();
}

document.addEventListener('DOMContentLoaded', setup);
