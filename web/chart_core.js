// Pure logic of the ACE-Step LoRA live training chart: no DOM, no ComfyUI, no side effects at import.
// ComfyUI imports every .js under WEB_DIRECTORY as an ES module, so this file must only declare and export.
// web/acestep_lora.js draws with it; tests/js/chart_core.test.mjs tests it with `node --test tests/js/`.
//
// A point is [step, loss, lr] (lr may be null). State = {points, info, started, validation, previews}; info holds
// the last known step/total_steps/epoch/total_epochs/loss/lr/elapsed/eta/done of the run, as sent by
// nodes/train.py (websocket "acestep_lora.training") and nodes/routes.py (GET /acestep_lora/training[/<node id>]).
// validation: the held-out losses [step, loss, epoch] (step 0: before training, LoRA off); previews: the preview
// sets {epoch, step, base, files, captions, audio: [{filename, subfolder, type}]} (acestep_lora/metrics.py
// ProgressEvent; audio added by nodes/train.py).

export const EMA_WEIGHT = 0.9;
export const INFO_KEYS = ["step", "total_steps", "epoch", "total_epochs", "loss", "lr", "elapsed", "eta"];

const isNum = (v) => typeof v === "number" && Number.isFinite(v);

// ---------------------------------------------------------------------------------------------------------
// Series

/** Bias-corrected exponential moving average (TensorBoard's smoothing). Non-finite values are skipped: their
 *  slot repeats the previous smoothed value (NaN before the first finite one). */
export function ema(values, weight = EMA_WEIGHT) {
  const out = new Array(values.length);
  let avg = 0;
  let n = 0;
  let prev = NaN;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (isNum(v)) {
      avg = weight * avg + (1 - weight) * v;
      n += 1;
      prev = avg / (1 - Math.pow(weight, n));
    }
    out[i] = prev;
  }
  return out;
}

/** Keep points with a finite step and loss, as [step, loss, lr|null]; input order is kept. */
export function cleanPoints(points) {
  if (!Array.isArray(points)) return [];
  const out = [];
  for (const p of points) {
    if (!Array.isArray(p) || !isNum(p[0]) || !isNum(p[1])) continue;
    out.push([p[0], p[1], isNum(p[2]) ? p[2] : null]);
  }
  return out;
}

/** New points from the websocket. They supersede every existing point at or after their first step, so
 *  overlapping deliveries never duplicate a step, a new run (steps restart) replaces the old curve, and a run
 *  resumed from an earlier checkpoint continues the curve from there. */
export function appendPoints(existing, incoming) {
  const add = cleanPoints(incoming);
  if (add.length === 0) return existing;
  const first = add[0][0];
  const kept = existing.filter((p) => p[0] < first);
  // within one delivery, keep the last value of a step
  const seen = new Map();
  for (const p of add) seen.set(p[0], p);
  const fresh = [...seen.values()].sort((a, b) => a[0] - b[0]);
  return kept.concat(fresh);
}

/** The server's full history of the current run, plus any newer points the websocket already delivered. */
export function mergeHistory(existing, history) {
  const hist = cleanPoints(history);
  if (hist.length === 0) return existing;
  const last = hist[hist.length - 1][0];
  return hist.concat(existing.filter((p) => p[0] > last));
}

/** Validation losses as [step, loss, epoch] with a finite step and loss; input order is kept. */
export function cleanValidation(list) {
  if (!Array.isArray(list)) return [];
  return list.filter((v) => Array.isArray(v) && isNum(v[0]) && isNum(v[1])).map((v) => [v[0], v[1], isNum(v[2]) ? v[2] : null]);
}

/** Preview sets with a step and a list of playable clips. */
export function cleanPreviews(list) {
  if (!Array.isArray(list)) return [];
  return list.filter((p) => p && typeof p === "object" && isNum(p.step) && Array.isArray(p.audio));
}

/** Incoming validation losses or preview sets supersede the existing ones at or after their first step (a resumed
 *  run announces what it restored; the node does the same, nodes/train.py merge). */
export function supersede(existing, incoming, stepOf) {
  if (incoming.length === 0) return existing;
  const first = Math.min(...incoming.map(stepOf));
  return existing.filter((x) => stepOf(x) < first).concat(incoming).sort((a, b) => stepOf(a) - stepOf(b));
}

/** Indices that keep the shape of a long series: the min and max of each bucket, first and last always. */
export function downsampleIndices(values, maxPoints) {
  const n = values.length;
  if (n <= maxPoints || maxPoints < 4) return [...Array(n).keys()];
  const buckets = Math.floor(maxPoints / 2);
  const size = n / buckets;
  const keep = [0];
  for (let b = 0; b < buckets; b++) {
    const start = Math.floor(b * size);
    const end = Math.min(n, Math.floor((b + 1) * size));
    let lo = start;
    let hi = start;
    for (let i = start; i < end; i++) {
      if (values[i] < values[lo]) lo = i;
      if (values[i] > values[hi]) hi = i;
    }
    keep.push(Math.min(lo, hi), Math.max(lo, hi));
  }
  keep.push(n - 1);
  return [...new Set(keep)].sort((a, b) => a - b);
}

/** Every k-th index (and the last) so that at most about maxPoints remain. */
export function strideIndices(n, maxPoints) {
  if (n <= maxPoints) return [...Array(n).keys()];
  const stride = Math.ceil(n / Math.max(1, maxPoints));
  const out = [];
  for (let i = 0; i < n; i += stride) out.push(i);
  if (out[out.length - 1] !== n - 1) out.push(n - 1);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Axes

/** A "nice" tick step (1, 2, 5 x 10^k) close to range / count. */
export function niceStep(range, count = 4) {
  const raw = Math.abs(range) / Math.max(1, count);
  if (!(raw > 0) || !Number.isFinite(raw)) return 1;
  const exp = Math.floor(Math.log10(raw));
  const base = Math.pow(10, exp);
  const f = raw / base;
  const nice = f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10;
  return nice * base;
}

const roundTo = (v, step) => {
  const decimals = Math.max(0, Math.min(12, -Math.floor(Math.log10(step)) + 1));
  return Number(v.toFixed(decimals));
};

/** Axis from lo to hi: bounds widened to multiples of a nice step, and the ticks between them. */
export function niceTicks(lo, hi, count = 4) {
  if (!isNum(lo) || !isNum(hi)) return { lo: 0, hi: 1, step: 0.25, ticks: [0, 0.25, 0.5, 0.75, 1] };
  if (hi < lo) [lo, hi] = [hi, lo];
  if (hi === lo) {
    const pad = Math.abs(lo) * 0.05 || 0.5;
    lo -= pad;
    hi += pad;
  }
  const step = niceStep(hi - lo, count);
  const nlo = roundTo(Math.floor(lo / step + 1e-9) * step, step);
  const nhi = roundTo(Math.ceil(hi / step - 1e-9) * step, step);
  const ticks = [];
  for (let i = 0, v = nlo; v <= nhi + step * 1e-6 && i < 1000; i++, v = nlo + i * step) ticks.push(roundTo(v, step));
  return { lo: nlo, hi: nhi, step, ticks };
}

/** Min and max of the finite values; [0, 1] when there are none. */
export function valueRange(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (!isNum(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return lo <= hi ? [lo, hi] : [0, 1];
}

// ---------------------------------------------------------------------------------------------------------
// Text

/** 42 -> "42s", 725 -> "12m05s", 3725 -> "1h02m"; null, NaN or negative -> "?". */
export function formatDuration(seconds) {
  if (!isNum(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** Loss with 4 decimals, or 3 significant digits in exponent form when tiny or huge. */
export function formatLoss(v) {
  if (!isNum(v)) return "?";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toFixed(4);
}

/** Learning rate as 3.00e-4. */
export function formatLr(v) {
  if (!isNum(v)) return "?";
  return v.toExponential(2).replace("e+", "e");
}

/** 950 -> "950", 1000 -> "1k", 1200 -> "1.2k", 40000 -> "40k", 1500000 -> "1.5M". */
export function formatCount(n) {
  if (!isNum(n)) return "?";
  const a = Math.abs(n);
  const sign = n < 0 ? "-" : "";
  const short = (v, unit) => `${sign}${Number(v.toFixed(v < 100 ? 1 : 0))}${unit}`;
  if (a >= 1e6) return short(a / 1e6, "M");
  if (a >= 1e3) return short(a / 1e3, "k");
  return String(Math.round(n * 100) / 100);
}

/** An axis label with as many decimals as the tick step needs. */
export function formatTick(v, step) {
  if (!isNum(v)) return "";
  const decimals = isNum(step) && step > 0 ? Math.max(0, -Math.floor(Math.log10(step) + 1e-9)) : 2;
  if (decimals > 6) return v.toExponential(1);
  return v.toFixed(decimals);
}

export const LABELS = {
  en: {
    epoch: "epoch", step: "step", loss: "loss", smoothed: "EMA", lr: "lr", elapsed: "elapsed", eta: "ETA",
    done: "done", stopped: "stopped", waiting: "The loss curve appears here while this node trains.",
    raw: "loss", ema: "EMA 0.9", validation: "validation", val: "val", best: "best",
    previews: "Previews", base: "base (LoRA off)", clip: "clip",
  },
  zh: {
    epoch: "轮次", step: "步数", loss: "损失", smoothed: "平滑", lr: "学习率", elapsed: "已用",
    eta: "剩余",
    done: "完成", stopped: "已停止", waiting: "训练时，这里显示损失曲线。",
    raw: "损失", ema: "EMA 0.9", validation: "验证", val: "验证", best: "最佳",
    previews: "预览", base: "基础模型（无 LoRA）", clip: "片段",
  },
};

/** The label table for a locale such as "zh", "zh-CN", "en-US" (English for anything else). */
export function labelsFor(locale) {
  return String(locale || "").toLowerCase().startsWith("zh") ? LABELS.zh : LABELS.en;
}

/** One line under the chart: epoch, step, loss (and its EMA), lr, elapsed, ETA or done/stopped. */
export function statusText(state, labels = LABELS.en) {
  const info = (state && state.info) || {};
  const points = (state && state.points) || [];
  if (points.length === 0 && !isNum(info.step)) return labels.waiting;
  const parts = [];
  const frac = (a, b) => `${isNum(a) ? a : "?"}/${isNum(b) ? b : "?"}`;
  parts.push(`${labels.epoch} ${frac(info.epoch, info.total_epochs)}`);
  parts.push(`${labels.step} ${frac(info.step, info.total_steps)}`);
  const last = points.length ? points[points.length - 1] : null;
  const loss = isNum(info.loss) ? info.loss : last ? last[1] : NaN;
  let lossText = `${labels.loss} ${formatLoss(loss)}`;
  if (points.length > 1) {
    const smooth = ema(points.map((p) => p[1]));
    lossText += ` (${labels.smoothed} ${formatLoss(smooth[smooth.length - 1])})`;
  }
  parts.push(lossText);
  const held = (state && state.validation) || [];
  if (held.length) {
    const trained = held.filter((v) => v[0] > 0);
    const best = trained.length ? trained.reduce((a, b) => (b[1] < a[1] ? b : a)) : null;
    let val = `${labels.val} ${formatLoss(held[held.length - 1][1])}`;
    if (best) val += ` (${labels.best} ${formatLoss(best[1])} @ ${labels.epoch} ${best[2] ?? "?"})`;
    parts.push(val);
  }
  const lr = isNum(info.lr) ? info.lr : last ? last[2] : NaN;
  parts.push(`${labels.lr} ${formatLr(lr)}`);
  parts.push(`${labels.elapsed} ${formatDuration(info.elapsed)}`);
  if (info.done) {
    const finished = isNum(info.step) && isNum(info.total_steps) && info.step >= info.total_steps;
    parts.push(finished ? labels.done : labels.stopped);
  } else {
    parts.push(`${labels.eta} ${formatDuration(info.eta)}`);
  }
  return parts.join(" · ");
}

// ---------------------------------------------------------------------------------------------------------
// State

export function initialState() {
  return { points: [], info: {}, started: null, validation: [], previews: [] };
}

function pickInfo(data) {
  const info = {};
  for (const k of INFO_KEYS) if (data[k] !== undefined) info[k] = isNum(data[k]) ? data[k] : null;
  return info;
}

/** A websocket "acestep_lora.training" message: {node, points, step, total_steps, epoch, ..., validation,
 *  previews, started}. A message of another run (its `started` differs) starts the state afresh. */
export function applyMessage(state, data) {
  if (!data || typeof data !== "object") return state;
  if (isNum(data.started) && isNum(state.started) && data.started !== state.started) state = initialState();
  const points = appendPoints(state.points, data.points);
  const validation = supersede(state.validation ?? [], cleanValidation(data.validation), (v) => v[0]);
  const previews = supersede(state.previews ?? [], cleanPreviews(data.previews), (p) => p.step);
  return { points, info: { ...state.info, ...pickInfo(data), done: false },
    started: isNum(data.started) ? data.started : state.started, validation, previews };
}

/** A GET /acestep_lora/training/<node id> answer. With `since` it holds only newer points of the same run. */
export function applyHistory(state, data) {
  if (!data || typeof data !== "object" || !Array.isArray(data.points)) return state;
  const sameRun = state.started !== null && data.started != null && state.started === data.started;
  let points;
  if (data.since != null) points = sameRun ? appendPoints(state.points, data.points) : cleanPoints(data.points);
  else if (sameRun || state.started === null) points = mergeHistory(state.points, data.points);
  else points = cleanPoints(data.points);
  // the websocket may already be ahead of the server's answer: then keep the newer info it gave
  const continuing = sameRun || state.started === null;
  const lastKnown = state.points.length ? state.points[state.points.length - 1][0] : -Infinity;
  const wsAhead = continuing && !(isNum(data.step) && data.step >= lastKnown);
  const info = wsAhead ? { ...state.info } : { ...pickInfo(data), done: Boolean(data.done) };
  let validation = cleanValidation(data.validation);
  let previews = cleanPreviews(data.previews);
  if (data.since != null && sameRun) {
    validation = supersede(state.validation ?? [], validation, (v) => v[0]);
    previews = supersede(state.previews ?? [], previews, (p) => p.step);
  } else if (continuing) { // the websocket may have brought newer ones than the answer
    const last = Math.max(-Infinity, ...cleanPoints(data.points).map((p) => p[0]), ...validation.map((v) => v[0]),
      ...previews.map((p) => p.step));
    validation = validation.concat((state.validation ?? []).filter((v) => v[0] > last));
    previews = previews.concat((state.previews ?? []).filter((p) => p.step > last));
  }
  return { points, info, started: data.started ?? state.started, validation, previews };
}

/** Given a run summary from GET /acestep_lora/training: fetch the history? and since which step? */
export function planFetch(state, run) {
  if (!run) return { fetch: false, since: null };
  const sameRun = state.started !== null && run.started != null && state.started === run.started;
  // a run's history starts at step 1: points from a later step came by websocket only (a page opened mid-run)
  if (!sameRun || state.points.length === 0 || state.points[0][0] > 1) {
    return { fetch: (run.num_points ?? 1) > 0, since: null };
  }
  const last = state.points[state.points.length - 1][0];
  const behind = isNum(run.step) && run.step > last;
  const doneChanged = Boolean(run.done) !== Boolean(state.info.done);
  return { fetch: behind || doneChanged, since: last };
}

/** The query path for one node's history. */
export function historyPath(base, nodeKey, since = null) {
  const path = `${base}/${encodeURIComponent(String(nodeKey))}`;
  return since == null ? path : `${path}?since=${encodeURIComponent(String(since))}`;
}

/** Which of the graph node ids an event's node id means: exact matches, else the node inside a subgraph whose
 *  execution id is "<parent id>:...:<node id>". Returns indices into ids. */
export function pickTargets(eventNode, ids) {
  if (eventNode == null) return [];
  const key = String(eventNode);
  const exact = [];
  const nested = [];
  ids.forEach((id, i) => {
    const s = String(id);
    if (s === key) exact.push(i);
    else if (key.endsWith(":" + s)) nested.push(i);
  });
  return exact.length ? exact : nested;
}

/** Whether a run (websocket message or route summary) belongs to a node whose output_dir widget reads
 *  `widgetValue`: runs carry the output_dir typed on the node that started them, so another workflow's node
 *  with the same id (another tab, a loaded workflow) does not show it. Unknown on either side: accept. */
export function ownsRun(widgetValue, run) {
  if (!run || run.output_dir == null || widgetValue == null) return true;
  return String(widgetValue).trim() === String(run.output_dir).trim();
}

/** The run summary for a graph node id in GET /acestep_lora/training's {"runs": {...}} (same matching). */
export function findRun(runs, nodeId) {
  if (!runs || typeof runs !== "object") return null;
  const key = String(nodeId);
  if (runs[key]) return runs[key];
  const nested = Object.keys(runs).filter((k) => k.endsWith(":" + key));
  return nested.length === 1 ? runs[nested[0]] : null;
}

// ---------------------------------------------------------------------------------------------------------
// Previews: which set the player shows

/** Key of a preview set in the player's choice list. */
export const previewKey = (p) => (p.base ? "base" : `epoch_${p.epoch}`);

/** The sets to choose from, newest epoch first, the LoRA-off reference last: [{key, label, set}]. */
export function previewChoices(previews, labels = LABELS.en) {
  const sets = cleanPreviews(previews).filter((p) => p.audio.length);
  const epochs = sets.filter((p) => !p.base).sort((a, b) => b.step - a.step);
  return [...epochs, ...sets.filter((p) => p.base)].map((set) => ({
    key: previewKey(set), label: set.base ? labels.base : `${labels.epoch} ${set.epoch}`, set,
  }));
}

/** The set to show: the chosen one while it exists, else the newest. null when there is none. */
export function pickPreview(previews, chosen = null, labels = LABELS.en) {
  const choices = previewChoices(previews, labels);
  return choices.find((c) => c.key === chosen) ?? choices[0] ?? null;
}

/** The /view query of a clip (ComfyUI serves output/input/temp files there); `bust` keeps browsers from playing a
 *  cached clip of an earlier run with the same file name. */
export function viewPath(ref, bust = "") {
  const q = new URLSearchParams({ filename: ref.filename ?? "", subfolder: ref.subfolder ?? "", type: ref.type ?? "temp" });
  if (bust !== "" && bust != null) q.set("rand", String(bust));
  return `/view?${q.toString()}`;
}

// ---------------------------------------------------------------------------------------------------------
// Layout: everything the canvas draws, in CSS pixels

/** Polylines (raw loss, EMA, validation), preview marks and axis ticks for a width x height canvas.
 *  opts.validation: [[step, loss, epoch]]; opts.previews: preview sets (their epochs are marked on the x axis).
 *  empty: nothing to plot yet. */
export function layoutChart(points, width, height, opts = {}) {
  const pad = { left: 46, right: 8, top: 8, bottom: 18, ...(opts.pad || {}) };
  const plot = { left: pad.left, top: pad.top, right: width - pad.right, bottom: height - pad.bottom };
  plot.width = plot.right - plot.left;
  plot.height = plot.bottom - plot.top;
  const clean = cleanPoints(points);
  const held = cleanValidation(opts.validation);
  if ((clean.length === 0 && held.length === 0) || plot.width < 8 || plot.height < 8) {
    return { empty: true, plot, raw: [], smooth: [], validation: [], marks: [], yTicks: [], xTicks: [] };
  }
  const steps = clean.map((p) => p[0]);
  const losses = clean.map((p) => p[1]);
  const smoothed = ema(losses, opts.weight ?? EMA_WEIGHT);
  const [lo, hi] = valueRange([...losses, ...held.map((v) => v[1])]);
  const y = niceTicks(lo, hi, opts.yTicks ?? 4);
  const allSteps = [...steps, ...held.map((v) => v[0])];
  const x0 = Math.min(...allSteps);
  const xMax = Math.max(...allSteps);
  const x1 = xMax > x0 ? xMax : x0 + 1;
  const sx = (s) => plot.left + ((s - x0) / (x1 - x0)) * plot.width;
  const sy = (v) => plot.bottom - ((v - y.lo) / (y.hi - y.lo)) * plot.height;
  const budget = Math.max(4, Math.floor(plot.width * 2));
  const raw = downsampleIndices(losses, budget).map((i) => [sx(steps[i]), sy(losses[i])]);
  const smooth = strideIndices(smoothed.length, budget).map((i) => [sx(steps[i]), sy(smoothed[i])]);
  const validation = held.map((v) => [sx(v[0]), sy(v[1])]);
  const marks = cleanPreviews(opts.previews).filter((p) => !p.base && p.step >= x0 && p.step <= x1)
    .map((p) => ({ x: sx(p.step), epoch: p.epoch, step: p.step }));
  const yTicks = y.ticks.map((v) => ({ y: sy(v), value: v, label: formatTick(v, y.step) }));
  const xt = niceTicks(x0, x1, opts.xTicks ?? 4);
  const xTicks = xt.ticks.filter((v) => v >= x0 && v <= x1).map((v) => ({ x: sx(v), value: v, label: formatCount(v) }));
  const last = clean.length
    ? { step: steps[steps.length - 1], loss: losses[losses.length - 1], smoothed: smoothed[smoothed.length - 1] }
    : null;
  return { empty: false, plot, raw, smooth, validation, marks, yTicks, xTicks, yLo: y.lo, yHi: y.hi, x0, x1, last };
}
