// fedjax dashboard: draws what the server streams (server-sent events) and never writes to the federation.
// Every name comes from envoys or submitters: it goes into the page as textContent (never as HTML), and into
// plotly (which reads a few HTML-like tags in its text) escaped by plotText.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const STAGES = ["aggregated_model_validation", "locally_tuned_model_validation", "train"];
const ROUND_CHARTS = ["round/time_s", "round/bytes", "round/envoys", "privacy/epsilon"];  // after the stages' charts
const PLOT_CONFIG = {displaylogo: false, displayModeBar: false, responsive: true};
const page = {envoys: [], experiments: [], selected: null, chosen: false, source: null, run: null, drawn: new Map()};

// ---- small helpers

function url(path, params = {}) {
  const query = new URLSearchParams(params);
  if (TOKEN) query.set("token", TOKEN);
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function fillTable(id, rows) {  // rows: arrays of cells; a cell is a value or {text, className, title}
  const body = document.querySelector(`#${id} tbody`);
  const trs = rows.map((cells) => {
    const tr = el("tr");
    for (const cell of cells) {
      const spec = cell !== null && typeof cell === "object" ? cell : {text: cell};
      const td = el("td", spec.text ?? "", spec.className);
      if (spec.title) td.title = spec.title;
      tr.append(td);
    }
    return tr;
  });
  body.replaceChildren(...trs);
  return trs;
}

function plotText(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function number(value, digits = 4) {
  if (value === null || value === undefined) return "";
  return Number.isInteger(value) ? String(value) : value.toPrecision(digits);
}

function ago(seconds) {
  if (seconds < 2) return "just now";
  if (seconds < 120) return `${Math.round(seconds)} s ago`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

function when(timestamp) {
  return timestamp ? new Date(timestamp * 1000).toLocaleString() : "";
}

function megabytes(bytes) {
  return bytes === undefined ? "" : `${(bytes / 1e6).toFixed(2)} MB`;
}

// ---- the federation: director, envoys, experiments

function showDirector(info) {
  const node = document.getElementById("director");
  node.textContent = info.ok ? `director ${info.address}` : `director ${info.address} unreachable: ${info.error}`;
  node.className = info.ok ? "ok" : "error";
}

function showEnvoys(snapshot) {
  page.envoys = snapshot.envoys;
  fillTable("envoys", snapshot.envoys.map((e) => [
    e.name,
    {text: e.is_online ? "online" : "offline", className: e.is_online ? "online" : "offline"},
    {text: e.last_seen ? ago(snapshot.now - e.last_seen) : "never", title: when(e.last_seen)},
    {text: e.shard_info.train_size, className: "num"},
    {text: e.shard_info.valid_size, className: "num"},
    e.shard_info.hostname,
    e.shard_info.devices.join(", "),
    e.current_experiment,
    e.shard_info.description,
  ]));
  const counted = snapshot.envoys.filter((e) => e.shard_info.label_counts.length);
  const chart = document.getElementById("labels");
  chart.hidden = counted.length === 0;
  if (counted.length) {
    Plotly.react(chart, counted.map((e) => ({
      type: "bar", name: plotText(e.name), x: e.shard_info.label_counts.map((_, label) => label),
      y: e.shard_info.label_counts,
    })), layout("training records per label"), PLOT_CONFIG);
  }
}

function showExperiments(snapshot) {
  const order = {running: 0, queued: 1, submitting: 1};
  const list = [...snapshot.experiments].map((x, i) => ({...x, i}));
  list.sort((a, b) => (order[a.state] ?? 2) - (order[b.state] ?? 2)
    || ((order[a.state] ?? 2) === 2 ? b.i - a.i : a.i - b.i));  // ended ones: newest first
  page.experiments = list;
  const trs = fillTable("experiments", list.map((x) => [
    x.name,
    {text: x.state, className: x.state === "failed" ? "error" : "", title: x.error},
    {text: `${Math.min(x.current_round, x.rounds)} / ${x.rounds}`, className: "num"},
    {text: x.envoys.length, className: "num", title: x.envoys.join(", ")},
    x.best_round >= 0 ? `${x.best_metric} ${number(x.best_value)} (round ${x.best_round})` : "",
    x.epsilon === null ? "" : `ε ${number(x.epsilon, 3)} (δ ${number(x.delta, 2)})`,
    x.submitter,
    when(x.submitted_at),
    when(x.started_at),
  ]));
  trs.forEach((tr, i) => {
    tr.addEventListener("click", () => select(list[i].name, true));
    if (list[i].name === page.selected) tr.classList.add("selected");
  });
  if (!page.chosen && list.length) {  // follow the running experiment (or the newest) until the user picks one
    const pick = (list.find((x) => x.state === "running") ?? list[0]).name;
    if (pick !== page.selected) select(pick, false);
  }
  showSummary();
}

// ---- one experiment: its events, folded into series per chart and a row per round

class Run {
  constructor() {
    this.charts = new Map();  // chart key -> {title, unit, traces: Map(trace name -> Map(round -> value))}
    this.rounds = new Map();  // round -> {time, participants, dropped, received, sent, epsilon, note}
    this.done = "";
  }

  point(key, title, trace, round, value) {
    if (value === null || value === undefined) return;
    if (!this.charts.has(key)) this.charts.set(key, {title, traces: new Map()});
    const traces = this.charts.get(key).traces;
    if (!traces.has(trace)) traces.set(trace, new Map());
    traces.get(trace).set(round, value);
  }

  round(n) {
    if (!this.rounds.has(n)) this.rounds.set(n, {dropped: []});
    return this.rounds.get(n);
  }

  add(ev) {
    const metric = (task, name) => ev.metrics.find((m) => m.task === task && m.name === name)?.value;
    if (ev.experiment_done) {
      this.done = ev.state;
    } else if (ev.stage === "dropout") {
      this.round(ev.round).dropped.push(ev.envoy);
      this.round(ev.round).note = ev.note;
    } else if (ev.stage === "round") {
      const row = Object.assign(this.round(ev.round), {
        time: ev.round_time_s, participants: ev.participants, received: metric("round", "bytes_received"),
        sent: metric("round", "bytes_sent"), epsilon: metric("privacy", "epsilon"), note: ev.note || undefined,
      });
      this.point("round/time_s", "round time (s)", "round", ev.round, row.time);
      this.point("round/bytes", "bytes moved (MB)", "received (updates)", ev.round, row.received / 1e6);
      this.point("round/bytes", "bytes moved (MB)", "sent (models)", ev.round, row.sent / 1e6);
      this.point("round/envoys", "envoys", "participants", ev.round, ev.participants.length);
      this.point("round/envoys", "envoys", "reported", ev.round, metric("round", "envoys_reported"));
      this.point("round/envoys", "envoys", "dropped out", ev.round, row.dropped.length);
      this.point("privacy/epsilon", "privacy spent (epsilon)", "epsilon", ev.round, row.epsilon);
    } else if (ev.stage === "comm") {
      // each envoy's bytes: the round's totals above sum them
    } else {
      for (const m of ev.metrics) {
        this.point(`${ev.stage}/${m.name}`, `${m.name} (${ev.stage.replaceAll("_", " ")})`, ev.envoy || "aggregate",
          ev.round, m.value);
      }
    }
  }
}

function select(name, byUser) {
  if (byUser) {
    page.chosen = true;
    history.replaceState(null, "", `${location.search}#${encodeURIComponent(name)}`);
  }
  if (name === page.selected) return;
  page.selected = name;
  if (page.source) page.source.close();
  document.getElementById("charts").replaceChildren();
  page.drawn.clear();
  page.run = new Run();
  document.getElementById("experiment").hidden = false;
  document.getElementById("experiment-title").textContent = name;
  for (const tr of document.querySelectorAll("#experiments tbody tr")) {
    tr.classList.toggle("selected", tr.firstChild.textContent === name);
  }
  const source = new EventSource(url("api/events", {experiment: name}));
  source.onopen = () => { page.run = new Run(); showFeed(""); };  // (re)connected: the server replays from the start
  source.addEventListener("metric", (message) => {
    const ev = JSON.parse(message.data);
    page.run.add(ev);
    if (ev.experiment_done) source.close();  // nothing more will come
    schedule();
  });
  source.addEventListener("feed", (message) => showFeed(JSON.parse(message.data).error));
  page.source = source;
  showSummary();
}

function showFeed(error) {
  const node = document.getElementById("experiment-feed");
  node.textContent = error ? `the director's event stream: ${error}` : "";
  node.hidden = !error;
}

function showSummary() {
  const x = page.experiments.find((e) => e.name === page.selected);
  if (!x) return;
  const parts = [`${x.state}`, `round ${Math.min(x.current_round, x.rounds)} of ${x.rounds}`,
    `envoys: ${x.envoys.join(", ")}`];
  if (x.best_round >= 0) parts.push(`best ${x.best_metric} ${number(x.best_value)} at round ${x.best_round}`);
  if (x.epsilon !== null) parts.push(`ε = ${number(x.epsilon, 3)} at δ = ${number(x.delta, 2)}`);
  if (x.error) parts.push(x.error);
  document.getElementById("experiment-summary").textContent = parts.join(" · ");
}

// ---- drawing, at most ten times a second

let pending = false;
function schedule() {
  if (pending) return;
  pending = true;
  setTimeout(() => { pending = false; draw(); }, 100);
}

function layout(title) {  // x: rounds (or labels), whole numbers
  return {title: {text: plotText(title), font: {size: 13}}, margin: {l: 55, r: 15, t: 35, b: 30},
    xaxis: {tickformat: "d"}, legend: {orientation: "h", y: -0.15}, uirevision: title};
}

function chartOrder(key) {
  const stage = STAGES.indexOf(key.split("/")[0]);
  if (stage >= 0) return stage;
  const round = ROUND_CHARTS.indexOf(key);
  return STAGES.length + (round >= 0 ? round : ROUND_CHARTS.length);
}

function draw() {
  const run = page.run;
  const keys = [...run.charts.keys()].sort((a, b) => chartOrder(a) - chartOrder(b) || a.localeCompare(b));
  const box = document.getElementById("charts");
  for (const key of keys) {
    let div = page.drawn.get(key);
    if (!div) {
      div = el("div", null, "chart");
      div.dataset.metric = key;
      page.drawn.set(key, div);
    }
    box.append(div);  // (re)placed in order
    const chart = run.charts.get(key);
    const names = [...chart.traces.keys()].sort((a, b) => (b === "aggregate") - (a === "aggregate") || a.localeCompare(b));
    const traces = names.map((name) => {
      const points = [...chart.traces.get(name)].sort((a, b) => a[0] - b[0]);
      return {type: "scatter", mode: "lines+markers", name: plotText(name), x: points.map((p) => p[0]),
        y: points.map((p) => p[1]), line: {width: name === "aggregate" ? 3 : 1.5}};
    });
    const look = layout(`${chart.title} per round`);
    if (ROUND_CHARTS.includes(key)) look.yaxis = {rangemode: "tozero"};  // counts, seconds, bytes: from 0
    Plotly.react(div, traces, look, PLOT_CONFIG);
  }
  fillTable("rounds", [...run.rounds].sort((a, b) => a[0] - b[0]).map(([n, row]) => [
    {text: n, className: "num"},
    {text: row.time === undefined ? "" : `${row.time.toFixed(2)} s`, className: "num"},
    (row.participants ?? []).join(", "),
    row.dropped.join(", "),
    {text: megabytes(row.received), className: "num"},
    {text: megabytes(row.sent), className: "num"},
    {text: number(row.epsilon, 3), className: "num"},
    {text: row.note ?? "", title: row.note},
  ]));
}

// ---- start: the federation's stream, and the experiment named in the address if any

const federation = new EventSource(url("api/stream"));
federation.addEventListener("director", (message) => showDirector(JSON.parse(message.data)));
federation.addEventListener("envoys", (message) => showEnvoys(JSON.parse(message.data)));
federation.addEventListener("experiments", (message) => showExperiments(JSON.parse(message.data)));
federation.onerror = () => {
  const node = document.getElementById("director");
  node.textContent = "the dashboard does not answer; retrying…";
  node.className = "error";
};
if (location.hash.length > 1) select(decodeURIComponent(location.hash.slice(1)), true);
