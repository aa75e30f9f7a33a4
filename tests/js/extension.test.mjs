// Drives web/acestep_lora.js with stand-ins for the ComfyUI frontend (app, api) and the DOM, so the wiring is
// tested without a browser: the extension registers, adds the DOM widget to Train nodes only, routes websocket
// messages by node id, fetches the history after a reload without asking for a node that has no run, redraws,
// and logs no errors. What a real browser must still confirm is listed in the report / web docs.
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

const WEB = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "web");
// The websocket message and the route answers as the pack makes them (written by tests/test_routes.py from
// acestep_lora.metrics.ProgressEvent): every message below is one of these with some values changed.
const FIXTURE = JSON.parse(readFileSync(join(dirname(fileURLToPath(import.meta.url)), "fixtures",
  "training_messages.json"), "utf8"));
const message = (values) => ({ ...FIXTURE.event, output_dir: undefined, ...values });
const summary = (values) => ({ ...FIXTURE.runs.runs["7"], output_dir: undefined, ...values });
const history = (values) => ({ ...FIXTURE.history, output_dir: undefined, ...values });

// ---- stand-ins -------------------------------------------------------------------------------------------
const frames = [];
const errors = [];
const calls = { fetch: [], extensions: [] };
const listeners = new Map();
let server = { runs: {}, history: {} }; // what the fake routes answer

class FakeContext {
  constructor() { this.ops = []; }
}
for (const m of ["setTransform", "clearRect", "beginPath", "moveTo", "lineTo", "stroke", "fillText", "strokeRect",
  "save", "restore", "rect", "clip", "fill", "fillRect"]) {
  FakeContext.prototype[m] = function (...args) { this.ops.push([m, ...args]); };
}

class FakeElement {
  constructor(tag) {
    this.tagName = tag;
    this.style = {};
    this.children = [];
    this.textContent = "";
    this.width = 300;
    this.height = 150;
    this.ctx = new FakeContext();
  }
  append(...c) { this.children.push(...c); }
  replaceChildren(...c) { this.children = [...c]; }
  addEventListener(type, fn) { (this.listeners ??= {})[type] = fn; }
  getBoundingClientRect() { return { width: 400, height: 200 }; }
  getContext() { return this.ctx; }
}

globalThis.document = { createElement: (tag) => new FakeElement(tag) };
globalThis.window = { devicePixelRatio: 2 };
globalThis.getComputedStyle = () => ({ getPropertyValue: () => "" });
globalThis.requestAnimationFrame = (cb) => { frames.push(cb); return frames.length; };
globalThis.cancelAnimationFrame = () => {};
globalThis.ResizeObserver = class { observe() {} disconnect() {} };
if (!globalThis.navigator) globalThis.navigator = { language: "en-US" };
const origError = console.error;
console.error = (...a) => { errors.push(a); };

globalThis.__acestepStubs = {
  app: {
    registerExtension(ext) { calls.extensions.push(ext); },
    extensionManager: { setting: { get: () => "en" } },
  },
  api: {
    apiURL: (path) => `/api${path}`,
    addEventListener(type, fn) {
      if (!listeners.has(type)) listeners.set(type, []);
      listeners.get(type).push(fn);
    },
    async fetchApi(path) {
      calls.fetch.push(path);
      const [route, query] = path.split("?");
      if (route === "/acestep_lora/training") {
        return { ok: true, status: 200, json: async () => ({ runs: server.runs }) };
      }
      const id = decodeURIComponent(route.split("/").pop());
      const data = server.history[id];
      if (!data) return { ok: false, status: 404, json: async () => ({ error: "no training run", node: id }) };
      const since = query ? Number(new URLSearchParams(query).get("since")) : null;
      const points = since == null ? data.points : data.points.filter((p) => p[0] > since);
      return { ok: true, status: 200, json: async () => ({ ...data, points, since }) };
    },
  },
};

function emit(type, detail) {
  for (const fn of listeners.get(type) || []) fn({ type, detail });
}
const flushFrames = () => { while (frames.length) frames.shift()(); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function makeNode(id, comfyClass = "ACEStepLoRA_Train", { readOnlySerialize = false } = {}) {
  return {
    id, comfyClass, type: comfyClass, size: [400, 300], widgets: [],
    addDOMWidget(name, type, element, options) {
      const w = { name, type, element, options };
      if (readOnlySerialize) Object.defineProperty(w, "serialize", { get: () => undefined }); // assigning throws
      this.widgets.push(w);
      return w;
    },
    computeSize() { return [380, 300 + 220]; },
    setSize(s) { this.size = s; },
  };
}

// The extension imports "../../scripts/app.js": lay the files out as ComfyUI serves them.
const root = mkdtempSync(join(tmpdir(), "acestep-web-"));
mkdirSync(join(root, "scripts"));
mkdirSync(join(root, "extensions", "acestep-lora"), { recursive: true });
writeFileSync(join(root, "scripts", "app.js"), "export const app = globalThis.__acestepStubs.app;\n");
writeFileSync(join(root, "scripts", "api.js"), "export const api = globalThis.__acestepStubs.api;\n");
for (const f of ["acestep_lora.js", "chart_core.js"]) {
  copyFileSync(join(WEB, f), join(root, "extensions", "acestep-lora", f));
}
await import(pathToFileURL(join(root, "extensions", "acestep-lora", "acestep_lora.js")).href);

const ext = calls.extensions[0];

// ---- tests -----------------------------------------------------------------------------------------------
test("registers one extension with the hooks the frontend calls", () => {
  assert.equal(calls.extensions.length, 1);
  assert.equal(typeof ext.name, "string");
  for (const hook of ["init", "setup", "nodeCreated", "loadedGraphNode"]) {
    assert.equal(typeof ext[hook], "function", hook);
  }
  ext.init();
  ext.setup(); // both may run; listeners are added once
  for (const type of ["acestep_lora.training", "reconnected", "status", "executed", "execution_interrupted"]) {
    assert.equal(listeners.get(type)?.length, 1, type);
  }
});

test("only Train nodes get the chart widget; it is not serialized and needs 220 px", async () => {
  const other = makeNode(1, "ACEStepLoRA_PrepareTrainingData");
  ext.nodeCreated(other);
  assert.equal(other.widgets.length, 0);

  const node = makeNode(5);
  ext.nodeCreated(node);
  assert.equal(node.widgets.length, 1);
  const w = node.widgets[0];
  assert.equal(w.name, "loss_chart");
  assert.equal(w.type, "acestep_lora_chart");
  assert.equal(w.options.serialize, false);
  assert.equal(w.serialize, false);
  assert.equal(w.options.getMinHeight(), 220);
  assert.ok(node.size[1] >= 520, "the node grew to fit the chart");
  ext.loadedGraphNode(node); // must not add a second widget
  assert.equal(node.widgets.length, 1);

  await sleep(120);
  // no run on the server yet: only the summary is asked for (no 404 in the browser console)
  assert.deepEqual(calls.fetch, ["/acestep_lora/training"]);
  flushFrames();
  const canvas = w.element.children[0];
  assert.ok(canvas.ctx.ops.some((op) => op[0] === "fillText" && /loss curve/.test(op[1])), "waiting text drawn");
  node.onRemoved();
});

test("websocket messages reach the node with that id and are drawn", async () => {
  const a = makeNode(7);
  const b = makeNode(8);
  ext.nodeCreated(a);
  ext.nodeCreated(b);
  await sleep(120);
  emit("acestep_lora.training", message({
    node: "7", points: [[1, 0.9, 1e-5], [2, 0.8, 2e-5], [3, 0.85, 3e-5]], step: 3, total_steps: 100, epoch: 1,
    total_epochs: 10, loss: 0.85, lr: 3e-5, elapsed: 12.5, eta: 400,
  }));
  emit("acestep_lora.training", message({ node: "7", points: [[4, 0.7, 4e-5]], step: 4, total_steps: 100, epoch: 1,
    total_epochs: 10, loss: 0.7, lr: 4e-5, elapsed: 15, eta: null }));
  flushFrames();
  const chartA = a.widgets[0].element;
  const chartB = b.widgets[0].element;
  const text = chartA.children[1].textContent;
  assert.match(text, /step 4\/100/);
  assert.match(text, /epoch 1\/10/);
  assert.match(text, /ETA \?/);
  const ops = chartA.children[0].ctx.ops;
  assert.ok(ops.filter((op) => op[0] === "lineTo").length >= 3, "curves stroked");
  assert.ok(ops.some((op) => op[0] === "setTransform" && op[1] === 2), "drawn at devicePixelRatio");
  assert.equal(chartA.children[0].width, 800);
  assert.doesNotMatch(chartB.children[1].textContent, /step/, "node 8 untouched");
  // a run started by another workflow's node 7 (other output_dir) is not drawn on this node 7
  a.widgets.unshift({ name: "output_dir", value: "acestep_lora/runs/mine" });
  emit("acestep_lora.training", message({ node: "7", output_dir: "acestep_lora/runs/other", points: [[5, 9.9, 1e-5]],
    step: 5, total_steps: 100, epoch: 1, total_epochs: 10, loss: 9.9, lr: 1e-5, elapsed: 16, eta: 1 }));
  flushFrames();
  assert.match(chartA.children[1].textContent, /step 4\/100/, "foreign run ignored");
  emit("acestep_lora.training", message({ node: "7", output_dir: "acestep_lora/runs/mine", points: [[5, 0.6, 1e-5]],
    step: 5, total_steps: 100, epoch: 1, total_epochs: 10, loss: 0.6, lr: 1e-5, elapsed: 16, eta: 1 }));
  flushFrames();
  assert.match(chartA.children[1].textContent, /step 5\/100/, "own run drawn");
  a.widgets.shift();
  // malformed messages are ignored
  emit("acestep_lora.training", null);
  emit("acestep_lora.training", { points: [[5, 1, 0]] });
  a.onRemoved();
  b.onRemoved();
});

test("after a reload the history is fetched and merged; later refreshes ask only for newer points", async () => {
  const started = 1700000000.25;
  const pts = Array.from({ length: 30 }, (_, i) => [i + 1, 1 / (i + 1), 1e-4]);
  server = {
    runs: { "11": summary({ node: "11", step: 30, total_steps: 60, epoch: 3, total_epochs: 6, loss: pts[29][1],
      lr: 1e-4, elapsed: 90, eta: 90, started, done: false, num_points: 30 }) },
    history: { "11": history({ node: "11", step: 30, total_steps: 60, epoch: 3, total_epochs: 6, elapsed: 90, eta: 90,
      started, done: false, loss: pts[29][1], lr: 1e-4, num_points: 30, points: pts }) },
  };
  calls.fetch.length = 0;
  const node = makeNode(11);
  ext.nodeCreated(node);
  ext.loadedGraphNode(node);
  await sleep(150);
  assert.deepEqual(calls.fetch, ["/acestep_lora/training", "/acestep_lora/training/11"]);
  flushFrames();
  const el = node.widgets[0].element;
  assert.match(el.children[1].textContent, /step 30\/60/);

  // training went on while the socket was down; on reconnect only the new points are asked for
  const more = Array.from({ length: 5 }, (_, i) => [31 + i, 0.03, 1e-4]);
  server.history["11"].points = pts.concat(more);
  Object.assign(server.history["11"], { step: 35, num_points: 35 });
  Object.assign(server.runs["11"], { step: 35, num_points: 35 });
  calls.fetch.length = 0;
  emit("reconnected", {});
  await sleep(150);
  assert.deepEqual(calls.fetch, ["/acestep_lora/training", "/acestep_lora/training/11?since=30"]);
  flushFrames();
  assert.match(el.children[1].textContent, /step 35\/60/);

  // the run ends (cancelled at step 35): "executed"/"execution_interrupted" make the chart re-read the record
  server.runs["11"].done = true;
  server.history["11"].done = true;
  calls.fetch.length = 0;
  emit("execution_interrupted", { node_id: "11", prompt_id: "p" });
  await sleep(300);
  assert.ok(calls.fetch.includes("/acestep_lora/training/11?since=35"), JSON.stringify(calls.fetch));
  flushFrames();
  assert.match(el.children[1].textContent, /stopped$/);

  // "status" events come often: within 2 s of the last refresh they ask nothing
  calls.fetch.length = 0;
  emit("status", { exec_info: { queue_remaining: 0 } });
  await sleep(120);
  assert.deepEqual(calls.fetch, []);
  // nothing new: a reconnect costs one summary request only
  emit("reconnected", {});
  await sleep(120);
  assert.deepEqual(calls.fetch, ["/acestep_lora/training"]);

  // removed nodes stop listening
  node.onRemoved();
  const before = el.children[1].textContent;
  emit("acestep_lora.training", message({ node: "11", points: [[36, 0.01, 0]], step: 36, total_steps: 60 }));
  flushFrames();
  assert.equal(el.children[1].textContent, before);
});

test("a frontend whose widget.serialize is read-only still gets the chart", async () => {
  const node = makeNode(31, "ACEStepLoRA_Train", { readOnlySerialize: true });
  ext.nodeCreated(node);
  assert.equal(node.widgets.length, 1);
  assert.ok(node.acestepLoraChart, "chart attached");
  assert.equal(node.widgets[0].options.serialize, false);
  await sleep(80);
  node.onRemoved();
});

test("the pack's own messages (the fixture, unchanged) are drawn: live, and after a reload from the routes", async () => {
  const live = makeNode(7);
  ext.nodeCreated(live);
  const chart = live.widgets[0].element;
  live.widgets.unshift({ name: "output_dir", value: FIXTURE.event.output_dir });
  await sleep(120);
  emit("acestep_lora.training", FIXTURE.event);
  flushFrames();
  const parts = ["epoch 2/50", "step 4/100", "loss 0.7000", "lr 4.00e-5", "elapsed 15s", "ETA 6m00s"];
  for (const part of parts) assert.ok(chart.children[1].textContent.includes(part), `${part}: ${chart.children[1].textContent}`);
  live.onRemoved();

  server = { runs: FIXTURE.runs.runs, history: { "7": FIXTURE.history } };
  calls.fetch.length = 0;
  const reloaded = makeNode(7);
  ext.nodeCreated(reloaded);
  reloaded.widgets.push({ name: "output_dir", value: FIXTURE.history.output_dir });
  ext.loadedGraphNode(reloaded);
  await sleep(150);
  assert.deepEqual(calls.fetch, ["/acestep_lora/training", "/acestep_lora/training/7"]);
  flushFrames();
  const text = reloaded.widgets[0].element.children[1].textContent;
  for (const part of parts) assert.ok(text.includes(part), `${part}: ${text}`);
  reloaded.onRemoved();
});

/** The player's parts: [head (title, select), rows (label, audio)...]. */
function player(node) {
  const el = node.widgets.find((w) => w.name === "loss_chart").element.children[2];
  const [head, ...rows] = el.children;
  return { el, select: head?.children[1], audios: rows.map((r) => r.children[1]) };
}

test("validation losses and preview sets are drawn, and the player plays the newest set or the chosen one", async () => {
  server = { runs: {}, history: {} };
  const node = makeNode(7);
  ext.nodeCreated(node);
  node.widgets.unshift({ name: "output_dir", value: FIXTURE.event.output_dir });
  await sleep(120);
  assert.equal(player(node).el.style.display, "none", "no previews yet: no player");
  const minBefore = node.widgets[1].options.getMinHeight();
  emit("acestep_lora.training", FIXTURE.event);
  flushFrames();
  const chart = node.widgets[1].element;
  const ops = chart.children[0].ctx.ops;
  assert.ok(ops.some((op) => op[0] === "fillRect"), "validation points drawn");
  assert.ok(ops.some((op) => op[0] === "fill"), "preview mark drawn");
  assert.ok(ops.some((op) => op[0] === "fillText" && op[1] === "validation"), "legend");
  assert.match(chart.children[1].textContent, /val 0\.7400 \(best 0\.7400 @ epoch 2\)/);
  // the newest set (epoch 2) is shown; the LoRA-off reference is the other choice
  let p = player(node);
  assert.equal(p.el.style.display, "flex");
  assert.deepEqual(p.select.children.map((o) => [o.value, o.textContent]), [["epoch_2", "epoch 2"],
    ["base", "base (LoRA off)"]]);
  const started = FIXTURE.event.started;
  assert.deepEqual(p.audios.map((a) => a.src), [1, 2].map((i) =>
    `/api/view?filename=epoch_2_${i}.flac&subfolder=acestep_lora%2F7&type=temp&rand=${started}`));
  assert.ok(p.audios.every((a) => a.controls && a.preload === "metadata"));
  assert.match(p.audios[0].title, /dreamy lofi piano/);
  assert.equal(node.widgets[1].options.getMinHeight(), minBefore + 24 + 2 * 30, "room for the player");
  // A/B: choose the reference; a later message does not rebuild (or switch) the player while it plays
  p.select.value = "base";
  p.select.listeners.change();
  flushFrames();
  p = player(node);
  assert.match(p.audios[0].src, /filename=base_1\.flac/);
  const playing = p.audios[0];
  emit("acestep_lora.training", { ...FIXTURE.event, points: [[5, 0.6, 4e-5]], step: 5, validation: [], previews: [] });
  flushFrames();
  assert.equal(player(node).audios[0], playing, "not rebuilt");
  // a new set arrives: the user's choice stays; choosing nothing would follow the newest
  const epoch4 = { ...FIXTURE.event.previews[1], epoch: 4, step: 8,
    audio: FIXTURE.event.previews[1].audio.map((a) => ({ ...a, filename: a.filename.replace("epoch_2", "epoch_4") })) };
  emit("acestep_lora.training", { ...FIXTURE.event, points: [[8, 0.5, 4e-5]], step: 8, validation: [[8, 0.7, 4]],
    previews: [epoch4] });
  flushFrames();
  p = player(node);
  assert.equal(p.select.value, "base");
  assert.deepEqual(p.select.children.map((o) => o.value), ["epoch_4", "epoch_2", "base"]);
  // another run of this node (its own start time) starts the chart and the player afresh
  emit("acestep_lora.training", { ...FIXTURE.event, started: started + 100, points: [[1, 0.9, 1e-5]], step: 1,
    validation: [[0, 0.95, 0]], previews: [] });
  flushFrames();
  assert.equal(player(node).el.style.display, "none");
  assert.match(chart.children[1].textContent, /step 1\//);
  node.onRemoved();
});

test("a finished run reused without training fills the player from the node's result", async () => {
  const node = makeNode(12);
  ext.nodeCreated(node);
  await sleep(80);
  node.onExecuted({ text: ["already trained"], audio: FIXTURE.event.previews[1].audio,
    acestep_lora_previews: FIXTURE.event.previews });
  flushFrames();
  const p = player(node);
  assert.equal(p.el.style.display, "flex");
  assert.equal(p.audios.length, 2);
  node.onRemoved();
});

test("the player after a reload comes from the route's history", async () => {
  server = { runs: FIXTURE.runs.runs, history: { "7": FIXTURE.history } };
  const node = makeNode(7);
  ext.nodeCreated(node);
  node.widgets.push({ name: "output_dir", value: FIXTURE.history.output_dir });
  ext.loadedGraphNode(node);
  await sleep(150);
  flushFrames();
  const p = player(node);
  assert.deepEqual(p.select.children.map((o) => o.value), ["epoch_2", "base"]);
  assert.match(node.widgets[0].element.children[1].textContent, /val 0\.7400/);
  node.onRemoved();
});

test("no console errors were logged", () => {
  console.error = origError;
  assert.deepEqual(errors, []);
});
