// The radiologist's page: plain JS, no build step. All data is inserted with textContent (never as HTML).
//
// What is on screen belongs to one study: every selection gets a token and an AbortController; a
// response for an earlier selection is dropped (and its requests aborted), so a slow answer for study A
// can never land beside study B. "Approve" signs exactly the version displayed: it sends that version's
// number and text, and the server refuses anything else (409).
"use strict";

const API = "/api/v1";
const KEY_STORE = "radialog.apiKey";
const PAGE_SIZE = 25;
const state = {
  offset: 0, total: 0, me: null,
  model: null,         // GET /model: what the configured model can do (actions it was not trained for are hidden)
  selection: 0,        // bumped by every study selection
  controller: null,    // aborts the requests of the previous selection
  studyId: null, study: null,
  report: null,        // the current (newest) version
  shown: null,         // the version on screen
  versions: [],
  busy: false, writing: false, conversationLoaded: null,
};

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, text) => {
  const node = Object.assign(document.createElement(tag), props);
  if (text !== undefined) node.textContent = text;
  return node;
};
const live = (token) => token === state.selection;
const isRadiologist = () => state.me !== null && state.me.role === "radiologist";

function key() { return sessionStorage.getItem(KEY_STORE); }

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${key()}` }, options.headers || {});
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(API + path, { ...options, headers });
  if (response.status === 401) { signOut("Your key was not accepted."); throw new Error("unauthenticated"); }
  if (!response.ok && response.status !== 202) {
    let problem = { title: response.statusText, detail: "" };
    try { problem = await response.json(); } catch (_) { /* not JSON */ }
    const error = new Error(problem.detail || problem.title);
    error.status = response.status;
    throw error;
  }
  return response;
}
const getJSON = async (path, signal) => (await api(path, { signal })).json();

// -- sign in -----------------------------------------------------------------------------------------
function signOut(message) {
  sessionStorage.removeItem(KEY_STORE);
  selectStudy(null);  // nothing of the last study stays for whoever signs in next
  clearStudy();
  $("study").hidden = true;
  state.me = null;
  opsEnable(false);
  $("app").hidden = true;
  $("login").hidden = false;
  $("who").replaceChildren();
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  $("api-key").value = "";
  await start();
});

async function start() {
  try {
    state.me = await getJSON("/me");
    await loadWorklist();
  } catch (error) {
    return;
  }
  try { state.model = await getJSON("/model"); } catch (_) { state.model = null; }  // unknown: show all, the API decides
  applyModel();
  $("login").hidden = true;
  $("app").hidden = false;
  const out = el("button", { type: "button", id: "sign-out" }, "Sign out");
  out.addEventListener("click", () => signOut());
  // who is signed in, by name and role: nobody works under a colleague's key unawares
  $("who").replaceChildren(el("span", { id: "who-name" }, `${state.me.name} · ${state.me.role}`), out);
  opsEnable(state.me.role === "admin");  // the operations page (ops.js) is for admins
}

// Quick actions the model was not trained for are hidden (the API refuses them too); a model without a
// findings classifier (XrayGPT) has no classifier list and no per-finding actions.
const supports = (task) => !state.model || Object.prototype.hasOwnProperty.call(state.model.tasks, task);
function applyModel() {
  for (const button of document.querySelectorAll("[data-action]")) button.hidden = !supports(button.dataset.action);
  $("ask-yes-no").hidden = !supports("yes_no");
  $("add-finding").hidden = $("remove-finding").hidden = !supports("correction");
  $("finding-actions").hidden = !supports("yes_no") && !supports("correction");
}

// -- worklist ----------------------------------------------------------------------------------------
async function loadWorklist() {
  const params = new URLSearchParams({ offset: state.offset, limit: PAGE_SIZE });
  if ($("state-filter").value) params.append("state", $("state-filter").value);
  if ($("priority-filter").value) params.append("priority", $("priority-filter").value);
  if ($("accession-filter").value.trim()) params.append("accession", $("accession-filter").value.trim());
  const page = await getJSON(`/studies?${params}`);
  state.total = page.total;
  const rows = page.items.map((s) => {
    const row = el("tr");
    row.dataset.studyId = s.id;
    if (s.id === state.studyId) row.classList.add("current");
    const date = s.study_date ? `${s.study_date.slice(0, 4)}-${s.study_date.slice(4, 6)}-${s.study_date.slice(6)}` : "";
    const report = s.latest_report_version ? `v${s.latest_report_version}${s.verified ? " ✔" : " (draft)"}` : "";
    row.append(el("td", {}, date), el("td", {}, s.patient_name || ""), el("td", {}, s.accession_number || ""));
    const st = el("td");
    st.append(el("span", { className: `state ${s.state}` }, s.state));
    if (s.priority && s.priority !== "ROUTINE") st.append(" ", el("span", { className: `priority ${s.priority}` }, s.priority));
    row.append(st, el("td", {}, report));
    row.addEventListener("click", () => openStudy(s.id));
    return row;
  });
  $("worklist").tBodies[0].replaceChildren(...rows);
  const last = Math.min(state.offset + PAGE_SIZE, state.total);
  $("page-info").textContent = state.total ? `${state.offset + 1}–${last} of ${state.total}` : "no studies";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = last >= state.total;
}

$("refresh").addEventListener("click", () => loadWorklist());
$("state-filter").addEventListener("change", () => { state.offset = 0; loadWorklist(); });
$("priority-filter").addEventListener("change", () => { state.offset = 0; loadWorklist(); });
$("accession-filter").addEventListener("change", () => { state.offset = 0; loadWorklist(); });
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); loadWorklist(); });
$("next").addEventListener("click", () => { state.offset += PAGE_SIZE; loadWorklist(); });

// -- one study ---------------------------------------------------------------------------------------
function selectStudy(id) {
  state.selection += 1;
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  Object.assign(state, { studyId: id, study: null, report: null, shown: null, versions: [], busy: false,
    writing: false, conversationLoaded: null });
  return { token: state.selection, signal: state.controller.signal };
}

function clearStudy() {
  // Nothing of the previous study may stay on screen while this one loads.
  $("study-head").textContent = "Loading…";
  delete $("study-head").dataset.studyId;
  delete $("findings-text").dataset.version;
  $("study-reason").hidden = true;
  $("study-reason").textContent = "";
  $("version-note").hidden = true;
  setBanner(null);
  $("findings-text").textContent = "";
  $("impression-block").hidden = true;
  $("impression-text").textContent = "";
  $("classifier").replaceChildren();
  $("finding-select").replaceChildren();
  $("versions").replaceChildren();
  $("chat").replaceChildren();
  $("chat-box").hidden = true;
  $("chat-send").disabled = false;
  $("edit-box").hidden = true;
  $("edit-findings").value = "";
  $("edit-impression").value = "";
  $("rerun").hidden = true;
  $("report-error").textContent = "";
  $("chat-error").textContent = "";
  checklistClear();
  updateApprove();
  viewerClear();
}

const chatAllowed = (study) => Boolean(study && study.latest_report_version) &&
  !["FAILED", "SKIPPED"].includes(study.state);

async function openStudy(id) {
  const { token, signal } = selectStudy(id);
  for (const row of $("worklist").tBodies[0].rows) row.classList.toggle("current", Number(row.dataset.studyId) === id);
  $("study").hidden = false;
  clearStudy();
  try {
    const study = await getJSON(`/studies/${id}`, signal);
    if (!live(token)) return;
    state.study = study;
    $("study-head").textContent =
      `${study.patient_name || "?"} · ${study.patient_id || ""} · accession ${study.accession_number || "-"} · ${study.state}`;
    $("study-head").dataset.studyId = id;
    const problem = ["FAILED", "SKIPPED"].includes(study.state);  // why there is no report (or no new one)
    $("study-reason").hidden = !problem;
    $("study-reason").textContent = problem ? `${study.state}: ${study.reason || "no reason recorded"}` : "";
    $("rerun").hidden = !problem || !state.me || state.me.role === "reader";
    viewerOpen(id, token, signal, null);
    if (!study.latest_report_version) { showNoReport(study); return; }
    await loadReport(token, signal);
    if (!live(token) || !chatAllowed(study)) return;
    $("chat-box").hidden = false;
    // ask() waits for this: the chat is redrawn when the conversation arrives, which would wipe a turn
    // asked in the meantime
    state.conversationLoaded = loadConversation(token, signal);
    await state.conversationLoaded;
  } catch (error) {
    if (live(token)) $("report-error").textContent = error.message;
  }
}

function showNoReport(study) {
  const why = ["FAILED", "SKIPPED"].includes(study.state) ? "" : ` (state ${study.state})`;
  $("findings-text").textContent = `No report${why}.`;
  updateApprove();
}

function setBanner(report) {
  const banner = $("report-banner");
  if (!report) { banner.className = "banner"; banner.textContent = ""; return; }
  if (report.verified) {
    banner.className = "banner verified";
    banner.textContent = `Verified by ${report.verifier} — version ${report.version}`;
  } else {
    banner.className = "banner unverified";
    banner.textContent = `AI draft — not verified (version ${report.version}, ${report.kind})`;
  }
}

function showVersion(report) {
  state.shown = report;
  setBanner(report);
  const older = state.report && report.version !== state.report.version;
  $("version-note").hidden = !older;
  $("version-note").textContent = older
    ? `You are reading version ${report.version}, not the current version ${state.report.version}.` : "";
  $("findings-text").textContent = report.findings_text;
  $("findings-text").dataset.version = report.version;
  $("impression-block").hidden = !report.impression_text;
  $("impression-text").textContent = report.impression_text || "";
  const findings = (report.document && report.document.findings) || [];
  $("classifier").replaceChildren(...findings.map((f) => el("li", { className: f.present ? "present" : "absent" },
    `${f.label}: ${f.present ? "present" : "absent"} (${Number(f.probability).toFixed(2)})`)));
  // a model without a classifier writes no coded findings: no empty "Classifier findings" heading then
  $("classifier-block").hidden = !findings.length && Boolean(state.model) && !state.model.findings_classifier;
  for (const li of $("versions").children) li.classList.toggle("shown", Number(li.dataset.version) === report.version);
  if (checklist.version !== null) $("checklist-box").hidden = report.version !== checklist.version;
  updateApprove();
}

function changesNode(changes) {
  const box = el("div", { className: "changes" });
  if (!changes) { box.textContent = "first version"; return box; }
  const part = (name, parts) => {
    const line = el("div", {}, `${name}: `);
    const changed = parts.some((p) => p.op !== "equal");
    if (!parts.length) line.append(el("span", { className: "same" }, "none"));
    else if (!changed) line.append(el("span", { className: "same" }, "no word changed"));
    else for (const p of parts) {
      line.append(el(p.op === "insert" ? "ins" : p.op === "delete" ? "del" : "span", {}, p.text), " ");
    }
    return line;
  };
  box.append(el("div", { className: "from" }, `changes from v${changes.predecessor_version}:`),
    part("Findings", changes.findings));
  if (changes.impression.length) box.append(part("Impression", changes.impression));
  return box;
}

function renderVersions() {
  $("versions").replaceChildren(...state.versions.slice().reverse().map((v) => {
    const li = el("li");
    li.dataset.version = v.version;
    li.value = v.version;
    const title = el("button", { type: "button", className: "version-link" },
      `v${v.version} ${v.kind} by ${v.author}${v.verified ? " — verified" : ""} · ` + new Date(v.created_at).toLocaleString());
    li.addEventListener("click", () => showVersion(v));  // the title is a button for the keyboard
    li.append(title, changesNode(v.changes));
    return li;
  }));
}

async function loadReport(token, signal) {
  const all = await getJSON(`/studies/${state.studyId}/report/versions`, signal);
  if (!live(token)) return;
  state.versions = all.versions;
  state.report = all.versions.find((v) => v.version === all.current_version);
  renderVersions();
  const findings = (state.report.document && state.report.document.findings) || [];
  $("finding-select").replaceChildren(...findings.filter((f) => f.label !== "No Finding")
    .map((f) => el("option", { value: f.label }, f.label)));
  // the edit boxes always hold the current version: an edit is a new version after it
  $("edit-summary").textContent = `Edit the report (a new version after version ${state.report.version})`;
  $("edit-findings").value = state.report.findings_text;
  $("edit-impression").value = state.report.impression_text || "";
  $("edit-box").hidden = !isRadiologist();
  showVersion(state.report);
  checklistLoad(token, signal, state.report);  // the AI findings to judge before signing this version
}

// -- versions and approval ---------------------------------------------------------------------------
const editDirty = () => state.report !== null && ($("edit-findings").value !== state.report.findings_text ||
  $("edit-impression").value !== (state.report.impression_text || ""));

function updateApprove() {
  const shown = state.shown, current = state.report;
  let note = "";
  if (!shown || !current) note = "";
  else if (!isRadiologist()) note = "Only a radiologist approves and signs.";
  else if (shown.version !== current.version) {
    note = `Version ${shown.version} is not the current version: show version ${current.version} to approve it.`;
  } else if (current.verified) note = "";
  else if (editDirty()) note = "The edit box holds unsaved changes: save them as a new version, then approve that version.";
  else if (!checklistReady(current.version)) note = "Give your verdict on each AI finding (checklist above) to sign.";
  const signable = Boolean(shown && current) && shown.version === current.version && !current.verified &&
    isRadiologist() && !editDirty() && !state.writing && checklistReady(current.version);
  $("approve").disabled = !signable;
  $("approve").textContent = signable ? `Approve and sign version ${current.version}` : "Approve and sign";
  $("approve-note").textContent = note;
  $("save-edit").disabled = state.writing || !current;
}

async function newVersion(body, path = "/report/versions") {
  const token = state.selection, id = state.studyId;
  $("report-error").textContent = "";
  state.writing = true;
  updateApprove();
  try {
    // not aborted when another study is chosen: the change is made, only its answer is not shown
    await api(`/studies/${id}${path}`, { method: "POST", json: body });
    loadWorklist();
    if (live(token)) await openStudy(id);  // header state, report, versions and a fresh conversation
  } catch (error) {
    if (live(token)) $("report-error").textContent = error.message;
  } finally {
    if (live(token)) { state.writing = false; updateApprove(); }
  }
}

for (const box of ["edit-findings", "edit-impression"]) {
  $(box).addEventListener("input", () => {
    // DICOM text values hold no TAB (reporting/text.py): a pasted one becomes a space, visibly
    const input = $(box);
    if (input.value.includes("\t")) {
      const at = input.selectionStart;
      input.value = input.value.replaceAll("\t", " ");
      input.setSelectionRange(at, at);
    }
    updateApprove();
  });
}
$("save-edit").addEventListener("click", () => {
  if (!state.report) return;
  newVersion({ kind: "edit", findings_text: $("edit-findings").value,
    impression_text: $("edit-impression").value || null, base_version: state.report.version });
});
$("approve").addEventListener("click", () => {
  // Exactly the version on screen, with its text as displayed; the server checks both (409 otherwise).
  const shown = state.shown;
  if ($("approve").disabled || !shown || !state.report || shown.version !== state.report.version) return;
  if (!checklistReady(shown.version)) return;  // the verdicts belong to the version signed
  newVersion({ base_version: shown.version, findings_text: shown.findings_text,
    impression_text: shown.impression_text || "", checklist: checklistBody() }, "/report/approve");
});
$("rerun").addEventListener("click", async () => {
  const token = state.selection, id = state.studyId;
  try {
    await api(`/studies/${id}/rerun`, { method: "POST" });
    loadWorklist();
    if (live(token)) openStudy(id);
  } catch (error) {
    if (live(token)) $("report-error").textContent = error.message;
  }
});

// -- dialog ------------------------------------------------------------------------------------------
function addMessage(kind, text) {
  const node = el("div", { className: `msg ${kind}` }, text);
  $("chat").append(node);
  $("chat").scrollTop = $("chat").scrollHeight;
  return node;
}

function offerAsReport(node, turn) {
  if (!isRadiologist()) return;
  const use = el("button", { type: "button", className: "use" }, "Use this as the report");
  // a correction rewrites the findings; the current impression stays until the radiologist changes it
  use.addEventListener("click", () => newVersion({ kind: "ai_correction", findings_text: turn.answer,
    impression_text: state.report.impression_text, source_turn_id: turn.id, base_version: state.report.version }));
  node.append(use);
}

async function loadConversation(token, signal) {
  const conversation = await getJSON(`/studies/${state.studyId}/dialog`, signal);
  if (!live(token)) return;
  $("chat").replaceChildren();
  for (const turn of conversation.turns) {
    addMessage("q", turn.question);
    if (turn.state === "DONE") {
      const node = addMessage("a", turn.answer);
      if (turn.task === "correction") offerAsReport(node, turn);
    } else if (turn.state === "FAILED") {
      addMessage("a err", turn.error || "failed");
    }
  }
}

// Parse a text/event-stream body read with fetch (EventSource cannot send the key in a header).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function ask(path, body, shownQuestion, task) {
  if (state.busy || !state.report || !chatAllowed(state.study)) return;
  const token = state.selection, signal = state.controller.signal, id = state.studyId;
  state.busy = true;
  $("chat-send").disabled = true;
  $("chat-error").textContent = "";
  try { await state.conversationLoaded; } catch { /* its own error is shown; the question still goes */ }
  if (!live(token)) return;
  const question = addMessage("q", shownQuestion);
  const answer = addMessage("a pending", "");
  let turnId = null;
  try {
    const response = await api(`/studies/${id}/dialog/${path}`, { method: "POST",
      json: { ...body, stream: true }, signal });
    for await (const { event, data } of sseEvents(response)) {
      if (!live(token)) return;
      if (event === "turn") { turnId = data.turn_id; question.textContent = data.question; }
      else if (event === "token") { answer.textContent += data.text; $("chat").scrollTop = $("chat").scrollHeight; }
      else if (event === "done") {
        answer.textContent = data.answer;
        answer.classList.remove("pending");
        if (task === "correction") offerAsReport(answer, { id: turnId, answer: data.answer });
      } else if (event === "error") {
        answer.classList.remove("pending");
        answer.classList.add("err");
        answer.textContent = data.error;
      }
    }
  } catch (error) {
    if (!live(token)) return;
    answer.remove();
    $("chat-error").textContent = error.message;
  } finally {
    if (live(token)) {
      answer.classList.remove("pending");
      state.busy = false;
      $("chat-send").disabled = false;
    }
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("chat-input").value.trim();
  if (!question) return;
  $("chat-input").value = "";
  ask("questions", { question }, question, "free");
});
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
});
const ACTION_LABELS = { list: "List all findings", impression: "Write the impression", easy_language: "Easy language",
  summary: "Summary", view: "From what view was this image taken?" };
for (const button of document.querySelectorAll("[data-action]")) {
  button.addEventListener("click", () => ask("actions", { action: button.dataset.action },
    ACTION_LABELS[button.dataset.action], button.dataset.action));
}
$("ask-yes-no").addEventListener("click", () => {
  const finding = $("finding-select").value;
  if (finding) ask("actions", { action: "yes_no", finding }, `Is there any ${finding}?`, "yes_no");  // as asked
});
$("add-finding").addEventListener("click", () => {
  const finding = $("finding-select").value;
  if (finding) ask("actions", { action: "correction", add: [finding] }, `Correct: add ${finding}`, "correction");
});
$("remove-finding").addEventListener("click", () => {
  const finding = $("finding-select").value;
  if (finding) ask("actions", { action: "correction", remove: [finding] }, `Correct: remove ${finding}`, "correction");
});

// -- image viewer ------------------------------------------------------------------------------------
// The API renders the full frame at the region, size and window asked for (api/viewer.py); the page only
// keeps the view (window, zoom, centre) and asks again, one request at a time, the latest view winning.
const viewer = {
  token: -1, studyId: null, signal: null, info: null, instance: null,
  preset: null, center: 0, width: 1, fn: "LINEAR", custom: false, invert: false,
  zoom: 1, cx: 0, cy: 0, mode: "window", model: false,
  inflight: false, again: false, url: null, shownRegion: null, drag: null,
};
const ZOOM_MIN = 0.5, ZOOM_MAX = 32;

function viewerClear() {
  Object.assign(viewer, { token: -1, studyId: null, info: null, instance: null, inflight: false, again: false,
    shownRegion: null, drag: null });
  const img = $("viewer-image");
  if (viewer.url) URL.revokeObjectURL(viewer.url);
  viewer.url = null;
  img.removeAttribute("src");
  img.style.transform = "";
  delete img.dataset.studyId;
  delete img.dataset.window;
  $("window-preset").replaceChildren();
  $("image-select").replaceChildren();
  $("image-select").hidden = true;
  $("viewer-caption").textContent = "";
}

function viewportSize() {
  const box = $("viewport").getBoundingClientRect();
  return { width: Math.max(1, Math.round(box.width)), height: Math.max(1, Math.round(box.height)) };
}

function region() {
  const { width, height } = viewportSize();
  const fit = Math.min(width / viewer.info.columns, height / viewer.info.rows);
  const scale = fit * viewer.zoom;
  const w = width / scale, h = height / scale;
  return { x: viewer.cx - w / 2, y: viewer.cy - h / 2, w, h, scale, width, height };
}

function applyPreset(id) {
  const preset = viewer.info.presets.find((p) => p.id === id) || viewer.info.presets[0];
  Object.assign(viewer, { preset: preset.id, center: preset.center, width: preset.width, fn: preset.function,
    custom: false });
  $("window-preset").value = preset.id;
}

function viewerReset() {
  applyPreset(viewer.info.default_preset);
  Object.assign(viewer, { invert: false, zoom: 1, cx: viewer.info.columns / 2, cy: viewer.info.rows / 2 });
  $("invert").setAttribute("aria-pressed", "false");
}

async function viewerOpen(studyId, token, signal, instance) {
  Object.assign(viewer, { token, studyId, signal, instance });
  try {
    const query = instance ? `?instance=${instance}` : "";
    const info = await getJSON(`/studies/${studyId}/image${query}`, signal);
    if (viewer.token !== token) return;
    viewer.info = info;
    viewer.instance = info.instance_id;
    $("window-preset").replaceChildren(...info.presets.map((p) => el("option", { value: p.id }, p.label)));
    $("image-select").replaceChildren(...info.images.map((i) =>
      el("option", { value: i.id, selected: i.id === info.instance_id }, i.label + (i.reported ? " (reported)" : ""))));
    $("image-select").hidden = info.images.length < 2;
    viewerReset();
    viewerRender();
  } catch (error) {
    if (viewer.token === token) $("viewer-caption").textContent = `No image: ${error.message}`;
  }
}

function caption() {
  if (viewer.model) return "The image as the model saw it (windowed, 8-bit)";
  const info = viewer.info;
  const preset = info.presets.find((p) => p.id === viewer.preset);
  const windowText = viewer.custom || !preset
    ? `window C ${Math.round(viewer.center)} W ${Math.round(viewer.width)}`
    : `${preset.label}${preset.lut ? " (VOI LUT)" : ` C ${Math.round(preset.center)} W ${Math.round(preset.width)}`}`;
  return `${windowText} · zoom ${Math.round(viewer.zoom * 100)}%${viewer.invert ? " · inverted" : ""} · ` +
    `${info.columns}×${info.rows}${info.photometric_interpretation === "MONOCHROME1" ? " MONOCHROME1" : ""}`;
}

// While a render is on its way, pan and zoom move the shown picture at once (CSS), then it is replaced.
function previewTransform() {
  const img = $("viewer-image");
  if (!viewer.shownRegion || viewer.model) { img.style.transform = ""; return; }
  const now = region(), was = viewer.shownRegion;
  const k = now.scale / was.scale;
  img.style.transform = `translate(${(was.x - now.x) * now.scale}px, ${(was.y - now.y) * now.scale}px) scale(${k})`;
}

async function viewerRender() {
  if (!viewer.info) return;
  $("viewer-caption").textContent = caption();
  previewTransform();
  if (viewer.inflight) { viewer.again = true; return; }
  viewer.inflight = true;
  const token = viewer.token;
  const r = region();
  const dpr = Math.min(window.devicePixelRatio || 1, 2);
  const params = new URLSearchParams({ instance: viewer.instance, x: r.x, y: r.y, w: r.w, h: r.h,
    out_width: Math.min(2048, Math.round(r.width * dpr)), out_height: Math.min(2048, Math.round(r.height * dpr)),
    invert: viewer.invert });
  if (viewer.custom) {
    params.set("window_center", viewer.center);
    params.set("window_width", Math.max(viewer.width, 1e-3));
    params.set("function", viewer.fn);
  } else {
    params.set("preset", viewer.preset);
  }
  const path = viewer.model ? `/studies/${viewer.studyId}/image.png`
    : `/studies/${viewer.studyId}/image/render?${params}`;
  const windowLabel = viewer.model ? "model" : `${viewer.custom ? "custom" : viewer.preset}:${viewer.center}/${viewer.width}`;
  try {
    const blob = await (await api(path, { signal: viewer.signal })).blob();
    if (viewer.token !== token) return;
    const url = URL.createObjectURL(blob);
    const probe = new Image();  // decoded off screen, so the shown picture is swapped in one step
    probe.src = url;
    await probe.decode().catch(() => {});
    if (viewer.token !== token) { URL.revokeObjectURL(url); return; }
    const img = $("viewer-image");
    img.src = url;
    if (viewer.url) URL.revokeObjectURL(viewer.url);
    viewer.url = url;
    img.dataset.studyId = viewer.studyId;
    img.dataset.window = windowLabel;
    img.classList.toggle("model", viewer.model);
    viewer.shownRegion = viewer.model ? null : r;
    previewTransform();
  } catch (error) {
    if (viewer.token === token) $("viewer-caption").textContent = `No image: ${error.message}`;
  } finally {
    if (viewer.token === token) {
      viewer.inflight = false;
      if (viewer.again) { viewer.again = false; viewerRender(); }
    }
  }
}

function zoomAt(px, py, factor) {
  if (!viewer.info || viewer.model) return;
  const r = region();
  const ix = r.x + px / r.scale, iy = r.y + py / r.scale;  // the image point under the cursor stays put
  viewer.zoom = Math.min(ZOOM_MAX, Math.max(ZOOM_MIN, viewer.zoom * factor));
  const n = region();
  viewer.cx = ix - px / n.scale + n.w / 2;
  viewer.cy = iy - py / n.scale + n.h / 2;
  viewerRender();
}

const vp = $("viewport");
vp.addEventListener("pointerdown", (event) => {
  if (!viewer.info || viewer.model) return;
  event.preventDefault();
  vp.setPointerCapture(event.pointerId);
  const pan = viewer.mode === "pan" || event.shiftKey || event.button === 1;
  viewer.drag = { x: event.clientX, y: event.clientY, pan, center: viewer.center, width: viewer.width,
    cx: viewer.cx, cy: viewer.cy, scale: region().scale };
});
vp.addEventListener("pointermove", (event) => {
  const drag = viewer.drag;
  if (!drag) return;
  const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
  if (drag.pan) {
    viewer.cx = drag.cx - dx / drag.scale;
    viewer.cy = drag.cy - dy / drag.scale;
  } else {
    // left-right: width, up-down: level; a full-range change over ~300 px
    const step = Math.max(viewer.info.value_max - viewer.info.value_min, 1) / 300;
    viewer.custom = true;
    if (viewer.fn !== "SIGMOID") viewer.fn = "LINEAR";
    viewer.width = Math.max(1, drag.width + dx * step);
    viewer.center = drag.center + dy * step;
  }
  viewerRender();
});
for (const type of ["pointerup", "pointercancel"]) vp.addEventListener(type, () => { viewer.drag = null; });
vp.addEventListener("wheel", (event) => {
  if (!viewer.info || viewer.model) return;
  event.preventDefault();
  const box = vp.getBoundingClientRect();
  zoomAt(event.clientX - box.left, event.clientY - box.top, event.deltaY < 0 ? 1.25 : 0.8);
}, { passive: false });

$("window-preset").addEventListener("change", () => { applyPreset($("window-preset").value); viewerRender(); });
$("image-select").addEventListener("change", () => {
  if (viewer.studyId !== null) viewerOpen(viewer.studyId, viewer.token, viewer.signal, Number($("image-select").value));
});
$("drag-mode").addEventListener("click", () => {
  viewer.mode = viewer.mode === "window" ? "pan" : "window";
  $("drag-mode").textContent = `Drag: ${viewer.mode}`;
  $("drag-mode").setAttribute("aria-pressed", String(viewer.mode === "pan"));
});
$("zoom-in").addEventListener("click", () => { const { width, height } = viewportSize(); zoomAt(width / 2, height / 2, 1.25); });
$("zoom-out").addEventListener("click", () => { const { width, height } = viewportSize(); zoomAt(width / 2, height / 2, 0.8); });
$("invert").addEventListener("click", () => {
  if (!viewer.info) return;
  viewer.invert = !viewer.invert;
  $("invert").setAttribute("aria-pressed", String(viewer.invert));
  viewerRender();
});
$("reset").addEventListener("click", () => { if (viewer.info) { viewerReset(); viewerRender(); } });
$("model-view").addEventListener("change", () => {
  viewer.model = $("model-view").checked;
  for (const id of ["window-preset", "drag-mode", "zoom-in", "zoom-out", "invert", "reset"]) $(id).disabled = viewer.model;
  viewerRender();
});
window.addEventListener("resize", () => { if (viewer.info) viewerRender(); });

// -- boot --------------------------------------------------------------------------------------------
if (key()) start(); else signOut();
