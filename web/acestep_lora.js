// Live loss chart and preview player on the "ACE-Step LoRA Train" node (ComfyUI frontend extension, plain ES
// module, no build).
//
// nodes/train.py sends websocket messages "acestep_lora.training" {node, started, points: [[step, loss, lr], ...]
// (new since the last message), step, total_steps, epoch, total_epochs, loss, lr, elapsed, eta, validation:
// [[step, loss, epoch], ...], previews: [{epoch, step, base, captions, audio: [{filename, subfolder, type}]}]}.
// nodes/routes.py serves the whole history (GET /acestep_lora/training and /acestep_lora/training/<node id>),
// fetched when a Train node is created or loaded and when the websocket reconnects, so a reload mid-training
// redraws the curve and the player. The chart draws the training loss (raw, EMA), the held-out validation loss
// (green) and marks the epochs that have previews; under it, a player plays the chosen preview set's clips from
// ComfyUI's /view (the LoRA-off reference is one of the sets, for A/B). The node's result (ui.audio, and
// ui.acestep_lora_previews for a finished run reused without training) fills the player too. Without this file the
// node still shows the PIL loss image that train.py sends as its progress preview.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  applyHistory, applyMessage, cleanPreviews, findRun, historyPath, initialState, labelsFor, layoutChart, ownsRun,
  pickPreview, pickTargets, planFetch, previewChoices, statusText, viewPath,
} from "./chart_core.js";

const NODE_TYPE = "ACEStepLoRA_Train";
const EVENT = "acestep_lora.training";
const ROUTE = "/acestep_lora/training";
const MIN_HEIGHT = 220;
const PLAYER_ROW = 30; // px per clip in the preview player
const PLAYER_HEAD = 24;
const STATUS_REFRESH_MS = 2000;

const charts = new Set();

function locale() {
  try {
    return app.extensionManager?.setting?.get?.("Comfy.Locale")
      ?? app.ui?.settings?.getSettingValue?.("Comfy.Locale")
      ?? navigator.language;
  } catch {
    return navigator.language;
  }
}

/** Colors from the ComfyUI theme's CSS variables, with fallbacks readable on dark and light backgrounds. */
function themeColors(el) {
  const css = getComputedStyle(el);
  const v = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  return {
    text: v("--descrip-text", "#999"),
    fg: v("--fg-color", "#aaa"),
    grid: v("--border-color", "rgba(128,128,128,0.35)"),
    raw: "rgba(80,140,220,0.55)",
    smooth: "#f0a030",
    validation: "#40c070",
    mark: "rgba(190,120,230,0.9)",
  };
}

class LossChart {
  constructor(node) {
    this.node = node;
    this.state = initialState();
    this.labels = labelsFor(locale());
    this.frame = 0;

    this.element = document.createElement("div");
    this.element.className = "acestep-lora-chart";
    Object.assign(this.element.style, {
      display: "flex", flexDirection: "column", width: "100%", height: "100%", boxSizing: "border-box",
      padding: "2px 4px", gap: "2px", overflow: "hidden",
    });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { flex: "1 1 auto", width: "100%", minHeight: "0", display: "block" });
    this.text = document.createElement("div");
    Object.assign(this.text.style, {
      flex: "0 0 auto", fontSize: "11px", lineHeight: "1.3", color: "var(--descrip-text, #999)",
      fontFamily: "monospace", whiteSpace: "normal", overflowWrap: "anywhere", userSelect: "text",
    });
    this.player = document.createElement("div");
    this.player.className = "acestep-lora-previews";
    Object.assign(this.player.style, {
      flex: "0 0 auto", display: "none", flexDirection: "column", gap: "2px", fontSize: "11px",
      color: "var(--descrip-text, #999)",
    });
    this.chosen = null; // the preview set the user picked (null: follow the newest)
    this.shown = ""; // what the player shows now, to rebuild it only when that changes
    this.element.append(this.canvas, this.text, this.player);

    this.widget = node.addDOMWidget("loss_chart", "acestep_lora_chart", this.element, {
      serialize: false,
      getMinHeight: () => MIN_HEIGHT + this.playerHeight(),
      getValue: () => undefined,
      setValue: () => {},
    });
    try {
      // never part of widgets_values or the prompt (some frontends read widget.serialize, others the option)
      this.widget.serialize = false;
    } catch {
      /* a read-only serialize property: the option above already says it */
    }

    this.resizeObserver = typeof ResizeObserver === "function" ? new ResizeObserver(() => this.scheduleDraw()) : null;
    this.resizeObserver?.observe(this.canvas);
    this.render();
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.render();
  }

  render() {
    const line = statusText(this.state, this.labels);
    if (this.text.textContent !== line) {
      this.text.textContent = line;
      this.text.title = line;
    }
    this.renderPlayer();
    this.scheduleDraw();
  }

  playerHeight() {
    const pick = pickPreview(this.state.previews, this.chosen, this.labels);
    return pick ? PLAYER_HEAD + PLAYER_ROW * pick.set.audio.length : 0;
  }

  /** The preview player: a choice of set (newest epoch first, the LoRA-off reference last) and one audio element
   *  per clip. Rebuilt only when the set or the run changes, so a clip that is playing keeps playing. */
  renderPlayer() {
    const choices = previewChoices(this.state.previews, this.labels);
    const pick = pickPreview(this.state.previews, this.chosen, this.labels);
    const key = pick ? JSON.stringify([this.state.started, choices.map((c) => c.key), pick.key,
      pick.set.audio.map((a) => a.filename)]) : "";
    if (key === this.shown) return;
    const grow = !this.shown && pick;
    this.shown = key;
    this.player.replaceChildren();
    this.player.style.display = pick ? "flex" : "none";
    if (!pick) return;
    const head = document.createElement("div");
    Object.assign(head.style, { display: "flex", alignItems: "center", gap: "6px", height: `${PLAYER_HEAD - 4}px` });
    const title = document.createElement("span");
    title.textContent = this.labels.previews;
    const select = document.createElement("select");
    Object.assign(select.style, { fontSize: "11px", maxWidth: "60%" });
    for (const c of choices) {
      const option = document.createElement("option");
      option.value = c.key;
      option.textContent = c.label;
      if (c.key === pick.key) option.selected = true;
      select.append(option);
    }
    select.value = pick.key;
    select.addEventListener("change", () => {
      this.chosen = select.value;
      this.render();
    });
    head.append(title, select);
    this.player.append(head);
    const bust = this.state.started ?? "";
    pick.set.audio.forEach((ref, i) => {
      const row = document.createElement("div");
      Object.assign(row.style, { display: "flex", alignItems: "center", gap: "4px", height: `${PLAYER_ROW - 2}px` });
      const label = document.createElement("span");
      label.textContent = `${i + 1}`;
      label.title = pick.set.captions?.[i] ?? "";
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "metadata"; // shows each clip's length; the clip itself loads on play
      audio.src = api.apiURL(viewPath(ref, bust));
      audio.title = `${this.labels.clip} ${i + 1}: ${pick.set.captions?.[i] ?? ref.filename}`;
      Object.assign(audio.style, { flex: "1 1 auto", height: `${PLAYER_ROW - 4}px`, minWidth: "0" });
      row.append(label, audio);
      this.player.append(row);
    });
    if (grow) {
      // make room for the player the first time it appears (the node keeps any size the user gave it after that)
      try {
        const size = this.node.computeSize?.();
        if (size && this.node.size) {
          this.node.setSize?.([this.node.size[0], Math.max(this.node.size[1], size[1])]);
        }
        app.graph?.setDirtyCanvas?.(true, true);
      } catch {
        /* sizing is cosmetic */
      }
    }
  }

  scheduleDraw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  draw() {
    const rect = this.canvas.getBoundingClientRect();
    const width = Math.floor(rect.width);
    const height = Math.floor(rect.height);
    if (width < 2 || height < 2) return; // hidden, collapsed or not yet in the document
    const dpr = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(width * dpr) || this.canvas.height !== Math.round(height * dpr)) {
      this.canvas.width = Math.round(width * dpr);
      this.canvas.height = Math.round(height * dpr);
    }
    const ctx = this.canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const colors = themeColors(this.element);
    const layout = layoutChart(this.state.points, width, height,
      { validation: this.state.validation, previews: this.state.previews });
    ctx.font = "10px sans-serif";
    ctx.lineJoin = "round";
    if (layout.empty) {
      ctx.fillStyle = colors.text;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(this.labels.waiting, width / 2, height / 2, width - 8);
      return;
    }
    const { plot } = layout;
    // grid and axis labels
    ctx.strokeStyle = colors.grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = colors.text;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of layout.yTicks) {
      const y = Math.round(t.y) + 0.5;
      ctx.beginPath();
      ctx.moveTo(plot.left, y);
      ctx.lineTo(plot.right, y);
      ctx.stroke();
      ctx.fillText(t.label, plot.left - 4, t.y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of layout.xTicks) ctx.fillText(t.label, t.x, plot.bottom + 3);
    ctx.strokeRect(plot.left + 0.5, plot.top + 0.5, plot.width - 1, plot.height - 1);
    // curves, clipped to the plot
    ctx.save();
    ctx.beginPath();
    ctx.rect(plot.left, plot.top, plot.width, plot.height);
    ctx.clip();
    this.stroke(ctx, layout.raw, colors.raw, 1);
    this.stroke(ctx, layout.smooth, colors.smooth, 2);
    this.stroke(ctx, layout.validation, colors.validation, 1.5);
    ctx.fillStyle = colors.validation;
    for (const [vx, vy] of layout.validation) ctx.fillRect(vx - 2, vy - 2, 4, 4);
    ctx.restore();
    // epochs with previews: small triangles on the time axis
    ctx.fillStyle = colors.mark;
    for (const m of layout.marks) {
      ctx.beginPath();
      ctx.moveTo(m.x, plot.bottom - 7);
      ctx.lineTo(m.x - 4, plot.bottom);
      ctx.lineTo(m.x + 4, plot.bottom);
      ctx.fill();
    }
    // legend
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    const entries = [[this.labels.raw, colors.raw, 1], [this.labels.ema, colors.smooth, 2]];
    if (layout.validation.length) entries.push([this.labels.validation, colors.validation, 2]);
    let x = plot.right - 60 * entries.length;
    for (const [label, color, w] of entries) {
      ctx.strokeStyle = color;
      ctx.lineWidth = w;
      ctx.beginPath();
      ctx.moveTo(x, plot.top + 8);
      ctx.lineTo(x + 12, plot.top + 8);
      ctx.stroke();
      ctx.fillStyle = colors.fg;
      ctx.fillText(label, x + 15, plot.top + 8);
      x += 60;
    }
  }

  stroke(ctx, line, color, width) {
    if (line.length === 0) return;
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    ctx.moveTo(line[0][0], line[0][1]);
    for (let i = 1; i < line.length; i++) ctx.lineTo(line[i][0], line[i][1]);
    if (line.length === 1) ctx.lineTo(line[0][0] + 1, line[0][1]);
    ctx.stroke();
  }

  dispose() {
    this.resizeObserver?.disconnect();
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    charts.delete(this);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Server history: one summary request, then the history of each chart whose node has a run.

let refreshTimer = 0;
let refreshing = false;
let lastRefresh = 0;

function scheduleRefresh(delay = 50) {
  if (refreshTimer || charts.size === 0) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = 0;
    refreshAll();
  }, delay);
}

async function getJson(path) {
  try {
    const res = await api.fetchApi(path, { cache: "no-store" });
    return res.ok ? await res.json() : null;
  } catch {
    return null; // server restarting, pack routes missing: the chart just waits for websocket data
  }
}

async function refreshAll() {
  if (refreshing) {
    scheduleRefresh(250);
    return;
  }
  refreshing = true;
  lastRefresh = Date.now();
  try {
    const summary = await getJson(ROUTE);
    const runs = summary?.runs;
    if (!runs) return;
    for (const chart of [...charts]) {
      const run = findRun(runs, chart.node.id);
      if (!ownsRun(outputDirOf(chart.node), run)) continue;
      const plan = planFetch(chart.state, run);
      if (!plan.fetch) continue;
      const data = await getJson(historyPath(ROUTE, run.node ?? chart.node.id, plan.since));
      if (data && charts.has(chart)) chart.setState(applyHistory(chart.state, data));
    }
  } finally {
    refreshing = false;
  }
}

/** The output_dir widget's value (undefined when the input is linked instead of typed). */
function outputDirOf(node) {
  return node?.widgets?.find?.((w) => w.name === "output_dir")?.value;
}

function onTraining(event) {
  const data = event?.detail;
  if (!data || data.node == null) return;
  const list = [...charts];
  for (const i of pickTargets(data.node, list.map((c) => c.node.id))) {
    if (ownsRun(outputDirOf(list[i].node), data)) list[i].setState(applyMessage(list[i].state, data));
  }
}

function attach(node) {
  if ((node?.comfyClass ?? node?.type) !== NODE_TYPE || node.acestepLoraChart) return;
  let chart;
  try {
    chart = new LossChart(node);
  } catch (err) {
    console.warn("[ACE-Step LoRA] live chart unavailable:", err);
    return;
  }
  node.acestepLoraChart = chart;
  charts.add(chart);
  // the node's result: its preview sets (a finished run reused without training sends no websocket message)
  const onExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    const sets = cleanPreviews(output?.acestep_lora_previews);
    if (sets.length && !chart.state.previews?.length) chart.setState({ ...chart.state, previews: sets });
    return onExecuted?.apply(this, arguments);
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    chart.dispose();
    delete node.acestepLoraChart;
    return onRemoved?.apply(this, arguments);
  };
  // make room for the chart on a freshly created node (a loaded node gets its saved size afterwards)
  try {
    const size = node.computeSize?.();
    if (size && node.size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  } catch {
    /* sizing is cosmetic */
  }
  scheduleRefresh(); // runs after the graph is configured, when node.id is final
}

let listening = false;

function listen() {
  if (listening) return;
  listening = true;
  api.addEventListener(EVENT, onTraining);
  api.addEventListener("reconnected", () => scheduleRefresh());
  api.addEventListener("status", () => {
    if (Date.now() - lastRefresh > STATUS_REFRESH_MS) scheduleRefresh();
  });
  // end of a run (finished, cancelled or failed): the server's record says which
  for (const type of ["executed", "execution_interrupted", "execution_error"]) {
    api.addEventListener(type, (e) => {
      const id = e?.detail?.node ?? e?.detail?.node_id;
      if (id == null) return;
      if (pickTargets(id, [...charts].map((c) => c.node.id)).length) scheduleRefresh(200);
    });
  }
}

app.registerExtension({
  name: "acestep_lora.TrainingChart",
  init() {
    listen(); // before the last workflow is restored, so no message is missed
  },
  setup() {
    listen();
  },
  nodeCreated(node) {
    attach(node);
  },
  loadedGraphNode(node) {
    attach(node); // no-op when nodeCreated already attached; either way re-read the history
    if (node?.acestepLoraChart) scheduleRefresh();
  },
});
