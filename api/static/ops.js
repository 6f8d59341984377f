// The operations page (admins): GET /operations/overview and /quality/agreement drawn as SVG, no library.
// Every mark carries the figure it shows (data-value and friends) and its number as text, so what the
// page says can be read back and compared with the API. Text goes in with textContent only.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const ops = { token: 0, overview: null, agreement: null };
const STATE_COLOURS = { RECEIVING: "#90a4ae", STABLE: "#b0bec5", QUEUED: "#ffb300", RUNNING: "#1e88e5",
  REPORTED: "#43a047", EXPORTED: "#2e7d32", SKIPPED: "#8d6e63", FAILED: "#e53935" };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function canvas(width, height, label) {
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": label });
}

const seconds = (v) => (v === null || v === undefined ? "–" : v < 10 ? `${v.toFixed(2)} s` : `${v.toFixed(1)} s`);
const percent = (v) => (v === null || v === undefined ? "–" : `${Math.round(v * 100)}%`);

function opsEnable(on) {
  document.getElementById("nav").hidden = !on;
  if (!on) { document.getElementById("ops").hidden = true; ops.token += 1; }
}

function opsShow(show) {
  $("ops").hidden = !show;
  $("app").hidden = show;
  $("nav-ops").setAttribute("aria-pressed", String(show));
  $("nav-worklist").setAttribute("aria-pressed", String(!show));
  if (show) opsLoad();
}

async function opsLoad() {
  const token = ++ops.token;
  $("ops-error").textContent = "";
  const days = Number($("ops-days").value);
  const params = new URLSearchParams({ from: new Date(Date.now() - days * 86400e3).toISOString(),
    bucket: days > 30 ? "week" : "day" });
  if ($("ops-backend").value) params.set("backend", $("ops-backend").value);
  try {
    const [overview, agreement] = await Promise.all([
      getJSON(`/operations/overview?hours=${Number($("ops-hours").value)}`),
      getJSON(`/quality/agreement?${params}`)]);
    if (token !== ops.token) return;  // a later load wins
    Object.assign(ops, { overview, agreement });
    drawOps();
  } catch (error) {
    if (token === ops.token) $("ops-error").textContent = error.message;
  }
}

function drawOps() {
  const { overview, agreement } = ops;
  $("ops-generated").textContent = `as of ${new Date(overview.generated_at).toLocaleString()}`;
  const backend = $("ops-backend");
  const chosen = backend.value;
  backend.replaceChildren(el("option", { value: "" }, "all models"),
    ...agreement.backends.map((b) => el("option", { value: b, selected: b === chosen }, b)));
  $("chart-studies").replaceChildren(studiesChart(overview));
  $("chart-latency").replaceChildren(latencyChart(overview.latency));
  $("chart-queues").replaceChildren(queuesChart(overview.queues));
  $("chart-workers").replaceChildren(workersChart(overview.workers));
  $("chart-reasons").replaceChildren(reasonsChart(overview.not_reported, overview.dead_exports, overview.exports));
  $("chart-drafts").replaceChildren(draftsChart(agreement.drafts));
  $("chart-agreement").replaceChildren(agreementChart(agreement));
  $("chart-findings").replaceChildren(findingsChart(agreement.findings));
}

// Stacked bars: one per hour, one segment per state, the total above.
function studiesChart(overview) {
  const hours = overview.studies_per_hour;
  const W = 1100, H = 230, left = 36, bottom = 34, top = 22;
  const totals = hours.map((h) => Object.values(h.counts).reduce((a, b) => a + b, 0));
  const max = Math.max(1, ...totals);
  const step = (W - left - 10) / hours.length, bar = Math.max(2, step * 0.7);
  const chart = canvas(W, H + 26, "Studies received per hour by state");
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  chart.append(svg("line", { x1: left, y1: y(0), x2: W - 5, y2: y(0), class: "axis" }),
    svg("text", { x: left - 4, y: y(max) + 4, "text-anchor": "end", class: "tick" }, String(max)),
    svg("text", { x: left - 4, y: y(0) + 4, "text-anchor": "end", class: "tick" }, "0"));
  hours.forEach((h, i) => {
    const x = left + i * step + (step - bar) / 2;
    let base = 0;
    for (const state of overview.states) {
      const n = h.counts[state] || 0;
      if (!n) continue;
      const rect = svg("rect", { x, y: y(base + n), width: bar, height: y(base) - y(base + n), fill: STATE_COLOURS[state],
        class: "seg", "data-hour": h.hour, "data-state": state, "data-value": n });
      rect.append(svg("title", {}, `${new Date(h.hour).toLocaleString()} ${state}: ${n}`));
      chart.append(rect);
      base += n;
    }
    if (totals[i]) chart.append(svg("text", { x: x + bar / 2, y: y(totals[i]) - 3, "text-anchor": "middle", class: "value",
      "data-hour": h.hour, "data-total": totals[i] }, String(totals[i])));
    const every = Math.ceil(hours.length / 12);
    if (i % every === 0) chart.append(svg("text", { x: x + bar / 2, y: H - bottom + 14, "text-anchor": "middle", class: "tick" },
      new Date(h.hour).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })));
  });
  let lx = left;
  for (const state of overview.states) {
    const n = hours.reduce((a, h) => a + (h.counts[state] || 0), 0);
    chart.append(svg("rect", { x: lx, y: H - 4, width: 10, height: 10, fill: STATE_COLOURS[state] }),
      svg("text", { x: lx + 14, y: H + 5, class: "legend", "data-state": state, "data-total": n }, `${state} ${n}`));
    lx += 132;
  }
  return chart;
}

// Horizontal bars: p50, p90, p95, p99 and max for "SR written" and "SR in the PACS".
function latencyChart(latency) {
  const series = [["image_to_sr", "SR written"], ["image_to_pacs", "SR in the PACS"]];
  const marks = ["p50", "p90", "p95", "p99", "max"];
  const max = Math.max(1e-3, ...series.flatMap(([key]) => marks.map((m) => latency[key][m] || 0)));
  const W = 520, row = 17, chart = canvas(W, series.length * (marks.length * row + 26), "Latency percentiles");
  let y = 14;
  for (const [key, name] of series) {
    chart.append(svg("text", { x: 0, y, class: "series" }, `${name} (n = ${latency[key].n})`));
    y += 6;
    for (const mark of marks) {
      const v = latency[key][mark];
      const width = v === null ? 0 : (W - 170) * (v / max);
      chart.append(svg("text", { x: 0, y: y + 11, class: "tick" }, mark),
        svg("rect", { x: 40, y, width: Math.max(width, v === null ? 0 : 1), height: row - 4, class: "bar latency",
          "data-series": key, "data-mark": mark, "data-value": v === null ? "" : v }),
        svg("text", { x: 46 + width, y: y + 11, class: "value", "data-series": key, "data-mark": mark }, seconds(v)));
      y += row;
    }
    y += 20;
  }
  return chart;
}

function barsChart(rows, label, emptyText, W = 620) {
  // rows: [{name, value, cls, attrs}]
  const row = 22;
  const chart = canvas(W, Math.max(1, rows.length) * row + 8, label);
  if (!rows.length) { chart.append(svg("text", { x: 0, y: 16, class: "empty" }, emptyText)); return chart; }
  const max = Math.max(1, ...rows.map((r) => r.value));
  rows.forEach((r, i) => {
    const y = 4 + i * row, width = (W - 460) * (r.value / max);
    chart.append(svg("text", { x: 0, y: y + 13, class: "tick" }, r.name.length > 38 ? `${r.name.slice(0, 37)}…` : r.name),
      svg("rect", { x: 220, y, width: Math.max(width, 1), height: row - 6, class: `bar ${r.cls || ""}`, ...r.attrs,
        "data-value": r.value }),
      svg("text", { x: 226 + width, y: y + 13, class: "value" }, r.text || String(r.value)));
  });
  return chart;
}

function queuesChart(queues) {
  if (!queues.available) {
    const chart = canvas(520, 24, "Queue depth");
    chart.append(svg("text", { x: 0, y: 16, class: "empty bad" }, `broker unavailable (${queues.error})`));
    return chart;
  }
  return barsChart(Object.entries(queues.depths).map(([name, value]) => ({ name, value, cls: "queue",
    attrs: { "data-queue": name } })), "Queue depth", "no queues");
}

function workersChart(workers) {
  if (!workers.available) {
    const chart = canvas(520, 24, "Workers");
    chart.append(svg("text", { x: 0, y: 16, class: "empty bad" }, `broker unavailable (${workers.error})`));
    return chart;
  }
  const rows = [];
  for (const w of workers.ready) {
    const model = `${w.model || "?"} ${w.version || ""}${w.tiny ? " (tiny test model)" : ""}`;
    const kinds = Object.entries(w.slots);
    if (!kinds.length) rows.push({ name: `${w.name} · ${model}`, value: 0, text: "no engine", cls: "slots",
      attrs: { "data-worker": w.name, "data-kind": "" } });
    for (const [kind, slots] of kinds) rows.push({ name: `${w.name} · ${kind}`, value: slots, text: `${slots} ${kind} slots · ${model}`,
      cls: "slots", attrs: { "data-worker": w.name, "data-kind": kind } });
  }
  const chart = barsChart(rows, "Workers ready and their engines' slots", "", 840);
  if (!workers.ready.length) chart.append(svg("text", { x: 0, y: 16, class: "empty bad", "data-workers": 0 }, "No worker ready"));
  else chart.dataset.workers = workers.ready.length;
  return chart;
}

function reasonsChart(notReported, dead, exports) {
  const rows = [
    ...notReported.map((r) => ({ name: `${r.state}: ${r.reason}`, value: r.count, cls: r.state,
      attrs: { "data-kind": "study", "data-state": r.state, "data-reason": r.reason } })),
    ...dead.map((r) => ({ name: `export DEAD → ${r.destination}: ${r.reason}`, value: r.count, cls: "DEAD",
      attrs: { "data-kind": "export", "data-destination": r.destination, "data-reason": r.reason } })),
  ];
  const chart = barsChart(rows, "Why studies were not reported; exports given up", "every study reported; no export given up");
  const outbox = svg("text", { x: 0, y: Number(chart.getAttribute("height")) + 14, class: "tick", "data-outbox": "1" },
    `outbox: ${exports.PENDING} pending · ${exports.SENT} sent · ${exports.DEAD} dead`);
  chart.setAttribute("height", Number(chart.getAttribute("height")) + 20);
  chart.setAttribute("viewBox", `0 0 520 ${chart.getAttribute("height")}`);
  chart.append(outbox);
  return chart;
}

function draftsChart(drafts) {
  const W = 520, chart = canvas(W, 62, "Drafts approved unchanged vs edited");
  const n = drafts.approved;
  const wUnchanged = n ? (W - 20) * drafts.unchanged / n : 0;
  chart.append(svg("rect", { x: 0, y: 4, width: wUnchanged, height: 20, class: "bar unchanged", "data-value": drafts.unchanged }),
    svg("rect", { x: wUnchanged, y: 4, width: n ? (W - 20) - wUnchanged : 0, height: 20, class: "bar edited",
      "data-value": drafts.edited }));
  const share = drafts.share_unchanged;
  const ci = share.ci95 ? ` (95% CI ${percent(share.ci95[0])}–${percent(share.ci95[1])})` : "";
  chart.append(svg("text", { x: 0, y: 42, class: "value", "data-approved": n },
    n ? `${drafts.unchanged} unchanged · ${drafts.edited} edited of ${n}: ${percent(share.value)} unchanged${ci}`
      : "no approved drafts in this period"),
  svg("text", { x: 0, y: 58, class: "tick" }, n ? `edit distance: median ${drafts.edit_distance.median} characters, ` +
      `max ${drafts.edit_distance.max} · checklist given for ${drafts.with_checklist}` : ""));
  return chart;
}

// A grid: findings down, periods across; each cell coloured by the share agreed, with "agreed/judged".
function agreementChart(agreement) {
  const labels = agreement.findings.filter((f) => f.n > 0).map((f) => f.label);
  const periods = agreement.timeline.map((t) => t.period);
  const cellW = Math.max(46, Math.min(90, 760 / Math.max(1, periods.length))), cellH = 20, left = 200, top = 20;
  const chart = canvas(left + cellW * Math.max(1, periods.length) + 10, top + cellH * Math.max(1, labels.length) + 8,
    "Agreement per finding over time");
  if (!labels.length) {
    chart.append(svg("text", { x: 0, y: 16, class: "empty" }, "no checklist verdicts in this period"));
    return chart;
  }
  periods.forEach((p, j) => chart.append(svg("text", { x: left + j * cellW + cellW / 2, y: 14, "text-anchor": "middle",
    class: "tick" }, p.slice(5))));
  labels.forEach((label, i) => {
    const y = top + i * cellH;
    chart.append(svg("text", { x: 0, y: y + 14, class: "tick" }, label));
    agreement.timeline.forEach((t, j) => {
      const cell = t.findings[label];
      if (!cell) return;
      const share = cell.n ? cell.agree / cell.n : 0;
      const hue = Math.round(120 * share);  // red (0) to green (120)
      chart.append(svg("rect", { x: left + j * cellW, y, width: cellW - 2, height: cellH - 2, fill: `hsl(${hue} 55% 62%)`,
        class: "cell", "data-label": label, "data-period": t.period, "data-agree": cell.agree, "data-n": cell.n }),
      svg("text", { x: left + j * cellW + cellW / 2, y: y + 14, "text-anchor": "middle", class: "value" },
        `${cell.agree}/${cell.n}`));
    });
  });
  return chart;
}

// Forest plot: per finding, sensitivity / specificity / PPV as a dot with its 95% interval on 0..1.
function findingsChart(findings) {
  const measures = [["sensitivity", "sens"], ["specificity", "spec"], ["ppv", "PPV"]];
  const shown = findings.filter((f) => f.n > 0);
  const left = 230, colW = 340, rowH = 20, top = 24;
  const chart = canvas(left + measures.length * colW, top + rowH * Math.max(1, shown.length) + 6, "Per-finding accuracy");
  if (!shown.length) {
    chart.append(svg("text", { x: 0, y: 16, class: "empty" }, "no checklist verdicts in this period"));
    return chart;
  }
  const scale = colW - 160;
  measures.forEach(([, name], m) => chart.append(svg("text", { x: left + m * colW, y: 14, class: "series" },
    `${name} (0 – 1)`)));
  shown.forEach((f, i) => {
    const y = top + i * rowH;
    chart.append(svg("text", { x: 0, y: y + 13, class: "tick" },
      `${f.label} (n ${f.n}; AI ${f.ai_present}, rad ${f.radiologist_present})`));
    measures.forEach(([key], m) => {
      const x0 = left + m * colW, p = f[key];
      chart.append(svg("line", { x1: x0, y1: y + 9, x2: x0 + scale, y2: y + 9, class: "track" }));
      if (p.value === null) {
        chart.append(svg("text", { x: x0 + scale + 6, y: y + 13, class: "value", "data-label": f.label, "data-measure": key }, "–"));
        return;
      }
      chart.append(svg("line", { x1: x0 + scale * p.ci95[0], y1: y + 9, x2: x0 + scale * p.ci95[1], y2: y + 9, class: "ci" }),
        svg("circle", { cx: x0 + scale * p.value, cy: y + 9, r: 4, class: "point", "data-label": f.label, "data-measure": key,
          "data-value": p.value, "data-low": p.ci95[0], "data-high": p.ci95[1] }),
        svg("text", { x: x0 + scale + 6, y: y + 13, class: "value", "data-label": f.label, "data-measure": key },
          `${p.value.toFixed(2)} (${p.ci95[0].toFixed(2)}–${p.ci95[1].toFixed(2)}) ${p.k}/${p.n}`));
    });
  });
  return chart;
}

document.getElementById("nav-ops").addEventListener("click", () => opsShow(true));
document.getElementById("nav-worklist").addEventListener("click", () => opsShow(false));
document.getElementById("ops-refresh").addEventListener("click", () => opsLoad());
for (const id of ["ops-hours", "ops-days", "ops-backend"]) document.getElementById(id).addEventListener("change", () => opsLoad());
