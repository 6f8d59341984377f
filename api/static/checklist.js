// The approval checklist: the AI draft's CheXpert findings, one verdict each (agree / disagree with the
// AI), sent with the approval and stored with the signed version (api/approvals.py). Where the version's
// text names a finding in the model's phrase, the server proposes the verdict the text implies and the
// clause that says so; the proposal is shown as such and can be changed. Nothing else is filled in: a
// finding the text does not name waits for the radiologist (or for "Agree with the AI on the N left",
// an explicit click). The checklist belongs to one version of one selection (token), like the rest.
"use strict";

const checklist = { token: -1, version: null, items: [], verdicts: new Map(), loaded: false, error: "" };

function checklistClear() {
  Object.assign(checklist, { token: -1, version: null, items: [], verdicts: new Map(), loaded: false, error: "" });
  $("checklist-box").hidden = true;
  $("checklist").tBodies[0].replaceChildren();
  $("checklist-note").textContent = "";
  $("checklist-rest").hidden = true;
}

// Loaded for the current version when it can be signed by this user (a radiologist, not yet verified).
async function checklistLoad(token, signal, report) {
  checklistClear();
  if (!isRadiologist() || report.verified) return;
  Object.assign(checklist, { token, version: report.version });
  try {
    const body = await getJSON(`/studies/${state.studyId}/report/checklist?version=${report.version}`, signal);
    if (!live(token) || checklist.token !== token) return;
    checklist.items = body.items;
    for (const item of body.items) if (item.suggestion) checklist.verdicts.set(item.label, item.suggestion);
    checklist.loaded = true;
    checklistRender();
  } catch (error) {
    if (live(token)) { checklist.error = error.message; checklistRender(); }
  }
  updateApprove();
}

const checklistLeft = () => checklist.items.filter((i) => !checklist.verdicts.has(i.label)).length;
// Ready to sign: loaded for the version on screen, and a verdict on every finding.
const checklistReady = (version) => checklist.loaded && checklist.version === version && checklistLeft() === 0;
const checklistBody = () => checklist.items.map((i) => ({ label: i.label, ai_present: i.ai_present,
  verdict: checklist.verdicts.get(i.label) }));

function checklistRender() {
  const box = $("checklist-box");
  box.hidden = false;
  if (checklist.error) { $("checklist-note").textContent = `The checklist did not load: ${checklist.error}`; return; }
  if (!checklist.items.length) {
    $("checklist-note").textContent = "This model gives no classifier findings to judge: only the text is signed.";
    $("checklist-rest").hidden = true;
    return;
  }
  const rows = checklist.items.map((item) => {
    const row = el("tr");
    row.dataset.label = item.label;
    const verdict = checklist.verdicts.get(item.label);
    row.classList.toggle("open", !verdict);
    row.append(el("td", { className: "label" }, item.label),
      el("td", { className: item.ai_present ? "present" : "absent" }, item.ai_present ? "present" : "absent"));
    const says = el("td", { className: "says" });
    if (item.suggestion && verdict === item.suggestion) {
      says.append(el("span", { className: "suggested" }, `from the text: ${item.stated}`), " ",
        el("q", {}, item.evidence || ""));
    } else if (item.evidence) {
      says.append(el("span", { className: "unclear" }, "the text is not clear: "), el("q", {}, item.evidence));
    } else {
      says.append(el("span", { className: "unclear" }, "not named in the text"));
    }
    const choose = el("td", { className: "verdict" });
    for (const value of ["agree", "disagree"]) {
      const button = el("button", { type: "button", className: value }, value === "agree" ? "Agree" : "Disagree");
      button.dataset.verdict = value;
      button.setAttribute("aria-pressed", String(verdict === value));
      button.addEventListener("click", () => {
        checklist.verdicts.set(item.label, value);
        checklistRender();
        updateApprove();
      });
      choose.append(button);
    }
    row.append(says, choose);
    return row;
  });
  $("checklist").tBodies[0].replaceChildren(...rows);
  const left = checklistLeft();
  $("checklist-note").textContent = left
    ? `${left} finding(s) still need your verdict before you can sign.`
    : "A verdict on every finding: it is stored with the version you sign.";
  $("checklist-rest").hidden = left === 0;
  $("checklist-rest").textContent = `Agree with the AI on the ${left} left`;
}

document.getElementById("checklist-rest").addEventListener("click", () => {
  for (const item of checklist.items) if (!checklist.verdicts.has(item.label)) checklist.verdicts.set(item.label, "agree");
  checklistRender();
  updateApprove();
});
