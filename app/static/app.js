// Demo page for the video search API: search, results with score bars, playback, uploads, library.
"use strict";

const KEY_STORAGE = "tvs-api-key";
const $ = (id) => document.getElementById(id);

const state = { health: null, lastQuery: "", searching: false, lastBody: null, nextToken: null };

// ---- helpers ------------------------------------------------------------------------------------
function fmtTime(seconds) {
  if (seconds == null || !isFinite(seconds)) return "–";
  const s = Math.max(0, seconds);
  const m = Math.floor(s / 60);
  const rest = s - m * 60;
  return `${m}:${rest < 10 ? "0" : ""}${rest.toFixed(rest < 10 && rest % 1 ? 1 : 0)}`;
}

function fmtBytes(n) {
  if (n == null) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.message) return body.message;
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  } catch (_) { /* not JSON */ }
  return `The server answered ${response.status} ${response.statusText}`;
}

function showMessage(text, kind) {
  const el = $("message");
  el.hidden = !text;
  el.textContent = text || "";
  el.className = `message ${kind || ""}`;
}

function apiKeyHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE) || $("upload-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

// ---- access: a private library answers 401 until the key is given ------------------------------
// The key goes in a header on API calls; POST /session also sets an HttpOnly cookie, which is what lets
// <video> and <img> tags (they cannot send headers) load media and thumbnails.
let keyPrompt = null;

async function startSession(key) {
  const response = await fetch("/session", { method: "POST", headers: { "X-API-Key": key } });
  if (response.ok) {
    sessionStorage.setItem(KEY_STORAGE, key);
    $("upload-key").value = key;
  }
  return response;
}

// One prompt however many requests were refused; resolves true once a key is accepted, false if dismissed.
function askForKey() {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  keyPrompt = new Promise((resolve) => {
    const finish = (ok) => {
      $("key-form").removeEventListener("submit", submit);
      dialog.removeEventListener("cancel", cancel);
      if (dialog.open) dialog.close();
      keyPrompt = null;
      resolve(ok);
    };
    const submit = async (e) => {
      e.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      $("key-submit").disabled = true;
      try {
        const response = await startSession(key);
        if (response.ok) { finish(true); return; }
        $("key-error").textContent = response.status === 401 ? "That key is not valid." : await errorText(response);
      } catch (err) {
        $("key-error").textContent = `The server could not be reached (${err.message}).`;
      } finally {
        $("key-submit").disabled = false;
      }
      $("key-error").hidden = false;
    };
    const cancel = () => finish(false);
    $("key-form").addEventListener("submit", submit);
    dialog.addEventListener("cancel", cancel);
    $("key-error").hidden = true;
    $("key-input").value = "";
    dialog.showModal();
    $("key-input").focus();
  });
  return keyPrompt;
}

// fetch() with the key; on 401, ask for the key once and try again.
async function apiFetch(url, options = {}) {
  const call = () => fetch(url, { ...options, headers: { ...(options.headers || {}), ...apiKeyHeaders() } });
  const response = await call();
  if (response.status !== 401 || !(await askForKey())) return response;
  return call();
}

// ---- health -------------------------------------------------------------------------------------
async function refreshHealth() {
  try {
    const response = await fetch("/health");
    const body = await response.json();
    state.health = body;
    const ready = response.ok && body.ready;
    $("status-dot").className = `dot ${ready ? "ok" : "warn"}`;
    $("status-text").textContent = ready
      ? `${body.index.size.toLocaleString()} moment${body.index.size === 1 ? "" : "s"} indexed · ${body.model.id} · ${body.model.device}`
      : "starting…";
    $("apikey-field").hidden = !body.auth_required;
    if (body.auth_required && sessionStorage.getItem(KEY_STORAGE)) {
      $("upload-key").value = sessionStorage.getItem(KEY_STORAGE);
    }
  } catch (_) {
    $("status-dot").className = "dot bad";
    $("status-text").textContent = "server unreachable";
  }
}

// ---- search -------------------------------------------------------------------------------------
// The search in the address bar (?q=…&limit=…): shareable, and back/forward walk through searches.
function searchUrl(query) {
  const params = new URLSearchParams({ q: query });
  params.set("limit", $("opt-limit").value);
  if (!$("opt-rerank").checked) params.set("rerank", "0");
  if ($("opt-group").checked) params.set("group", "video");
  const minScore = new URLSearchParams(location.search).get("min_score");
  if (minScore !== null) params.set("min_score", minScore);
  return `?${params}`;
}

function applyUrl() {
  const params = new URLSearchParams(location.search);
  const limit = params.get("limit");
  if (limit && /^\d+$/.test(limit)) {
    const select = $("opt-limit");
    if (![...select.options].some((o) => o.value === limit)) select.add(new Option(limit));
    select.value = limit;
  }
  $("opt-rerank").checked = params.get("rerank") !== "0";
  $("opt-group").checked = params.get("group") === "video";
  const query = params.get("q") || "";
  $("query").value = query;
  return query;
}

async function search(query, { push = true } = {}) {
  query = query.trim();
  if (!query) {
    showMessage("Type a few words describing the moment you are looking for.", "info");
    return;
  }
  if (push && location.search !== searchUrl(query)) history.pushState({ q: query }, "", searchUrl(query));
  state.lastQuery = query;
  const body = {
    query,
    limit: Number($("opt-limit").value),
    rerank: $("opt-rerank").checked,
    group_by: $("opt-group").checked ? "video" : "segment",
  };
  const minScore = new URLSearchParams(location.search).get("min_score");
  if (minScore !== null) body.min_score = Number(minScore);
  state.lastBody = body;
  await runSearch(body, false);
}

async function runSearch(body, append) {
  state.searching = true;
  $("search-button").disabled = true;
  $("more").disabled = true;
  if (!append) $("summary").textContent = "Searching…";
  try {
    const response = await apiFetch("/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      $("summary").textContent = "";
      $("results").replaceChildren();
      $("no-match").hidden = true;
      $("more").hidden = true;
      showMessage(await errorText(response), "error");
      return;
    }
    renderResults(await response.json(), append);
  } catch (err) {
    showMessage(`The search could not reach the server (${err.message}).`, "error");
  } finally {
    state.searching = false;
    $("search-button").disabled = false;
    $("more").disabled = false;
  }
}

function moreResults() {
  if (state.nextToken && state.lastBody) runSearch({ ...state.lastBody, page_token: state.nextToken }, true);
}

function renderResults(data, append) {
  const list = $("results");
  if (!append) list.replaceChildren();
  state.nextToken = data.next_page_token;
  $("more").hidden = !data.next_page_token;
  const t = data.timings_ms;
  $("timings").textContent = ["encode", "faiss", "tokens", "rerank"]
    .map((k) => `${k} ${t[k].toFixed(1)} ms`).join(" · ") + ` · total ${t.total.toFixed(1)} ms`;
  // No hit reached the cut-off: say so, and show the best guesses below it.
  $("no-match").hidden = !data.no_good_match;
  if (data.no_good_match) {
    const cut = data.cutoff.source === "model"
      ? `the model's cut-off (score ${data.cutoff.min_score.toFixed(3)}, calibrated for ${Math.round(100 * data.cutoff.precision_target)}% precision)`
      : `your minimum score ${data.cutoff.min_score}`;
    $("no-match-text").textContent = `Nothing for “${data.query}” reached ${cut}. The best guesses are below; they may be wrong.`;
  }
  const shown = data.no_good_match ? data.best_guesses : data.results;
  if (!shown.length && !append) {
    $("summary").textContent = "";
    const empty = state.health && state.health.index && state.health.index.size === 0;
    showMessage(empty
      ? "Your library is empty. Upload a video on the right; it becomes searchable as soon as it is indexed."
      : "Nothing matched. Try other words, or fewer filters.", "info");
    return;
  }
  showMessage("");
  const reranked = data.model.reranked ? ` · re-ranked top ${data.model.top_k} with the focused view` : "";
  const count = list.children.length + shown.length;
  $("summary").textContent = data.no_good_match
    ? `${shown.length} best guess${shown.length === 1 ? "" : "es"} for “${data.query}”${reranked}`
    : `${count} moment${count === 1 ? "" : "s"} for “${data.query}”${reranked}`;
  const scores = shown.map((r) => r.broad_score).concat(shown.map((r) => r.score));
  const lo = Math.min(0, ...scores);
  const hi = Math.max(...scores, lo + 1e-6);
  const pct = (v) => `${(100 * (v - lo)) / (hi - lo)}%`;
  const template = $("result-template");
  for (const r of shown) {
    const item = template.content.firstElementChild.cloneNode(true);
    if (r.below_threshold) item.classList.add("guess");
    item.dataset.videoId = r.video_id;
    item.dataset.segmentId = r.segment_id;
    const img = item.querySelector("img");
    if (r.thumbnail_url) img.src = r.thumbnail_url; else img.classList.add("missing");
    item.querySelector(".range").textContent = `${fmtTime(r.start)} – ${fmtTime(r.end)}`;
    item.querySelector(".rank").textContent = `#${r.rank}`;
    item.querySelector(".card-title").textContent = r.title || `Video ${r.video_id}`;
    // The bar: broad score, then the focused view's correction drawn from there (green up, red down).
    const broad = item.querySelector(".scorebar-broad");
    const delta = item.querySelector(".scorebar-delta");
    broad.style.width = pct(r.broad_score);
    if (r.delta != null && r.delta !== 0) {
      const from = pct(Math.min(r.broad_score, r.score));
      const to = pct(Math.max(r.broad_score, r.score));
      delta.style.left = from;
      delta.style.width = `calc(${to} - ${from})`;
      delta.classList.add(r.delta > 0 ? "up" : "down");
    }
    const deltaText = r.delta == null ? "" : ` ${r.delta >= 0 ? "+" : "−"} ${Math.abs(r.delta).toFixed(3)}`;
    item.querySelector(".scorebar").setAttribute("aria-label",
      `broad score ${r.broad_score.toFixed(3)}, focused correction${deltaText || " none"}`);
    item.querySelector(".score").textContent = `${r.score.toFixed(3)} = ${r.broad_score.toFixed(3)}${deltaText}`;
    const moved = r.broad_rank - r.rank;
    const movedEl = item.querySelector(".moved");
    if (r.delta == null) movedEl.textContent = "broad view";
    else if (moved > 0) { movedEl.textContent = `▲ ${moved}`; movedEl.classList.add("up"); }
    else if (moved < 0) { movedEl.textContent = `▼ ${-moved}`; movedEl.classList.add("down"); }
    else movedEl.textContent = "● kept";
    movedEl.title = `broad-view rank ${r.broad_rank}, now ${r.rank}`;
    item.querySelector(".card-button").addEventListener("click", () => play(r));
    list.appendChild(item);
    if (r.evidence_time != null) queueEvidence(item, r);
  }
}

// ---- evidence frames: the moment the focused view looked at, drawn from the video itself -------
const evidenceQueue = [];
let evidenceBusy = false;

function queueEvidence(item, r) {
  evidenceQueue.push({ item, r });
  if (!evidenceBusy) drainEvidence();
}

async function drainEvidence() {
  evidenceBusy = true;
  while (evidenceQueue.length) {
    const { item, r } = evidenceQueue.shift();
    if (!item.isConnected) continue;
    try { await drawEvidence(item, r); } catch (_) { /* keep the thumbnail */ }
  }
  evidenceBusy = false;
}

function drawEvidence(item, r) {
  return new Promise((resolve, reject) => {
    const video = document.createElement("video");
    video.muted = true;
    video.preload = "auto";
    const done = (ok) => { video.removeAttribute("src"); video.load(); ok ? resolve() : reject(); };
    const timer = setTimeout(() => done(false), 5000);
    video.addEventListener("error", () => { clearTimeout(timer); done(false); });
    video.addEventListener("loadedmetadata", () => { video.currentTime = Math.min(r.evidence_time, video.duration || r.evidence_time); });
    video.addEventListener("seeked", () => {
      clearTimeout(timer);
      const canvas = item.querySelector(".evidence-frame");
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
      canvas.getContext("2d").drawImage(video, 0, 0);
      canvas.hidden = false;
      canvas.title = `the frame the focused view weighted most (${fmtTime(r.evidence_time)})`;
      item.querySelector("img").hidden = true;
      item.classList.add("has-evidence");
      done(true);
    }, { once: true });
    video.src = r.media_url.split("#")[0];
  });
}

// ---- player -------------------------------------------------------------------------------------
function play(r) {
  const video = $("player-video");
  $("player").hidden = false;
  $("player-title").textContent = r.title || `Video ${r.video_id}`;
  $("player-range").textContent = `${fmtTime(r.start)} – ${fmtTime(r.end)} · rank ${r.rank} (broad view ${r.broad_rank})`;
  $("player-note").textContent = r.evidence_time != null
    ? `The focused view looked hardest at ${fmtTime(r.evidence_time)} (marked on the timeline).` : "";
  video.src = r.media_url; // carries #t=start,end, so the browser starts (and stops) at the moment
  const place = () => {
    const d = video.duration;
    if (!d || !isFinite(d)) return;
    const seg = $("timeline-segment");
    seg.style.left = `${(100 * r.start) / d}%`;
    seg.style.width = `${(100 * (r.end - r.start)) / d}%`;
    const ev = $("timeline-evidence");
    ev.hidden = r.evidence_time == null;
    if (r.evidence_time != null) ev.style.left = `${(100 * r.evidence_time) / d}%`;
  };
  video.addEventListener("loadedmetadata", place, { once: true });
  video.play().catch(() => { /* autoplay refused: the controls are there */ });
  $("player").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

// ---- upload -------------------------------------------------------------------------------------
function setUploadState(text, fraction, kind) {
  $("upload-progress").hidden = false;
  $("upload-state").textContent = text;
  $("upload-state").className = `small ${kind || ""}`;
  $("upload-fill").style.width = `${Math.round(100 * (fraction || 0))}%`;
  $("upload-fill").className = `progress-fill ${kind || ""}`;
}

function upload(file, title) {
  const form = new FormData();
  form.append("file", file);
  if (title) form.append("title", title);
  const key = $("upload-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  // XMLHttpRequest, because fetch() reports no upload progress.
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/videos");
  for (const [name, value] of Object.entries(apiKeyHeaders())) xhr.setRequestHeader(name, value);
  xhr.upload.addEventListener("progress", (e) => {
    if (e.lengthComputable) setUploadState(`Uploading ${fmtBytes(e.loaded)} of ${fmtBytes(e.total)}`, (0.5 * e.loaded) / e.total);
  });
  xhr.addEventListener("error", () => setUploadState("The upload failed: the server could not be reached.", 0, "error"));
  xhr.addEventListener("load", async () => {
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
    $("upload-button").disabled = false;
    if (xhr.status === 401 && await askForKey()) { upload(file, title); return; }
    if (xhr.status === 200 || xhr.status === 202) clearUploadForm();
    if (xhr.status === 200 && body.duplicate_of != null) {
      setUploadState(`Already in your library (video ${body.duplicate_of}, ${body.status}).`, 1, "ok");
      refreshLibrary();
      return;
    }
    if (xhr.status !== 202) {
      const text = body.message || (typeof body.detail === "string" ? body.detail : `error ${xhr.status}`);
      setUploadState(`Upload refused: ${text}`, 0, "error");
      return;
    }
    setUploadState("Uploaded. Waiting for the indexer…", 0.5);
    refreshLibrary();
    await followJob(body.job_id);
  });
  $("upload-button").disabled = true;
  setUploadState("Starting upload…", 0);
  xhr.send(form);
}

// Once the server has taken a video, the form is ready for the next one.
function clearUploadForm() {
  $("upload-file").value = "";
  $("upload-url").value = "";
  $("upload-title").value = "";
  $("drop-text").textContent = "Choose a video or drop it here";
}

function addUrl(url, title) {
  const key = $("upload-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  $("upload-button").disabled = true;
  setUploadState("Sending the URL…", 0);
  apiFetch("/videos", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(title ? { url, title } : { url }),
  }).then(async (response) => {
    $("upload-button").disabled = false;
    if (response.status !== 202) { setUploadState(`URL refused: ${await errorText(response)}`, 0, "error"); return; }
    const body = await response.json();
    clearUploadForm();
    setUploadState("Queued for download…", 0);
    refreshLibrary();
    await followJob(body.job_id);
  }).catch(() => {
    $("upload-button").disabled = false;
    setUploadState("The server could not be reached.", 0, "error");
  });
}

const OPEN_STATES = ["queued", "downloading", "decoding", "encoding"];
const STAGE_LABELS = { queued: "Queued", downloading: "Downloading", decoding: "Decoding frames", encoding: "Encoding" };

// One line for a job that is not finished: its stage and how far it is.
function jobProgress(job) {
  if (job.state === "downloading" && job.bytes_done != null) {
    return `Downloading ${fmtBytes(job.bytes_done)}${job.bytes_total ? ` of ${fmtBytes(job.bytes_total)}` : ""}`;
  }
  const pct = job.state === "queued" ? "" : ` ${Math.round(100 * job.progress)}%`;
  const retry = job.attempts > 1 ? ` (attempt ${job.attempts} of ${job.max_attempts})` : "";
  return `${STAGE_LABELS[job.state] || job.state}${pct}${retry}`;
}

async function followJob(jobId) {
  for (;;) {
    let job;
    try {
      const response = await apiFetch(`/jobs/${jobId}`);
      if (!response.ok) { setUploadState(await errorText(response), 0, "error"); return; }
      job = await response.json();
    } catch (_) {
      await new Promise((r) => setTimeout(r, 1000));
      continue;
    }
    if (job.state === "ready") {
      setUploadState("Ready: the video is searchable now.", 1, "ok");
      refreshLibrary();
      refreshHealth();
      return;
    }
    if (job.state === "failed" || job.state === "cancelled") {
      setUploadState(`Indexing ${job.state}: ${job.error || "unknown reason"}`, 1, "error");
      refreshLibrary();
      return;
    }
    setUploadState(`${jobProgress(job)}…`, job.state === "downloading" ? 0.5 * job.progress : 0.5 + 0.5 * job.progress);
    await new Promise((r) => setTimeout(r, 400));
  }
}

// ---- library ------------------------------------------------------------------------------------
let libraryTimer = null;

async function act(method, url) {
  const response = await apiFetch(url, { method });
  if (!response.ok) setUploadState(await errorText(response), 0, "error");
  refreshLibrary();
}

function actionButton(label, method, url) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "ghost small";
  button.textContent = label;
  button.addEventListener("click", () => act(method, url));
  return button;
}

// A row: thumbnail, title, a detail line (size, progress or the failure's reason), a state badge, actions.
function libraryRow({ thumb, title, detail, error, badge, actions }) {
  const li = document.createElement("li");
  const img = document.createElement("img");
  img.alt = "";
  if (thumb) img.src = thumb; else img.classList.add("missing");
  const text = document.createElement("div");
  text.className = "library-text";
  const name = document.createElement("span");
  name.className = "library-title";
  name.textContent = title;
  const info = document.createElement("span");
  info.className = error ? "library-error small" : "muted small";
  info.textContent = detail;
  if (error) info.title = detail;
  text.append(name, info);
  const state = document.createElement("span");
  state.className = `badge ${badge}`;
  state.textContent = badge;
  const buttons = document.createElement("div");
  buttons.className = "library-actions";
  buttons.append(...actions);
  li.append(img, text, state, buttons);
  return li;
}

function jobActions(job) {
  if (OPEN_STATES.includes(job.state)) return [actionButton("Cancel", "DELETE", `/jobs/${job.id}`)];
  if (job.state === "failed" || job.state === "cancelled") return [actionButton("Retry", "POST", `/jobs/${job.id}/retry`)];
  return [];
}

async function refreshLibrary() {
  clearTimeout(libraryTimer);
  try {
    const [videosResponse, jobsResponse] = await Promise.all([apiFetch("/videos?limit=50"), apiFetch("/jobs?limit=100")]);
    if (!videosResponse.ok) return;
    const page = await videosResponse.json();
    const jobs = jobsResponse.ok ? (await jobsResponse.json()).data : [];
    const latest = new Map();  // video id -> its newest job
    for (const job of jobs) if (job.video_id != null && !latest.has(job.video_id)) latest.set(job.video_id, job);
    // URLs whose job has not made a video yet (downloading, or failed before it had one).
    const downloads = jobs.filter((job) => job.video_id == null && job.url && job.state !== "ready");
    const list = $("library");
    list.replaceChildren();
    $("library-empty").hidden = page.count + downloads.length > 0;
    let busy = false;
    for (const job of downloads) {
      const open = OPEN_STATES.includes(job.state);
      busy = busy || open;
      list.appendChild(libraryRow({
        thumb: null,
        title: job.title || job.url,
        detail: open ? jobProgress(job) : job.error || job.state,
        error: !open,
        badge: open ? (job.state === "queued" ? "queued" : "running") : "failed",
        actions: jobActions(job),
      }));
    }
    for (const v of page.data) {
      const job = latest.get(v.id);
      const open = job != null && OPEN_STATES.includes(job.state);
      busy = busy || open;
      const size = [v.duration != null ? fmtTime(v.duration) : "", fmtBytes(v.size_bytes)].filter(Boolean).join(" · ");
      let badge = v.status === "ready" ? "indexed" : v.status;
      if (open) badge = job.state === "queued" ? "queued" : "running";
      const failed = !open && v.status === "failed";
      const actions = job != null && v.status !== "ready" ? jobActions(job) : [];
      actions.push(actionButton("Delete", "DELETE", `/videos/${v.id}`));
      list.appendChild(libraryRow({
        thumb: v.thumbnail_url,
        title: v.title || v.filename || `Video ${v.id}`,
        detail: open ? jobProgress(job) : failed ? v.error || "failed" : size,
        error: failed,
        badge,
        actions,
      }));
    }
    if (page.count > page.data.length) {
      const more = document.createElement("li");
      more.className = "muted small";
      more.textContent = `and ${page.count - page.data.length} more`;
      list.appendChild(more);
    }
    if (busy) libraryTimer = setTimeout(refreshLibrary, 1500);  // follow progress while jobs run
  } catch (_) { /* the status chip already says the server is unreachable */ }
}

// Example queries come from the server: captions of clips in this library (`make demo` writes them).
async function loadExamples() {
  const examples = $("examples");
  try {
    const response = await apiFetch("/demo/examples");
    if (!response.ok) return;
    const body = await response.json();
    for (const example of body.examples) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip";
      chip.textContent = example.query;
      chip.addEventListener("click", () => { $("query").value = example.query; search(example.query); });
      examples.appendChild(chip);
    }
    examples.hidden = body.examples.length === 0;
  } catch (_) { /* the status chip already says the server is unreachable */ }
}

// ---- wiring -------------------------------------------------------------------------------------
async function init() {
  // A key from earlier in this tab: renew the session cookie before any thumbnail loads.
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) await startSession(key).catch(() => {});
  loadExamples();
  const initial = applyUrl();
  if (initial) search(initial, { push: false });
  window.addEventListener("popstate", () => {
    const query = applyUrl();
    if (query) search(query, { push: false });
    else { state.lastQuery = ""; $("results").replaceChildren(); $("summary").textContent = ""; $("no-match").hidden = true; $("more").hidden = true; }
  });
  $("more").addEventListener("click", moreResults);
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search($("query").value); });
  for (const id of ["opt-rerank", "opt-group", "opt-limit"]) {
    $(id).addEventListener("change", () => { if (state.lastQuery) search(state.lastQuery); });
  }
  $("player-close").addEventListener("click", () => { $("player-video").pause(); $("player").hidden = true; });
  $("upload-file").addEventListener("change", () => {
    const file = $("upload-file").files[0];
    $("drop-text").textContent = file ? `${file.name} · ${fmtBytes(file.size)}` : "Choose a video or drop it here";
  });
  $("upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const file = $("upload-file").files[0];
    const url = $("upload-url").value.trim();
    if (file) upload(file, $("upload-title").value.trim());
    else if (url) addUrl(url, $("upload-title").value.trim());
    else setUploadState("Choose a video file, or give its URL, first.", 0, "error");
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) {
      $("upload-file").files = e.dataTransfer.files;
      $("upload-file").dispatchEvent(new Event("change"));
    }
  });
  $("library-refresh").addEventListener("click", refreshLibrary);
  refreshHealth();
  refreshLibrary();
  setInterval(refreshHealth, 15000);
  $("query").focus();
}

document.addEventListener("DOMContentLoaded", init);
