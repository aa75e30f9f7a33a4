// Tests of web/chart_core.js (the chart's pure logic). Run: node --test tests/js/
import assert from "node:assert/strict";
import { test } from "node:test";

import * as core from "../../web/chart_core.js";

const close = (a, b, eps = 1e-9) => assert.ok(Math.abs(a - b) <= eps, `${a} != ${b}`);

test("ema is bias-corrected: the first value is kept, then a weighted average (same as nodes/preview.py)", () => {
  const out = core.ema([1, 2, 3], 0.9);
  close(out[0], 1);
  close(out[1], (0.9 * 0.1 * 1 + 0.1 * 2) / (1 - 0.81)); // 1.526315...
  // nodes/preview.py smooth([1, 2, 3]) gives these numbers too
  close(out[1], 1.5263157894736843);
  close(out[2], 2.0701107011070117);
  assert.deepEqual(core.ema([], 0.9), []);
  // constant input stays constant (bias correction works from the first step)
  for (const v of core.ema([0.5, 0.5, 0.5, 0.5])) close(v, 0.5);
});

test("ema skips non-finite values without poisoning the average", () => {
  const out = core.ema([NaN, 1, null, 3], 0.5);
  assert.ok(Number.isNaN(out[0]));
  close(out[1], 1);
  close(out[2], 1);
  close(out[3], (0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25));
});

test("cleanPoints drops malformed points and normalises lr", () => {
  const pts = core.cleanPoints([[1, 0.5, 1e-4], [2, null, 1e-4], "x", [3, 0.4], [NaN, 0.1, 0], [4, 0.3, null]]);
  assert.deepEqual(pts, [[1, 0.5, 1e-4], [3, 0.4, null], [4, 0.3, null]]);
  assert.deepEqual(core.cleanPoints(null), []);
});

test("appendPoints adds new steps and never duplicates a step", () => {
  let pts = core.appendPoints([], [[1, 1.0, 1e-4], [2, 0.9, 1e-4]]);
  pts = core.appendPoints(pts, [[3, 0.8, 1e-4]]);
  assert.deepEqual(pts.map((p) => p[0]), [1, 2, 3]);
  // an overlapping delivery (history fetched while messages were in flight) replaces, not duplicates
  pts = core.appendPoints(pts, [[2, 0.9, 1e-4], [3, 0.8, 1e-4], [4, 0.7, 1e-4]]);
  assert.deepEqual(pts.map((p) => p[0]), [1, 2, 3, 4]);
  // duplicates inside one delivery keep the last value
  pts = core.appendPoints(pts, [[5, 0.6, 1e-4], [5, 0.65, 1e-4]]);
  assert.deepEqual(pts.slice(-1), [[5, 0.65, 1e-4]]);
  // nothing new: the same array comes back (no redraw needed)
  assert.equal(core.appendPoints(pts, []), pts);
});

test("appendPoints: a new run (steps restart) replaces the old curve; a resume continues it", () => {
  const old = [[1, 1, 0], [2, 0.9, 0], [3, 0.8, 0], [4, 0.7, 0]];
  assert.deepEqual(core.appendPoints(old, [[1, 2, 0]]), [[1, 2, 0]]);
  // resumed from a checkpoint at step 2: steps 3.. are recomputed
  assert.deepEqual(core.appendPoints(old, [[3, 0.5, 0]]), [[1, 1, 0], [2, 0.9, 0], [3, 0.5, 0]]);
  // resumed where it stopped
  assert.equal(core.appendPoints(old, [[5, 0.6, 0]]).length, 5);
});

test("mergeHistory keeps websocket points newer than the server's history", () => {
  const ws = [[9, 0.2, 0], [10, 0.1, 0]];
  const history = [[1, 1, 0], [2, 0.9, 0], [9, 0.25, 0]];
  assert.deepEqual(core.mergeHistory(ws, history), [[1, 1, 0], [2, 0.9, 0], [9, 0.25, 0], [10, 0.1, 0]]);
  assert.equal(core.mergeHistory(ws, []), ws);
});

test("downsampleIndices keeps first, last and the extremes of each bucket", () => {
  const values = Array.from({ length: 1000 }, (_, i) => Math.sin(i / 10));
  values[500] = 10; // a spike must survive
  values[700] = -10;
  const idx = core.downsampleIndices(values, 100);
  assert.ok(idx.length <= 102, `${idx.length}`);
  assert.equal(idx[0], 0);
  assert.equal(idx[idx.length - 1], 999);
  assert.ok(idx.includes(500) && idx.includes(700));
  assert.deepEqual(idx, [...idx].sort((a, b) => a - b));
  assert.deepEqual(core.downsampleIndices([3, 1, 2], 100), [0, 1, 2]);
  const stride = core.strideIndices(1000, 100);
  assert.ok(stride.length <= 101);
  assert.equal(stride[stride.length - 1], 999);
});

test("niceTicks covers the data with round steps", () => {
  for (const [lo, hi] of [[0.1234, 0.9876], [0.3, 0.36], [0.0012, 0.0019], [1, 37], [120, 40000], [-0.5, 0.5]]) {
    const t = core.niceTicks(lo, hi, 4);
    assert.ok(t.lo <= lo && t.hi >= hi, `${JSON.stringify(t)} does not cover ${lo}..${hi}`);
    assert.ok(t.ticks.length >= 2 && t.ticks.length <= 11, JSON.stringify(t));
    const m = t.step / Math.pow(10, Math.floor(Math.log10(t.step)));
    assert.ok([1, 2, 5].some((k) => Math.abs(m - k) < 1e-9), `step ${t.step} is not 1/2/5 x 10^k`);
    assert.equal(t.ticks[0], t.lo);
    close(t.ticks[t.ticks.length - 1], t.hi, 1e-12);
  }
  const flat = core.niceTicks(0.5, 0.5);
  assert.ok(flat.lo < 0.5 && flat.hi > 0.5);
  assert.deepEqual(core.niceTicks(NaN, 1).ticks.length > 0, true);
});

test("formatDuration, formatLoss, formatLr, formatCount, formatTick", () => {
  assert.equal(core.formatDuration(42), "42s");
  assert.equal(core.formatDuration(725), "12m05s");
  assert.equal(core.formatDuration(3725), "1h02m");
  assert.equal(core.formatDuration(90000), "25h00m");
  for (const bad of [null, undefined, NaN, Infinity, -1, "12"]) assert.equal(core.formatDuration(bad), "?");
  assert.equal(core.formatLoss(0.123456), "0.1235");
  assert.equal(core.formatLoss(0.00001234), "1.23e-5");
  assert.equal(core.formatLoss(null), "?");
  assert.equal(core.formatLr(3e-4), "3.00e-4");
  assert.equal(core.formatLr(0.01), "1.00e-2");
  assert.equal(core.formatCount(950), "950");
  assert.equal(core.formatCount(1000), "1k");
  assert.equal(core.formatCount(1200), "1.2k");
  assert.equal(core.formatCount(40000), "40k");
  assert.equal(core.formatCount(1500000), "1.5M");
  assert.equal(core.formatTick(0.35, 0.05), "0.35");
  assert.equal(core.formatTick(0.3, 0.1), "0.3");
  assert.equal(core.formatTick(20, 10), "20");
});

test("statusText shows epoch, step, loss with EMA, lr, elapsed and ETA; done or stopped at the end", () => {
  assert.equal(core.statusText(core.initialState()), core.LABELS.en.waiting);
  let s = core.applyMessage(core.initialState(), {
    node: "7", points: [[1, 0.5, 1e-4], [2, 0.4, 2e-4]], step: 2, total_steps: 100, epoch: 1, total_epochs: 50,
    loss: 0.4, lr: 2e-4, elapsed: 65, eta: 3725,
  });
  const text = core.statusText(s);
  const parts = ["epoch 1/50", "step 2/100", "loss 0.4000", "EMA 0.44", "lr 2.00e-4", "elapsed 1m05s", "ETA 1h02m"];
  for (const part of parts) {
    assert.ok(text.includes(part), `${part} missing in: ${text}`);
  }
  s = core.applyHistory(s, { ...s.info, points: [[1, 0.5, 1e-4], [2, 0.4, 2e-4]], step: 2, total_steps: 100,
    started: 1, done: true, since: null });
  assert.ok(core.statusText(s).endsWith("stopped"), core.statusText(s));
  s = { ...s, info: { ...s.info, step: 100 } };
  assert.ok(core.statusText(s).endsWith("done"));
  assert.ok(core.statusText(s, core.labelsFor("zh-CN")).includes("轮次"));
  assert.equal(core.labelsFor("en-US"), core.LABELS.en);
  assert.equal(core.labelsFor(undefined), core.LABELS.en);
  // ETA unknown (NaN sent as null)
  const unknown = core.applyMessage(core.initialState(), { points: [[1, 1, 0]], step: 1, eta: null });
  assert.ok(core.statusText(unknown).includes("ETA ?"));
});

test("applyMessage: messages accumulate, info follows the newest message", () => {
  let s = core.initialState();
  s = core.applyMessage(s, { node: "3", points: [[1, 1, 0.1]], step: 1, total_steps: 10, eta: 9 });
  s = core.applyMessage(s, { node: "3", points: [[2, 0.8, 0.1], [3, 0.7, 0.1]], step: 3, total_steps: 10, eta: 7 });
  assert.equal(s.points.length, 3);
  assert.equal(s.info.step, 3);
  assert.equal(s.info.eta, 7);
  assert.equal(s.info.done, false);
  assert.equal(core.applyMessage(s, null), s);
  const nan = core.applyMessage(s, { points: [], eta: NaN });
  assert.equal(nan.info.eta, null);
});

test("applyHistory after a page reload: full history, then only newer points of the same run", () => {
  let s = core.initialState();
  // websocket data arrived before the history answer
  s = core.applyMessage(s, { points: [[11, 0.3, 0]], step: 11, total_steps: 20 });
  const full = { node: "3", points: Array.from({ length: 10 }, (_, i) => [i + 1, 1 - i * 0.05, 0]), step: 10,
    total_steps: 20, epoch: 5, total_epochs: 10, started: 1700000000.5, done: false, since: null };
  s = core.applyHistory(s, full);
  assert.deepEqual(s.points.map((p) => p[0]), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
  assert.equal(s.started, 1700000000.5);
  assert.equal(s.info.step, 11, "the websocket was ahead: keep its info");
  // same run, partial answer
  const plan = core.planFetch(s, { node: "3", started: 1700000000.5, step: 13, done: false, num_points: 13 });
  assert.deepEqual(plan, { fetch: true, since: 11 });
  s = core.applyHistory(s, { points: [[12, 0.2, 0], [13, 0.1, 0]], step: 13, total_steps: 20, started: 1700000000.5,
    done: false, since: 11 });
  assert.equal(s.points.length, 13);
  assert.equal(s.info.step, 13);
  // nothing new: no request
  assert.deepEqual(core.planFetch(s, { started: 1700000000.5, step: 13, done: false, num_points: 13 }).fetch, false);
  // finished: fetch to learn it
  assert.equal(core.planFetch(s, { started: 1700000000.5, step: 13, done: true, num_points: 13 }).fetch, true);
  // another run on the same node replaces the curve
  const other = { points: [[1, 2, 0]], step: 1, total_steps: 5, started: 1800000000, done: false, since: null };
  assert.deepEqual(core.planFetch(s, { started: 1800000000, step: 1, num_points: 1 }), { fetch: true, since: null });
  s = core.applyHistory(s, other);
  assert.deepEqual(s.points, [[1, 2, 0]]);
  assert.equal(s.started, 1800000000);
  // no run for this node
  assert.deepEqual(core.planFetch(s, null), { fetch: false, since: null });
  // malformed answers change nothing
  assert.equal(core.applyHistory(s, { error: "no training run" }), s);
});

test("pickTargets / findRun match node ids, also inside subgraphs", () => {
  assert.deepEqual(core.pickTargets("5", [3, 5, "5"]), [1, 2]);
  assert.deepEqual(core.pickTargets("12:5", [3, 5]), [1]);
  assert.deepEqual(core.pickTargets("12:5", [5, "12:5"]), [1], "exact wins");
  assert.deepEqual(core.pickTargets("15", [5]), [], "no suffix match without the colon");
  assert.deepEqual(core.pickTargets(null, [5]), []);
  const runs = { "4": { node: "4" }, "9:7": { node: "9:7" } };
  assert.equal(core.findRun(runs, 4).node, "4");
  assert.equal(core.findRun(runs, 7).node, "9:7");
  assert.equal(core.findRun(runs, 9), null);
  assert.equal(core.findRun(null, 1), null);
  assert.equal(core.historyPath("/acestep_lora/training", "9:7"), "/acestep_lora/training/9%3A7");
  assert.equal(core.historyPath("/acestep_lora/training", 4, 10), "/acestep_lora/training/4?since=10");
});

test("layoutChart maps points into the plot box, with y ticks covering every loss", () => {
  const points = Array.from({ length: 500 }, (_, i) => [i + 1, 1 / Math.sqrt(i + 1) + (i % 7) * 0.01, 1e-4]);
  const L = core.layoutChart(points, 400, 220);
  assert.equal(L.empty, false);
  const { plot } = L;
  for (const [x, y] of [...L.raw, ...L.smooth]) {
    assert.ok(x >= plot.left - 1e-6 && x <= plot.right + 1e-6, `x ${x}`);
    assert.ok(y >= plot.top - 1e-6 && y <= plot.bottom + 1e-6, `y ${y}`);
  }
  assert.ok(L.raw.length <= 2 * plot.width + 2);
  close(L.raw[0][0], plot.left);
  close(L.raw[L.raw.length - 1][0], plot.right);
  assert.ok(L.yLo <= Math.min(...points.map((p) => p[1])) && L.yHi >= Math.max(...points.map((p) => p[1])));
  assert.ok(L.yTicks.length >= 2 && L.yTicks.every((t) => typeof t.label === "string" && t.label.length > 0));
  assert.ok(L.xTicks.every((t) => t.x >= plot.left - 1e-6 && t.x <= plot.right + 1e-6));
  // the EMA is smoother than the raw curve: its total variation is smaller
  const tv = (line) => line.slice(1).reduce((s, p, i) => s + Math.abs(p[1] - line[i][1]), 0);
  assert.ok(tv(L.smooth) < tv(L.raw));
  assert.equal(L.last.step, 500);
});

test("layoutChart with no data, one point or a tiny canvas does not throw", () => {
  assert.equal(core.layoutChart([], 300, 200).empty, true);
  assert.equal(core.layoutChart([[1, 0.5, 0]], 3, 3).empty, true);
  const one = core.layoutChart([[7, 0.5, null]], 300, 200);
  assert.equal(one.empty, false);
  assert.equal(one.raw.length, 1);
  assert.ok(Number.isFinite(one.raw[0][0]) && Number.isFinite(one.raw[0][1]));
});

test("ownsRun: a run shows only on a node with the output_dir that started it", () => {
  assert.equal(core.ownsRun("acestep_lora/runs/a", { output_dir: "acestep_lora/runs/a" }), true);
  assert.equal(core.ownsRun(" acestep_lora/runs/a ", { output_dir: "acestep_lora/runs/a" }), true);
  assert.equal(core.ownsRun("acestep_lora/runs/b", { output_dir: "acestep_lora/runs/a" }), false);
  assert.equal(core.ownsRun(undefined, { output_dir: "x" }), true, "linked input: unknown, accept");
  assert.equal(core.ownsRun("x", { node: "1" }), true, "older server: accept");
  assert.equal(core.ownsRun("x", null), true);
});

const set = (epoch, step, base = false) => ({ epoch, step, base, files: [], captions: ["c"],
  audio: [{ filename: `${base ? "base" : `epoch_${epoch}`}_1.flac`, subfolder: "acestep_lora/3", type: "temp" }] });

test("validation losses and preview sets: a resume's announcement supersedes, another run starts afresh", () => {
  let s = core.applyMessage(core.initialState(), { started: 5, points: [], validation: [[0, 0.9, 0]],
    previews: [set(0, 0, true)] });
  s = core.applyMessage(s, { started: 5, points: [[1, 0.8, 0], [2, 0.7, 0]], step: 2 });
  s = core.applyMessage(s, { started: 5, points: [], validation: [[2, 0.75, 1], [2, NaN, 1], "x"], previews: [set(1, 2)] });
  assert.deepEqual(s.validation, [[0, 0.9, 0], [2, 0.75, 1]]);
  assert.deepEqual(s.previews.map(core.previewKey), ["base", "epoch_1"]);
  // a resumed run announces what it restored (from step 0): it replaces, never duplicates
  s = core.applyMessage(s, { started: 5, points: [], validation: [[0, 0.9, 0], [2, 0.75, 1]] });
  assert.deepEqual(s.validation, [[0, 0.9, 0], [2, 0.75, 1]]);
  // another run of the node (other start time)
  s = core.applyMessage(s, { started: 6, points: [[1, 0.5, 0]], step: 1 });
  assert.deepEqual([s.points.length, s.validation, s.previews, s.started], [1, [], [], 6]);
  // the route: the full history replaces; `since` adds
  s = core.applyHistory(s, { started: 6, since: null, step: 2, points: [[1, 0.5, 0], [2, 0.4, 0]],
    validation: [[0, 1, 0]], previews: [set(0, 0, true)] });
  s = core.applyHistory(s, { started: 6, since: 2, step: 4, points: [[3, 0.3, 0], [4, 0.2, 0]],
    validation: [[4, 0.6, 2]], previews: [set(2, 4)] });
  assert.deepEqual(s.validation, [[0, 1, 0], [4, 0.6, 2]]);
  assert.deepEqual(s.previews.map(core.previewKey), ["base", "epoch_2"]);
  const text = core.statusText(s);
  assert.ok(text.includes("val 0.6000 (best 0.6000 @ epoch 2)"), text);
  assert.ok(core.statusText(s, core.labelsFor("zh")).includes("验证 0.6000"));
});

test("the player's choices: newest epoch first, the LoRA-off reference last; /view paths", () => {
  const sets = [set(0, 0, true), set(2, 10), set(4, 20), { ...set(6, 30), audio: [] }];
  assert.deepEqual(core.previewChoices(sets).map((c) => [c.key, c.label]),
    [["epoch_4", "epoch 4"], ["epoch_2", "epoch 2"], ["base", "base (LoRA off)"]]);
  assert.equal(core.pickPreview(sets).key, "epoch_4");
  assert.equal(core.pickPreview(sets, "base").key, "base");
  assert.equal(core.pickPreview(sets, "epoch_99").key, "epoch_4", "a choice that is gone: the newest");
  assert.equal(core.pickPreview([]), null);
  assert.equal(core.previewChoices(sets, core.labelsFor("zh"))[2].label, "基础模型（无 LoRA）");
  assert.equal(core.viewPath({ filename: "a b.flac", subfolder: "acestep_lora/3", type: "temp" }, 17),
    "/view?filename=a+b.flac&subfolder=acestep_lora%2F3&type=temp&rand=17");
  assert.equal(core.viewPath({ filename: "a.flac" }), "/view?filename=a.flac&subfolder=&type=temp");
});

test("layoutChart: validation is a second series inside the y range, preview epochs are marked", () => {
  const points = Array.from({ length: 100 }, (_, i) => [i + 1, 1 - i * 0.005, 1e-4]);
  const L = core.layoutChart(points, 400, 220, { validation: [[0, 1.4, 0], [50, 0.9, 5], [100, 0.95, 10]],
    previews: [set(0, 0, true), set(5, 50), set(10, 100)] });
  assert.equal(L.validation.length, 3);
  assert.ok(L.yHi >= 1.4, "the y axis covers the validation loss");
  close(L.x0, 0);
  close(L.validation[0][0], L.plot.left);
  for (const [x, y] of L.validation) assert.ok(x >= L.plot.left && x <= L.plot.right && y >= L.plot.top && y <= L.plot.bottom);
  assert.deepEqual(L.marks.map((m) => m.epoch), [5, 10], "epochs with previews (not the reference)");
  close(L.marks[1].x, L.plot.right);
  // before the first step: only the LoRA-off validation point
  const early = core.layoutChart([], 400, 220, { validation: [[0, 1.2, 0]] });
  assert.equal(early.empty, false);
  assert.equal(early.validation.length, 1);
  assert.equal(early.last, null);
});

test("a page opened mid-run: the websocket's first message (with the run's start) still gets the whole history", () => {
  let s = core.applyMessage(core.initialState(), { started: 9, points: [[94, 0.5, 0]], step: 94, total_steps: 200,
    validation: [[94, 0.6, 10]] });
  assert.deepEqual(core.planFetch(s, { started: 9, step: 94, num_points: 94 }), { fetch: true, since: null });
  const points = Array.from({ length: 94 }, (_, i) => [i + 1, 1, 0]);
  s = core.applyHistory(s, { started: 9, since: null, step: 93, points: points.slice(0, 93),
    validation: [[0, 1, 0], [60, 0.7, 6]], previews: [set(0, 0, true)] });
  assert.deepEqual([s.points[0][0], s.points.length], [1, 94]);
  assert.deepEqual(s.validation, [[0, 1, 0], [60, 0.7, 6], [94, 0.6, 10]], "the websocket's newer one kept");
  assert.deepEqual(s.previews.map(core.previewKey), ["base"]);
  assert.equal(core.planFetch(s, { started: 9, step: 94, num_points: 94 }).fetch, false);
});
