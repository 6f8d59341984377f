// The radiologist's page: plain JS, no build step. All data is inserted with textContent (never as HTML).
"use strict";

const API = "/api/v1";
const KEY_STORE = "radialog.apiKey";
const PAGE_SIZE = 25;
const state = { offset: 0, total: 0, studyId: null, report: null, shownVersion: null, busy: false,
  conversationLoaded: null };

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, text) => {
  const node = Object.assign(document.createElement(tag), props);
  if (text !== undefined) node.textContent = text;
  return node;
};

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

// -- sign in -----------------------------------------------------------------------------------------
function signOut(message) {
  sessionStorage.removeItem(KEY_STORE);
  $("app").hidden = true;
  $("login").hidden = false;
  $("who").textContent = "";
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
    await loadWorklist();
  } catch (error) {
    return;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  const out = el("button", { type: "button", id: "sign-out" }, "Sign out");
  out.addEventListener("click", () => signOut());
  $("who").replaceChildren(el("span", {}, "signed in"), out);
}

// -- worklist ----------------------------------------------------------------------------------------
async function loadWorklist() {
  const params = new URLSearchParams({ offset: state.offset, limit: PAGE_SIZE });
  if ($("state-filter").value) params.append("state", $("state-filter").value);
  if ($("accession-filter").value.trim()) params.append("accession", $("accession-filter").value.trim());
  const page = await (await api(`/studies?${params}`)).json();
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
$("accession-filter").addEventListener("change", () => { state.offset = 0; loadWorklist(); });
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); loadWorklist(); });
$("next").addEventListener("click", () => { state.offset += PAGE_SIZE; loadWorklist(); });

// -- one study ---------------------------------------------------------------------------------------
async function openStudy(id) {
  state.studyId = id;
  state.report = null;
  for (const row of $("worklist").tBodies[0].rows) row.classList.toggle("current", Number(row.dataset.studyId) === id);
  $("study").hidden = false;
  $("report-error").textContent = "";
  $("chat-error").textContent = "";
  const study = await (await api(`/studies/${id}`)).json();
  $("study-head").textContent =
    `${study.patient_name || "?"} · ${study.patient_id || ""} · accession ${study.accession_number || "-"} · ${study.state}`;
  const problem = ["FAILED", "SKIPPED"].includes(study.state) && study.reason;  // why no report
  $("study-reason").hidden = !problem;
  $("study-reason").textContent = problem ? `${study.state}: ${study.reason}` : "";
  $("rerun").hidden = !["FAILED", "SKIPPED"].includes(study.state);
  loadImage(id);
  if (study.latest_report_version) {
    await loadReport();
    // ask() waits for this: the chat is redrawn when the conversation arrives, which would wipe a turn
    // asked in the meantime
    state.conversationLoaded = loadConversation();
    await state.conversationLoaded;
  } else {
    showNoReport(study);
  }
}

async function loadImage(id) {
  const img = $("preview");
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.removeAttribute("src");
  try {
    const blob = await (await api(`/studies/${id}/image.png`)).blob();
    img.dataset.url = URL.createObjectURL(blob);
    img.src = img.dataset.url;
  } catch (error) {
    img.alt = `No image: ${error.message}`;
  }
}

function showNoReport(study) {
  setBanner(null);
  $("findings-text").textContent = `No report yet (state ${study.state}).`;
  $("impression-block").hidden = true;
  $("classifier").replaceChildren();
  $("versions").replaceChildren();
  $("chat").replaceChildren();
  $("approve").disabled = true;
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

function showReport(report) {
  state.shownVersion = report.version;
  setBanner(report);
  $("findings-text").textContent = report.findings_text;
  $("impression-block").hidden = !report.impression_text;
  $("impression-text").textContent = report.impression_text || "";
  const findings = (report.document && report.document.findings) || [];
  $("classifier").replaceChildren(...findings.map((f) => el("li", { className: f.present ? "present" : "absent" },
    `${f.label}: ${f.present ? "present" : "absent"} (${Number(f.probability).toFixed(2)})`)));
  $("finding-select").replaceChildren(...findings.filter((f) => f.label !== "No Finding")
    .map((f) => el("option", { value: f.label }, f.label)));
  for (const li of $("versions").children) li.classList.toggle("shown", Number(li.dataset.version) === report.version);
}

async function loadReport() {
  const all = await (await api(`/studies/${state.studyId}/report/versions`)).json();
  const current = all.versions.find((v) => v.version === all.current_version);
  state.report = current;
  $("versions").replaceChildren(...all.versions.slice().reverse().map((v) => {
    const li = el("li", {}, `v${v.version} ${v.kind} by ${v.author}${v.verified ? " — verified" : ""} · ` +
      new Date(v.created_at).toLocaleString());
    li.dataset.version = v.version;
    li.value = v.version;
    li.addEventListener("click", () => showReport(v));
    return li;
  }));
  showReport(current);
  $("edit-findings").value = current.findings_text;
  $("edit-impression").value = current.impression_text || "";
  $("approve").disabled = current.verified;
}

// -- versions and approval ---------------------------------------------------------------------------
async function newVersion(body, path = "/report/versions") {
  $("report-error").textContent = "";
  try {
    await api(`/studies/${state.studyId}${path}`, { method: "POST",
      json: { ...body, base_version: state.report.version } });
    await openStudy(state.studyId);  // header state, report, versions and a fresh conversation
    loadWorklist();
  } catch (error) {
    $("report-error").textContent = error.message;
  }
}

$("save-edit").addEventListener("click", () => newVersion({ kind: "edit",
  findings_text: $("edit-findings").value, impression_text: $("edit-impression").value || null }));
$("approve").addEventListener("click", () => {
  // What is signed is exactly what the edit boxes show, impression included ("" = no impression).
  newVersion({ findings_text: $("edit-findings").value, impression_text: $("edit-impression").value },
    "/report/approve");
});
$("rerun").addEventListener("click", async () => {
  try {
    await api(`/studies/${state.studyId}/rerun`, { method: "POST" });
    openStudy(state.studyId);
    loadWorklist();
  } catch (error) {
    $("report-error").textContent = error.message;
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
  const use = el("button", { type: "button", className: "use" }, "Use this as the report");
  // a correction rewrites the findings; the current impression stays until the radiologist changes it
  use.addEventListener("click", () => newVersion({ kind: "ai_correction", findings_text: turn.answer,
    impression_text: state.report.impression_text, source_turn_id: turn.id }));
  node.append(use);
}

async function loadConversation() {
  const conversation = await (await api(`/studies/${state.studyId}/dialog`)).json();
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
  if (state.busy || !state.report) return;
  state.busy = true;
  $("chat-send").disabled = true;
  $("chat-error").textContent = "";
  try { await state.conversationLoaded; } catch { /* its own error is shown; the question still goes */ }
  const question = addMessage("q", shownQuestion);
  const answer = addMessage("a pending", "");
  let turnId = null;
  try {
    const response = await api(`/studies/${state.studyId}/dialog/${path}`, { method: "POST",
      json: { ...body, stream: true } });
    for await (const { event, data } of sseEvents(response)) {
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
    answer.remove();
    $("chat-error").textContent = error.message;
  } finally {
    answer.classList.remove("pending");
    state.busy = false;
    $("chat-send").disabled = false;
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

// -- boot --------------------------------------------------------------------------------------------
if (key()) start(); else signOut();
