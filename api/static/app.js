// Live kiosk dashboard: tiles of current vitals, alerts, and a per-kiosk scan view.
//
// Data flow: on every (re)connection the page subscribes to the live feed first,
// then fetches kiosks, open alerts and (when it has no reading id to resume from)
// recent readings over REST. Every merge is idempotent, so the order of arrival
// does not matter. The live feed is a WebSocket (/ws); when WebSockets are
// unavailable or keep failing while HTTP works, Server-Sent Events
// (/api/v1/stream) carry the same messages. See docs/dashboard.md.
"use strict";

// ---- Settings ---------------------------------------------------------------

const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 10_000;
const STABLE_CONNECTION_MS = 5_000; // a connection this old resets the backoff
const WS_FAILURES_BEFORE_SSE = 3; // WS failures while HTTP answers
const SSE_FAILURES_BEFORE_WS = 3;
const SSE_SILENCE_MS = 45_000; // the server sends a keep-alive every 15 s
const RECENT_READINGS_MS = 10 * 60_000; // history fetched on first load
const MAX_PAGES = 50;
const PAGE_SIZE = 1000;
const SPARK_POINTS = 60;
const LOW_QUALITY = 0.5;
const TICK_MS = 1000;
const RESYNC_RETRY_MS = 5_000;
const EXPIRY_WARNING_MS = 60_000; // ask for a new token this long before expiry
const TOKEN_KEY = "vitals.token";
const SOUND_KEY = "vitals.sound";
// RFC 6455 subprotocol names are HTTP tokens: no separators, no spaces.
const TOKEN_PATTERN = /^[A-Za-z0-9!#$%&'*+.^_`|~-]+$/;

// Shown on tiles, in this order. Units and estimate flags follow
// vitals_contract/metrics.py; the server's `estimate` field wins when present.
const METRICS = {
  heart_rate: { label: "Heart rate", unit: "/min", digits: 0, estimate: false },
  respiratory_rate: { label: "Resp. rate", unit: "/min", digits: 0, estimate: false },
  spo2: { label: "SpO2", unit: "%", digits: 0, estimate: true },
  hrv_sdnn: { label: "HRV SDNN", unit: "ms", digits: 0, estimate: false },
  stress_index: { label: "Stress", unit: "", digits: 0, estimate: true },
  hrv_rmssd: { label: "HRV RMSSD", unit: "ms", digits: 0, estimate: false },
};
const TILE_METRICS = ["heart_rate", "respiratory_rate", "spo2", "hrv_sdnn", "stress_index"];
const SEVERITY_RANK = { low: 1, medium: 2, high: 3 };

// ---- State ------------------------------------------------------------------

const state = {
  staleMs: 30_000,
  clockOffsetMs: 0, // server clock minus browser clock
  lastId: null, // highest reading id seen: where a new connection resumes
  loadedHistory: false,
  initialised: false, // alerts found by later snapshots are announced
  kiosks: new Map(),
  alerts: new Map(),
  detail: null, // {kioskId, scanId, readings: Map id -> reading}
};

const conn = {
  mode: typeof WebSocket === "function" ? "ws" : "sse",
  gen: 0, // bumps on each attempt; stale callbacks compare and return
  attempt: 0,
  wsFailures: 0,
  sseFailures: 0,
  liveAt: 0,
  socket: null,
  abort: null,
  timer: null,
  authRequired: false,
  expiresAt: 0, // browser time the token of the live socket expires, 0 unknown
  expiryPrompted: false,
};

const $ = (sel, root = document) => root.querySelector(sel);
const byTime = (a, b) => Date.parse(a.measured_at) - Date.parse(b.measured_at);

// ---- REST and auth ----------------------------------------------------------

class AuthError extends Error {}

class HttpError extends Error {
  constructor(path, status) {
    super(`${path}: HTTP ${status}`);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function api(path, options = {}) {
  const res = await fetch(path, {
    cache: "no-store",
    ...options,
    headers: { Accept: "application/json", ...authHeaders(), ...options.headers },
  });
  noteServerClock(res);
  if (res.status === 401) {
    needSignIn("The server asks for a valid token.");
    throw new AuthError(path);
  }
  if (!res.ok) throw new HttpError(path, res.status);
  return res.json();
}

function noteServerClock(res) {
  // Date has one-second resolution: take the middle of that second.
  const date = Date.parse(res.headers.get("Date") || "");
  if (!Number.isNaN(date)) state.clockOffsetMs = date + 500 - Date.now();
}

function serverTimeToLocal(iso) {
  return Date.parse(iso) - state.clockOffsetMs;
}

function needSignIn(reason) {
  if (conn.authRequired) return;
  conn.authRequired = true;
  closeTransport();
  renderAuth();
  setConn("signin", "Sign-in required");
  openSignIn(reason);
}

function openSignIn(reason) {
  $("#signin-reason").textContent = reason || "";
  $("#signin-error").textContent = "";
  $("#token").value = "";
  const dialog = $("#signin-dialog");
  if (!dialog.open) dialog.showModal();
}

function signIn(value) {
  const t = value.trim();
  if (!TOKEN_PATTERN.test(t)) {
    $("#signin-error").textContent = "That does not look like a token (no spaces, / or =).";
    return false;
  }
  sessionStorage.setItem(TOKEN_KEY, t);
  if (conn.socket && conn.socket.readyState === WebSocket.OPEN && !conn.authRequired) {
    // A live socket takes the new token in band; the connection stays up.
    conn.socket.send(JSON.stringify({ type: "refresh", token: t }));
  } else {
    conn.authRequired = false;
    reconnectNow();
  }
  renderAuth();
  return true;
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  renderAuth();
  conn.authRequired = false;
  reconnectNow();
}

function renderAuth() {
  const signedIn = Boolean(token());
  $("#signin").hidden = signedIn && !conn.authRequired;
  $("#signout").hidden = !signedIn;
}

// ---- Live transport ---------------------------------------------------------

function setConn(status, text) {
  const el = $("#conn");
  el.dataset.state = status;
  el.textContent = text;
}

function connect() {
  clearTimeout(conn.timer);
  if (conn.authRequired) return;
  const gen = ++conn.gen;
  setConn("connecting", "Connecting…");
  if (conn.mode === "ws") openSocket(gen);
  else openStream(gen);
}

function reconnectNow() {
  closeTransport();
  conn.attempt = 0;
  connect();
}

function closeTransport() {
  conn.gen++;
  clearTimeout(conn.timer);
  if (conn.socket) conn.socket.close(1000);
  if (conn.abort) conn.abort.abort();
  conn.socket = null;
  conn.abort = null;
}

function scheduleReconnect(why) {
  if (conn.liveAt && Date.now() - conn.liveAt > STABLE_CONNECTION_MS) conn.attempt = 0;
  conn.liveAt = 0;
  conn.expiresAt = 0;
  // Exponential backoff with jitter: wait between half and all of the ceiling.
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** conn.attempt);
  const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
  conn.attempt++;
  setConn("down", `${why}; reconnecting in ${Math.ceil(delay / 1000)} s`);
  conn.timer = setTimeout(connect, delay);
}

async function httpReachable() {
  try {
    await fetch("/health", { cache: "no-store" });
    return true;
  } catch {
    return false;
  }
}

function onLive(gen, via) {
  if (gen !== conn.gen) return;
  conn.liveAt = Date.now();
  if (via === "WebSocket") conn.wsFailures = 0;
  else conn.sseFailures = 0;
  setConn("live", `Live (${via})`);
  resyncUntilDone(gen);
}

// The snapshot fills what the live feed does not replay (kiosk states, alert
// changes); keep trying while this connection lasts.
function resyncUntilDone(gen) {
  resync().catch((err) => {
    if (err instanceof AuthError || gen !== conn.gen) return;
    console.warn("resync failed; retrying", err);
    setTimeout(() => resyncUntilDone(gen), RESYNC_RETRY_MS);
  });
}

function noteExpiry(message) {
  if (typeof message.expires_at !== "number") return;
  conn.expiresAt = message.expires_at * 1000 - state.clockOffsetMs;
  conn.expiryPrompted = false;
}

function checkExpiry() {
  if (!conn.expiresAt || conn.expiryPrompted || conn.authRequired) return;
  if (conn.expiresAt - Date.now() < EXPIRY_WARNING_MS) {
    conn.expiryPrompted = true;
    openSignIn("Your sign-in expires within a minute: paste a new token to stay connected.");
  }
}

// When the feed failed to come up although HTTP answers, count it against the
// transport; after a few such failures try the other one.
async function transportFailed(gen, kind) {
  const reachable = await httpReachable();
  if (gen !== conn.gen) return;
  if (reachable && kind === "ws" && ++conn.wsFailures >= WS_FAILURES_BEFORE_SSE) {
    conn.wsFailures = 0;
    conn.mode = "sse";
  } else if (reachable && kind === "sse" && ++conn.sseFailures >= SSE_FAILURES_BEFORE_WS) {
    conn.sseFailures = 0;
    if (typeof WebSocket === "function") conn.mode = "ws";
  }
  scheduleReconnect(reachable ? "Live feed refused" : "Server unreachable");
}

function subscribeFrame() {
  return JSON.stringify({
    type: "subscribe",
    kiosks: null,
    metrics: null,
    status: true,
    alerts: true,
    since: state.lastId,
  });
}

function openSocket(gen) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const t = token();
  let ws;
  try {
    const url = `${scheme}//${location.host}/ws`;
    ws = t ? new WebSocket(url, ["vitals.v1", `bearer.${t}`]) : new WebSocket(url);
  } catch (err) {
    console.warn("WebSocket unavailable; using Server-Sent Events", err);
    conn.mode = "sse";
    openStream(gen);
    return;
  }
  conn.socket = ws;
  let subscribed = false;
  ws.onopen = () => ws.send(subscribeFrame());
  ws.onmessage = (ev) => {
    if (gen !== conn.gen) return;
    let message;
    try {
      message = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (message.type === "subscribed") {
      subscribed = true;
      noteExpiry(message);
      onLive(gen, "WebSocket");
    } else if (message.type === "refreshed") {
      noteExpiry(message);
    } else {
      handleMessage(message);
    }
  };
  ws.onclose = (ev) => {
    if (gen !== conn.gen) return;
    conn.socket = null;
    if (ev.code === 4401) {
      needSignIn("Your token is missing, expired or revoked.");
    } else if (ev.code === 4403) {
      needSignIn("This token may not read vitals (it lacks the vitals.read scope).");
    } else if (!subscribed) {
      transportFailed(gen, "ws");
    } else if (ev.code === 4008) {
      scheduleReconnect("Fell behind the live feed");
    } else {
      scheduleReconnect("Connection lost");
    }
  };
}

async function openStream(gen) {
  const abort = new AbortController();
  conn.abort = abort;
  const headers = { Accept: "text/event-stream", ...authHeaders() };
  if (state.lastId !== null) headers["Last-Event-ID"] = String(state.lastId);
  let res;
  try {
    res = await fetch("/api/v1/stream", { headers, signal: abort.signal, cache: "no-store" });
  } catch {
    if (gen === conn.gen) transportFailed(gen, "sse");
    return;
  }
  if (gen !== conn.gen) return abort.abort();
  if (res.status === 401) return needSignIn("Your token is missing, expired or revoked.");
  if (res.status === 403) return needSignIn("This token may not read vitals.");
  const type = res.headers.get("Content-Type") || "";
  if (!res.ok || !res.body || !type.startsWith("text/event-stream")) {
    abort.abort();
    transportFailed(gen, "sse");
    return;
  }
  onLive(gen, "SSE");
  try {
    await readEvents(res.body, abort, (event, data) => {
      if (gen !== conn.gen) return;
      if (event === "auth") {
        needSignIn("Your token expired or was revoked.");
        return;
      }
      let message;
      try {
        message = JSON.parse(data);
      } catch {
        return;
      }
      message.type = message.type || event;
      handleMessage(message);
    });
  } catch (err) {
    if (gen !== conn.gen) return;
    console.warn("event stream broke", err);
  }
  if (gen === conn.gen) scheduleReconnect("Connection lost");
}

// Parse a text/event-stream body; call onEvent(eventName, data) per event.
async function readEvents(body, abort, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let watchdog = setTimeout(() => abort.abort(), SSE_SILENCE_MS);
  let buffer = "";
  let event = "message";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      clearTimeout(watchdog);
      watchdog = setTimeout(() => abort.abort(), SSE_SILENCE_MS);
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line === "") {
          if (data.length) onEvent(event, data.join("\n"));
          event = "message";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
    }
  } finally {
    clearTimeout(watchdog);
  }
}

// ---- Snapshots over REST ----------------------------------------------------

async function resync() {
  const started = Date.now();
  const [config, kiosks, alerts] = await Promise.all([
    api("/api/v1/dashboard/config"),
    api("/api/v1/kiosks"),
    api("/api/v1/alerts?open=true&limit=1000"),
  ]);
  state.staleMs = config.stale_seconds * 1000;
  for (const k of kiosks) {
    const kiosk = ensureKiosk(k.kiosk_id);
    if (kiosk.statusAt < started) {
      kiosk.state = k.state;
      kiosk.agentVersion = k.agent_version;
    }
    queueRender(kiosk);
  }
  reconcileAlerts(alerts, started);
  state.initialised = true;
  if (!state.loadedHistory || state.lastId === null) {
    await loadRecentReadings();
    state.loadedHistory = true;
  }
}

async function loadRecentReadings() {
  const since = new Date(Date.now() + state.clockOffsetMs - RECENT_READINGS_MS);
  let cursor = null;
  for (let page = 0; page < MAX_PAGES; page++) {
    const query = new URLSearchParams({ since: since.toISOString(), limit: PAGE_SIZE });
    if (cursor) query.set("cursor", cursor);
    const body = await api(`/api/v1/readings?${query}`);
    for (const r of body.items) addReading(r, false);
    cursor = body.next_cursor;
    if (!cursor) return;
  }
}

function reconcileAlerts(open, fetchedAt) {
  const ids = new Set(open.map((a) => a.alert_id));
  for (const a of open) {
    const known = state.alerts.get(a.alert_id);
    // A live message that came after the request started is newer than the list.
    // Alerts already open when the page loads are shown, not announced; those
    // raised while the feed was down are announced now.
    if (!known || known.receivedAt < fetchedAt) upsertAlert(a, state.initialised);
  }
  for (const [id, a] of state.alerts) {
    if (!ids.has(id) && a.receivedAt < fetchedAt) upsertAlert({ ...a, state: "cleared" }, false);
  }
}

// ---- Messages ---------------------------------------------------------------

function handleMessage(m) {
  if (m.type === "reading") addReading(m, !m.replay);
  else if (m.type === "status") applyStatus(m);
  else if (m.type === "alert") upsertAlert(m, true);
}

function ensureKiosk(id) {
  let kiosk = state.kiosks.get(id);
  if (!kiosk) {
    kiosk = {
      id,
      state: "unknown",
      agentVersion: null,
      heartbeat: null,
      scan: null,
      latest: {}, // metric -> reading shown on the tile
      spark: {}, // metric -> [{id, t, v, q}] sorted by t
      freshAt: 0, // browser time of the newest measurement
      statusAt: 0, // browser time the last live status arrived
      dirty: new Set(),
      el: null,
    };
    state.kiosks.set(id, kiosk);
    createTile(kiosk);
  }
  return kiosk;
}

function addReading(r, live) {
  if (!METRICS[r.metric]) return;
  state.lastId = state.lastId === null ? r.id : Math.max(state.lastId, r.id);
  const kiosk = ensureKiosk(r.kiosk_id);
  const t = Date.parse(r.measured_at);

  // A value is as fresh as its measurement; a kiosk clock ahead of the server's
  // is capped at the time the bridge received it.
  const measured = Math.min(t - state.clockOffsetMs, serverTimeToLocal(r.received_at));
  const freshAt = live ? Math.min(measured, Date.now()) : measured;
  kiosk.freshAt = Math.max(kiosk.freshAt, freshAt);

  // The tile shows the latest measurement, not the latest arrival: a backlog
  // delivered after an outage must not replace a newer value.
  const shown = kiosk.latest[r.metric];
  const shownAt = shown ? Date.parse(shown.measured_at) : -Infinity;
  if (t > shownAt || (t === shownAt && r.id > shown.id)) {
    kiosk.latest[r.metric] = { ...r, freshAt };
  }
  const points = (kiosk.spark[r.metric] ||= []);
  if (!points.some((p) => p.id === r.id)) {
    points.push({ id: r.id, t, v: r.value, q: r.quality });
    points.sort((a, b) => a.t - b.t || a.id - b.id);
    if (points.length > SPARK_POINTS) points.splice(0, points.length - SPARK_POINTS);
  }
  kiosk.dirty.add(r.metric);
  queueRender(kiosk);

  const d = state.detail;
  if (d && detailWants(d, r)) {
    d.readings.set(r.id, r);
    queueDetailRender();
  }
}

function applyStatus(m) {
  const kiosk = ensureKiosk(m.kiosk_id);
  if (m.kind === "status") {
    kiosk.state = m.state;
    kiosk.statusAt = Date.now();
    if (m.agent_version) kiosk.agentVersion = m.agent_version;
  } else if (m.kind === "heartbeat") {
    kiosk.heartbeat = m;
  } else if (m.kind === "scan") {
    kiosk.scan = { id: m.scan_id, state: m.state, reason: m.reason, at: m.at };
  }
  queueRender(kiosk);
}

function upsertAlert(a, announceChange) {
  const previous = state.alerts.get(a.alert_id);
  const kiosk = ensureKiosk(a.kiosk_id);
  if (a.state === "cleared") {
    state.alerts.delete(a.alert_id);
  } else {
    state.alerts.set(a.alert_id, { ...a, receivedAt: Date.now() });
    const escalated =
      previous &&
      (SEVERITY_RANK[a.severity] > SEVERITY_RANK[previous.severity] ||
        (previous.state === "acknowledged" && a.state === "raised"));
    if (announceChange && a.state === "raised" && (!previous || escalated)) {
      announce(a);
    }
  }
  renderAlerts(kiosk);
  renderAlertSummary();
}

async function acknowledge(alertId, button) {
  button.disabled = true;
  button.textContent = "Acknowledging…";
  const before = state.alerts.get(alertId)?.receivedAt;
  try {
    const record = await api(`/api/v1/alerts/${alertId}/ack`, { method: "POST" });
    // The live feed may already have brought this change, or a newer one.
    if (state.alerts.get(alertId)?.receivedAt === before) upsertAlert(record, false);
  } catch (err) {
    if (err instanceof AuthError) return;
    if (err instanceof HttpError && err.status === 403) {
      button.textContent = "Not allowed with this token";
      return;
    }
    if (err instanceof HttpError && err.status === 404) {
      const a = state.alerts.get(alertId);
      if (a) upsertAlert({ ...a, state: "cleared" }, false);
      return;
    }
    button.disabled = false;
    button.textContent = "Acknowledge (failed, retry)";
  }
}

// ---- Sound and announcements ------------------------------------------------

let audio = null;

function announce(a) {
  const what = `${a.severity} alert, kiosk ${a.kiosk_id}: ${a.message}`;
  $("#announcer").textContent = a.estimate ? `${what} (from an estimate)` : what;
  if ($("#sound").checked) beep(SEVERITY_RANK[a.severity]);
}

function beep(count) {
  audio ||= new AudioContext();
  if (audio.state === "suspended") audio.resume(); // needs a user gesture first
  const start = audio.currentTime + 0.05;
  for (let i = 0; i < count; i++) {
    const osc = audio.createOscillator();
    const gain = audio.createGain();
    osc.frequency.value = 880;
    gain.gain.setValueAtTime(0.2, start + i * 0.3);
    gain.gain.setValueAtTime(0, start + i * 0.3 + 0.18);
    osc.connect(gain).connect(audio.destination);
    osc.start(start + i * 0.3);
    osc.stop(start + i * 0.3 + 0.2);
  }
}

// ---- Rendering: tiles -------------------------------------------------------

const pending = new Set();
let renderTimer = null;

function queueRender(kiosk) {
  pending.add(kiosk);
  renderTimer ||= setTimeout(() => {
    renderTimer = null;
    for (const k of pending) renderTile(k);
    pending.clear();
  }, 16);
}

function createTile(kiosk) {
  const el = $("#tile-template").content.firstElementChild.cloneNode(true);
  el.dataset.kiosk = kiosk.id;
  $(".open", el).textContent = kiosk.id;
  const list = $(".metrics", el);
  for (const metric of TILE_METRICS) {
    const info = METRICS[metric];
    const row = $("#metric-template").content.firstElementChild.cloneNode(true);
    row.dataset.metric = metric;
    $(".label", row).textContent = info.label;
    $(".unit", row).textContent = info.unit;
    $(".est", row).hidden = !info.estimate;
    list.append(row);
  }
  el.addEventListener("click", (ev) => {
    if (!ev.target.closest(".alert button")) openDetail(kiosk.id);
  });
  kiosk.el = el;

  // Keep tiles in kiosk-id order.
  const container = $("#kiosks");
  const next = [...container.children].find((c) => c.dataset.kiosk > kiosk.id);
  container.insertBefore(el, next || null);
  $("#empty").hidden = true;
  renderAlerts(kiosk);
}

function renderTile(kiosk) {
  const el = kiosk.el;
  el.dataset.state = kiosk.state;
  const badge = $(".badge.state", el);
  badge.textContent = kiosk.state;
  badge.dataset.state = kiosk.state;

  const scan = kiosk.scan;
  $(".scan-state", el).textContent = scan ? scan.state.replace("_", " ") : "none yet";
  $(".scan-id", el).textContent = scan ? scan.id.slice(0, 8) : "";
  $(".scan-id", el).title = scan ? scan.id : "";

  for (const metric of TILE_METRICS) {
    const r = kiosk.latest[metric];
    if (!r) continue;
    const row = $(`.metric[data-metric="${metric}"]`, el);
    const info = METRICS[metric];
    $(".value", row).textContent = r.value.toFixed(info.digits);
    const quality = $(".quality", row);
    quality.textContent = `q ${r.quality.toFixed(2)}`;
    row.classList.toggle("low-quality", r.quality < LOW_QUALITY);
    quality.title =
      r.quality < LOW_QUALITY
        ? "Low signal quality: interpret with care"
        : "Signal quality, 0 to 1";
    $(".est", row).hidden = !(r.estimate ?? info.estimate);
    // A value from the previous patient's scan must not pass for this one's.
    const earlier = Boolean(
      scan && r.scan_id && r.scan_id !== scan.id && Date.parse(scan.at) > Date.parse(r.measured_at),
    );
    $(".prev", row).hidden = !earlier;
    row.classList.toggle("earlier-scan", earlier);
    row.dataset.readingId = r.id;
    if (kiosk.dirty.has(metric)) drawSpark($(".spark", row), kiosk.spark[metric]);
  }
  kiosk.dirty.clear();

  const hb = kiosk.heartbeat;
  $(".health", el).textContent = hb
    ? `· camera ${hb.camera}, ${Number(hb.fps).toFixed(0)} fps, queue ${hb.queue_depth}`
    : "";
  renderFreshness(kiosk);
}

// Stale and offline marking; runs on every render and once a second.
function renderFreshness(kiosk) {
  const el = kiosk.el;
  const now = Date.now();
  const hasValues = Object.keys(kiosk.latest).length > 0;
  const stale = hasValues && now - kiosk.freshAt > state.staleMs;
  el.classList.toggle("stale", stale);
  el.classList.toggle("offline", kiosk.state === "offline");
  $(".badge.stale", el).hidden = !stale;
  for (const metric of TILE_METRICS) {
    const r = kiosk.latest[metric];
    if (!r) continue;
    const stale = now - r.freshAt > state.staleMs;
    $(`.metric[data-metric="${metric}"]`, el).dataset.fresh = stale ? "stale" : "fresh";
  }
  $(".seen", el).textContent = hasValues
    ? `last reading ${ago(now - kiosk.freshAt)}`
    : "no reading yet";
}

function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function renderAlerts(kiosk) {
  const box = $(".alerts", kiosk.el);
  const open = [...state.alerts.values()]
    .filter((a) => a.kiosk_id === kiosk.id)
    .sort(
      (a, b) =>
        SEVERITY_RANK[b.severity] - SEVERITY_RANK[a.severity] || b.alert_id - a.alert_id,
    );
  box.replaceChildren(...open.map(alertElement));
  kiosk.el.dataset.alert = open.length ? open[0].severity : "none";
}

function alertElement(a) {
  const el = document.createElement("div");
  el.className = "alert";
  el.dataset.alertId = a.alert_id;
  el.dataset.severity = a.severity;
  el.dataset.state = a.state;
  el.classList.toggle("flashing", a.state === "raised");

  const text = document.createElement("p");
  const sev = document.createElement("strong");
  sev.textContent = a.severity.toUpperCase();
  text.append(sev, ` ${a.message}`);
  if (a.estimate) {
    const est = document.createElement("span");
    est.className = "est";
    est.textContent = "estimate";
    text.append(" ", est);
  }
  const when = document.createElement("small");
  when.textContent =
    a.state === "acknowledged"
      ? ` acknowledged ${clock(a.acknowledged_at)}`
      : ` since ${clock(a.raised_at)}`;
  text.append(when);
  el.append(text);

  if (a.state === "raised") {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "ack";
    button.textContent = "Acknowledge";
    button.setAttribute("aria-label", `Acknowledge ${a.severity} alert on kiosk ${a.kiosk_id}`);
    button.addEventListener("click", () => acknowledge(a.alert_id, button));
    el.append(button);
  }
  return el;
}

function renderAlertSummary() {
  const open = [...state.alerts.values()];
  const el = $("#alert-summary");
  if (!open.length) {
    el.textContent = "";
    el.dataset.severity = "none";
    return;
  }
  const rank = (a) => SEVERITY_RANK[a.severity];
  const top = open.reduce((a, b) => (rank(b) > rank(a) ? b : a));
  const waiting = open.filter((a) => a.state === "raised").length;
  el.dataset.severity = top.severity;
  const plural = open.length > 1 ? "s" : "";
  el.textContent = `${open.length} open alert${plural}, ${waiting} not acknowledged`;
}

// ---- Charts -----------------------------------------------------------------

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// Size a canvas's backing store to its CSS box at the screen's pixel ratio.
function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width;
  const h = canvas.clientHeight || canvas.height;
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function scale(points, w, h, pad) {
  const t0 = points[0].t;
  const t1 = points[points.length - 1].t;
  let lo = Math.min(...points.map((p) => p.v));
  let hi = Math.max(...points.map((p) => p.v));
  if (hi - lo < 1e-9) {
    lo -= 1;
    hi += 1;
  }
  return {
    lo,
    hi,
    // A single point sits at the right edge, where "now" is.
    x: (t) => pad.left + (t1 === t0 ? 1 : (t - t0) / (t1 - t0)) * (w - pad.left - pad.right),
    y: (v) => pad.top + (1 - (v - lo) / (hi - lo)) * (h - pad.top - pad.bottom),
  };
}

function drawSpark(canvas, points) {
  const { ctx, w, h } = prepare(canvas);
  if (!points || !points.length) return;
  const s = scale(points, w, h, { left: 2, right: 4, top: 3, bottom: 3 });
  ctx.strokeStyle = cssVar("--ink");
  ctx.lineWidth = 1.25;
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(s.x(p.t), s.y(p.v)) : ctx.moveTo(s.x(p.t), s.y(p.v))));
  ctx.stroke();
  const last = points[points.length - 1];
  ctx.fillStyle = last.q < LOW_QUALITY ? cssVar("--muted") : cssVar("--accent");
  ctx.beginPath();
  ctx.arc(s.x(last.t), s.y(last.v), 2.5, 0, Math.PI * 2);
  ctx.fill();
}

function drawChart(canvas, points, estimate) {
  const { ctx, w, h } = prepare(canvas);
  if (!points.length) return;
  const pad = { left: 44, right: 10, top: 10, bottom: 20 };
  const s = scale(points, w, h, pad);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = cssVar("--muted");
  ctx.strokeStyle = cssVar("--grid");
  ctx.lineWidth = 1;
  const digits = s.hi - s.lo < 3 ? 1 : 0; // keep the three labels distinct
  for (const v of [s.lo, (s.lo + s.hi) / 2, s.hi]) {
    ctx.beginPath();
    ctx.moveTo(pad.left, s.y(v));
    ctx.lineTo(w - pad.right, s.y(v));
    ctx.stroke();
    ctx.fillText(v.toFixed(digits), 4, s.y(v) + 4);
  }
  ctx.fillText(new Date(points[0].t).toLocaleTimeString(), pad.left, h - 5);
  const endLabel = new Date(points[points.length - 1].t).toLocaleTimeString();
  ctx.fillText(endLabel, w - pad.right - ctx.measureText(endLabel).width, h - 5);

  ctx.strokeStyle = cssVar("--accent");
  ctx.lineWidth = 1.5;
  ctx.setLineDash(estimate ? [5, 3] : []);
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(s.x(p.t), s.y(p.v)) : ctx.moveTo(s.x(p.t), s.y(p.v))));
  ctx.stroke();
  ctx.setLineDash([]);
  // Low-quality points are hollow.
  for (const p of points) {
    ctx.beginPath();
    ctx.arc(s.x(p.t), s.y(p.v), 3, 0, Math.PI * 2);
    if (p.q < LOW_QUALITY) {
      ctx.fillStyle = cssVar("--paper");
      ctx.fill();
      ctx.strokeStyle = cssVar("--muted");
      ctx.stroke();
    } else {
      ctx.fillStyle = cssVar("--accent");
      ctx.fill();
    }
  }
}

// ---- Detail view ------------------------------------------------------------

// Show the kiosk's current scan; while it has no readings yet, the latest scan
// that has some, labelled as such, until the current one produces its first.
async function openDetail(kioskId) {
  const kiosk = state.kiosks.get(kioskId);
  const latestReading = Object.values(kiosk.latest).sort(byTime).pop();
  const currentScanId = kiosk.scan ? kiosk.scan.id : latestReading?.scan_id ?? null;
  const d = { kioskId, currentScanId, scanId: currentScanId, readings: new Map(), loading: true };
  state.detail = d;
  $("#detail-title").textContent = `Kiosk ${kioskId}`;
  $("#detail-status").textContent = "Loading history…";
  $("#detail-charts").replaceChildren();
  renderDetailInfo();
  const dialog = $("#detail");
  if (!dialog.open) dialog.showModal();

  // The scans' readings lie after the first measurement the tile knows; look
  // further back in case the page joined mid-scan.
  const known = Object.values(kiosk.spark)
    .flat()
    .map((p) => p.t);
  const first = known.length ? Math.min(...known) : Date.now() + state.clockOffsetMs;
  const since = new Date(first - RECENT_READINGS_MS).toISOString();
  const byScan = new Map();
  try {
    let cursor = null;
    for (let page = 0; page < MAX_PAGES && state.detail === d; page++) {
      const query = new URLSearchParams({ kiosk_id: kioskId, since, limit: PAGE_SIZE });
      if (cursor) query.set("cursor", cursor);
      const body = await api(`/api/v1/readings?${query}`);
      for (const r of body.items) {
        if (!byScan.has(r.scan_id)) byScan.set(r.scan_id, new Map());
        byScan.get(r.scan_id).set(r.id, r);
      }
      cursor = body.next_cursor;
      if (!cursor) break;
    }
    $("#detail-status").textContent = "";
  } catch {
    $("#detail-status").textContent = "Could not load the history; showing what arrived live.";
  }
  if (state.detail !== d) return;

  for (const [id, r] of byScan.get(d.scanId) || []) d.readings.set(id, r);
  if (!d.readings.size && latestReading && byScan.has(latestReading.scan_id)) {
    d.scanId = latestReading.scan_id;
    d.readings = new Map(byScan.get(d.scanId));
  }
  d.loading = false;
  renderDetailInfo();
  renderDetail();
}

function detailWants(d, r) {
  if (r.kiosk_id !== d.kioskId) return false;
  if (d.scanId !== d.currentScanId && r.scan_id === d.currentScanId) {
    // The current scan produced its first reading: switch to it.
    d.scanId = d.currentScanId;
    d.readings = new Map();
    $("#detail-charts").replaceChildren();
    renderDetailInfo();
  }
  return d.scanId === null || r.scan_id === d.scanId;
}

function renderDetailInfo() {
  const d = state.detail;
  const kiosk = state.kiosks.get(d.kioskId);
  const version = kiosk.agentVersion ? `, agent ${kiosk.agentVersion}` : "";
  const scanState = kiosk.scan ? ` (${kiosk.scan.state.replace("_", " ")})` : "";
  let text;
  if (d.scanId === null) {
    text = `No scan yet; kiosk ${kiosk.state}${version}. Showing the last readings.`;
  } else if (d.scanId === d.currentScanId) {
    text = `Latest scan ${d.scanId}${scanState}; kiosk ${kiosk.state}${version}.`;
  } else {
    text =
      `Scan ${d.currentScanId}${scanState} has no readings yet; showing the ` +
      `previous scan ${d.scanId}. Kiosk ${kiosk.state}${version}.`;
  }
  $("#detail-info").textContent = text;
  $("#detail").classList.toggle("previous-scan", d.scanId !== d.currentScanId);
}

let detailFrame = null;

function queueDetailRender() {
  if (state.detail && !state.detail.loading) detailFrame ||= setTimeout(renderDetail, 100);
}

function renderDetail() {
  detailFrame = null;
  const d = state.detail;
  if (!d || !$("#detail").open) return;
  const byMetric = {};
  for (const r of d.readings.values()) (byMetric[r.metric] ||= []).push(r);
  const box = $("#detail-charts");
  for (const metric of Object.keys(METRICS)) {
    const info = METRICS[metric];
    const readings = (byMetric[metric] || []).sort(byTime);
    let fig = $(`figure[data-metric="${metric}"]`, box);
    if (!fig) {
      fig = document.createElement("figure");
      fig.dataset.metric = metric;
      fig.innerHTML = "<figcaption></figcaption><canvas></canvas>";
      box.append(fig);
    }
    const caption = $("figcaption", fig);
    if (!readings.length) {
      caption.textContent = `${info.label}: no readings in this scan`;
      fig.classList.add("empty");
      continue;
    }
    fig.classList.remove("empty");
    const values = readings.map((r) => r.value);
    const last = readings[readings.length - 1];
    const low = readings.filter((r) => r.quality < LOW_QUALITY).length;
    caption.textContent =
      `${info.label}${info.estimate ? " (estimate)" : ""}: ` +
      `${readings.length} reading${readings.length > 1 ? "s" : ""}, ` +
      `last ${last.value.toFixed(info.digits)} ${info.unit}, range ` +
      `${Math.min(...values).toFixed(info.digits)}–${Math.max(...values).toFixed(info.digits)}` +
      (low ? `, ${low} of low quality (hollow)` : "");
    const points = readings.map((r) => ({
      t: Date.parse(r.measured_at),
      v: r.value,
      q: r.quality,
    }));
    drawChart($("canvas", fig), points, info.estimate);
  }
}

// ---- Start ------------------------------------------------------------------

// `make demo` prints the page address with `#token=...`: the fragment never
// reaches a server. Keep the token for this tab and drop it from the address bar.
function takeTokenFromAddress() {
  const params = new URLSearchParams(location.hash.slice(1));
  const t = params.get("token");
  if (!t) return;
  if (TOKEN_PATTERN.test(t)) sessionStorage.setItem(TOKEN_KEY, t);
  history.replaceState(null, "", location.pathname + location.search);
}

function start() {
  takeTokenFromAddress();
  renderAuth();
  const sound = $("#sound");
  sound.checked = localStorage.getItem(SOUND_KEY) === "on";
  sound.addEventListener("change", () => {
    localStorage.setItem(SOUND_KEY, sound.checked ? "on" : "off");
    if (sound.checked) beep(1); // also unlocks audio, which needs a user gesture
  });
  $("#signin").addEventListener("click", () => openSignIn(""));
  $("#signout").addEventListener("click", signOut);
  $("#signin-cancel").addEventListener("click", () => $("#signin-dialog").close());
  $("#signin-form").addEventListener("submit", (ev) => {
    if (!signIn($("#token").value)) ev.preventDefault();
  });
  $("#detail").addEventListener("close", () => {
    state.detail = null;
  });
  window.addEventListener("online", () => {
    if (!conn.socket && !conn.abort) reconnectNow();
  });
  setInterval(() => {
    state.kiosks.forEach(renderFreshness);
    checkExpiry();
  }, TICK_MS);
  connect();
}

start();
