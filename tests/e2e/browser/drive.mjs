// Drives the real ComfyUI page in headless Chromium (playwright-core) for tests/e2e/test_browser_chart.py. It
// asserts nothing itself: what it sees goes into a JSON report that the pytest module checks. Phases:
//   load      open the page on a server with no training run; extension registered, GET /acestep_lora/training
//   templates the templates dialog, EXTENSIONS > <pack folder name>, and GET /workflow_templates
//   workflow  app.loadGraphData(example workflow 1), the test's widget values, app.graphToPrompt()
//   run       app.queuePrompt(0); the Train node's chart state (node.acestepLoraChart), canvas pixels, status
//             line, PIL preview image; screenshot of the node
//   reload    page.reload() mid-run; the chart gets the history back from GET /acestep_lora/training/<node id>
//   help      click the node's title, the selection toolbox's "Node Info": the right side panel renders
//             web/docs/<node>.md
//   previews  still mid-run, once a preview set of an epoch and a few validation losses have come: the player
//             (its choices, the clips' /view URLs), one clip loaded by Chromium's <audio> (duration) and
//             fetched (status, type, bytes); screenshot of the node with the player and the validation series
//   finish    wait for the run to end (interrupt it after timeouts.finish s); final chart state
//   advanced  the classic canvas's view of the Prepare and Train widgets (options.advanced, shown or not); then
//             Nodes 2.0 (setting Comfy.VueNodes.Enabled): example workflow (1) again, the two nodes' rendered text
//             folded, a screenshot of both, the text after "Show advanced inputs"
// Console messages (with the caller's stack for console.error/warn), page errors, HTTP errors, the pack's requests
// and the POST /prompt body are recorded throughout.
//
//   PLAYWRIGHT_CORE_DIR=/path/to/node_modules [CHROMIUM=/usr/bin/chromium] node drive.mjs <config.json>
//
// config: {url, pack_dir_name, workflow (UI-format JSON), widgets: {<node type>: {<widget>: value}}, load_audio:
//          [file names for the LoadAudio nodes, in id order], help_doc (web/docs/<node>.md), min_points_shot,
//          report, screenshot, screenshot_reload, screenshot_end, screenshot_error, help_screenshot,
//          templates_screenshot, advanced_screenshot, advanced_open_screenshot, previews_screenshot,
//          min_validation, timeouts: {ready, points, shot_points, reload, previews, finish} (seconds)}
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf-8"));
const require = createRequire(import.meta.url);
const { chromium } = require(require.resolve("playwright-core", { paths: [process.env.PLAYWRIGHT_CORE_DIR || "."] }));

const TRAIN = "ACEStepLoRA_Train";
const PREPARE = "ACEStepLoRA_PrepareTrainingData";
const PACK = cfg.pack_dir_name || "acestep-lora";
const T = { ready: 120, points: 600, shot_points: 240, reload: 60, previews: 600, finish: 900,
  ...(cfg.timeouts || {}) };
const started = Date.now();
const log = (...a) => console.error(`[drive ${((Date.now() - started) / 1000).toFixed(1)}s]`, ...a);

const report = {
  phases: {}, console: [], http_errors: [], page_errors: [], requests: [], checks: {}, samples: [], notes: [],
};
let phase = "start";
const setPhase = async (name) => {
  await collectStacks();
  phase = name;
  report.phases[name] = (Date.now() - started) / 1000;
  log("phase", name);
};
const save = () => writeFileSync(cfg.report, JSON.stringify(report, null, 1));

const userDataDir = mkdtempSync(join(tmpdir(), "acestep-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1600, height: 1300 }, // narrower windows collapse the selection toolbox
  deviceScaleFactor: 1,
});
report.browser_version = context.browser()?.version() ?? null;

const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(60_000);
// console.error / console.warn with the caller's stack, so a message can be traced to the file that logged it
await page.addInitScript(() => {
  window.__consoleStacks = [];
  for (const level of ["error", "warn"]) {
    const original = console[level];
    console[level] = function (...args) {
      try {
        const text = args.map((a) => (a instanceof Error ? `${a.message}\n${a.stack}` : String(a))).join(" ");
        const stack = String(new Error().stack).slice(0, 3000);
        window.__consoleStacks.push({ level, text: text.slice(0, 1000), stack });
      } catch { /* never break the page */ }
      return original.apply(this, args);
    };
  }
});
const stacks = [];
async function collectStacks() {
  const got = await page.evaluate(() => (window.__consoleStacks || []).splice(0)).catch(() => []);
  for (const s of got) stacks.push({ phase, ...s });
  report.console_stacks = stacks;
}
page.on("console", (m) => {
  const loc = m.location() || {};
  report.console.push({ phase, type: m.type(), text: m.text().slice(0, 1000), url: loc.url || "" });
});
page.on("pageerror", (e) => report.page_errors.push({ phase, message: String(e.message).slice(0, 1000),
  stack: String(e.stack || "").slice(0, 2000) }));
page.on("response", (r) => {
  const url = r.url();
  if (r.status() >= 400) report.http_errors.push({ phase, status: r.status(), url });
  if (url.includes("/acestep_lora/") || url.includes(`/extensions/${PACK}/`)) {
    report.requests.push({ phase, status: r.status(), url, t: (Date.now() - started) / 1000 });
  }
});
page.on("request", (r) => {
  if (r.method() === "POST" && /\/prompt$/.test(new URL(r.url()).pathname)) {
    try {
      report.prompt_body = JSON.parse(r.postData() || "null");
    } catch {
      report.prompt_body = null;
    }
  }
});

async function waitReady() {
  await page.waitForFunction(() => window.app?.vueAppReady && window.app?.isGraphReady && window.app?.canvas
    && window.app?.extensionManager?.command, null, { timeout: T.ready * 1000 });
}

/** Polls fn(arg) in the page until it returns a truthy value; returns it (null on timeout). */
async function until(fn, arg, seconds, everyMs = 250) {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    const v = await page.evaluate(fn, arg).catch(() => null);
    if (v) return v;
    await page.waitForTimeout(everyMs);
  }
  return null;
}

/** Everything the test wants to know about the Train node's chart, read from the page (no hooks added). */
async function chartState() {
  return page.evaluate(({ TRAIN }) => {
    const g = window.app?.isGraphReady ? window.app.graph : null;
    const node = g?._nodes?.find((n) => (n.comfyClass ?? n.type) === TRAIN);
    if (!node) return { node: null };
    const chart = node.acestepLoraChart;
    const widget = node.widgets?.find((w) => w.name === "loss_chart");
    const out = {
      node: String(node.id), size: [...node.size], has_chart: Boolean(chart), widget: Boolean(widget),
      widget_type: widget?.type ?? null, widget_serialize: widget ? widget.serialize ?? null : null,
      widget_option_serialize: widget?.options?.serialize ?? null,
      widget_count: node.widgets?.length ?? 0, node_imgs: node.imgs?.length ?? 0,
      preview_images: (window.app.nodePreviewImages?.[String(node.id)] ?? []).length, // PIL progress previews
    };
    out.scale = window.app.canvas.ds.scale;
    out.computed_height = widget?.computedHeight ?? null;
    const preview = node.widgets?.find((w) => w.name === "$$canvas-image-preview");
    out.preview_widget = preview ? { computed_height: preview.computedHeight ?? null, y: preview.y } : null;
    out.widget_names = node.widgets?.map((w) => w.name) ?? [];
    if (!chart) return out;
    const el = chart.element;
    const r = el.getBoundingClientRect();
    const cr = chart.canvas.getBoundingClientRect();
    const sc = window.app.canvas.ds.scale || 1;
    out.element = { connected: el.isConnected, width: r.width, height: r.height, visible: r.width > 0 && r.height > 0,
      graph_height: r.height / sc, graph_width: r.width / sc,
      display: getComputedStyle(el).display };
    out.canvas = { css_w: cr.width, css_h: cr.height, w: chart.canvas.width, h: chart.canvas.height };
    out.points = chart.state.points.length;
    out.first_step = chart.state.points[0]?.[0] ?? null;
    out.last_step = chart.state.points.at(-1)?.[0] ?? null;
    out.started = chart.state.started;
    out.info = chart.state.info;
    out.status = chart.text.textContent;
    out.validation = chart.state.validation?.length ?? 0;
    out.preview_sets = (chart.state.previews ?? []).map((p) => ({ epoch: p.epoch, base: p.base, step: p.step,
      clips: p.audio?.length ?? 0 }));
    const select = chart.player?.querySelector("select");
    out.player = chart.player ? {
      display: getComputedStyle(chart.player).display, height: chart.player.getBoundingClientRect().height / sc,
      choices: select ? [...select.options].map((o) => [o.value, o.textContent]) : [],
      chosen: select?.value ?? null, audio: [...chart.player.querySelectorAll("audio")].map((a) => a.src),
    } : null;
    // pixels actually drawn: the EMA curve is #f0a030, the raw loss rgba(80,140,220,0.55), validation #40c070
    try {
      const ctx = chart.canvas.getContext("2d");
      const { data } = ctx.getImageData(0, 0, chart.canvas.width, chart.canvas.height);
      let orange = 0;
      let blue = 0;
      let green = 0;
      let ink = 0;
      for (let i = 0; i < data.length; i += 4) {
        const [R, G, B, A] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
        if (A === 0) continue;
        ink++;
        if (R > 200 && G > 120 && G < 190 && B < 90) orange++;
        else if (B > R + 60 && B > G) blue++;
        else if (G > 150 && R < 110 && B < 150 && G > B + 50) green++;
      }
      out.pixels = { ink, orange, blue, green };
    } catch (e) {
      out.pixels = { error: String(e) };
    }
    return out;
  }, { TRAIN });
}

async function route(path) {
  return page.evaluate(async (p) => {
    const r = await window.app.api.fetchApi(p, { cache: "no-store" });
    return { status: r.status, body: r.ok ? await r.json() : await r.text() };
  }, path);
}

/** Moves and zooms the canvas so the whole Train node fills the viewport below the top bars; its screen box. */
async function frameNode() {
  const box = await page.evaluate(({ TRAIN }) => {
    const app = window.app;
    const node = app.graph._nodes.find((n) => (n.comfyClass ?? n.type) === TRAIN);
    const ds = app.canvas.ds;
    const el = app.canvas.canvas.getBoundingClientRect();
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const top = 110; // below the workflow tabs, the breadcrumb and the Run bar
    const [w, h] = [node.size[0], node.size[1] + title];
    const scale = Math.min(1.25, (el.height - top - 30) / h, (el.width - 40) / w);
    ds.scale = scale;
    ds.offset[0] = (el.width / scale - w) / 2 - node.pos[0];
    ds.offset[1] = top / scale - (node.pos[1] - title);
    app.canvas.setDirty(true, true);
    // 8 px around the node, 28 px above it for the node's badge (the pack name)
    const x = el.left + (node.pos[0] + ds.offset[0]) * scale;
    const y = el.top + (node.pos[1] - title + ds.offset[1]) * scale;
    return { x: x - 8, y: y - 28, width: w * scale + 16, height: h * scale + 36, scale };
  }, { TRAIN });
  await page.waitForTimeout(800); // DOM widgets follow the canvas transform on the next frames
  return box;
}

/** Screenshot of the Train node, framed by frameNode(). */
async function shootNode(path) {
  const box = await frameNode();
  const vp = page.viewportSize();
  const clip = { x: Math.max(0, box.x), y: Math.max(0, box.y) };
  clip.width = Math.min(vp.width - clip.x, box.width);
  clip.height = Math.min(vp.height - clip.y, box.height);
  await page.screenshot({ path, clip });
  return { path, clip, scale: box.scale };
}

/** The Prepare and Train widgets as the classic canvas has them: advanced flag and whether it is drawn. */
async function classicWidgets() {
  return page.evaluate((kinds) => Object.fromEntries(window.app.graph._nodes
    .filter((n) => kinds.includes(n.comfyClass ?? n.type))
    .map((n) => [n.comfyClass ?? n.type, n.widgets.map((w) => ({ name: w.name, advanced: w.options?.advanced ?? false,
      visible: n.isWidgetVisible ? n.isWidgetVisible(w) : true }))])), [PREPARE, TRAIN]);
}

/** Nodes 2.0: the rendered lines of the Prepare and Train node elements (widget labels, values, buttons). */
async function vueNodeText() {
  return page.evaluate((kinds) => Object.fromEntries(window.app.graph._nodes
    .filter((n) => kinds.includes(n.comfyClass ?? n.type))
    .map((n) => {
      const el = document.querySelector(`[data-node-id="${n.id}"]`);
      return [n.comfyClass ?? n.type, el ? el.innerText.split("\n").map((l) => l.trim()).filter(Boolean) : null];
    })), [PREPARE, TRAIN]);
}

/** Nodes 2.0: zooms so that the Prepare and Train nodes fill the viewport; screenshot of the two. */
async function shootPair(path) {
  await page.evaluate((kinds) => {
    const app = window.app;
    const nodes = app.graph._nodes.filter((n) => kinds.includes(n.comfyClass ?? n.type));
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const x0 = Math.min(...nodes.map((n) => n.pos[0]));
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
    const y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const el = app.canvas.canvas.getBoundingClientRect();
    const top = 110;
    const ds = app.canvas.ds;
    // room around the two: Nodes 2.0 draws a node a little larger than its graph size, plus the footer button
    const scale = Math.min(1.1, 0.85 * (el.height - top) / (y1 - y0), 0.85 * el.width / (x1 - x0));
    ds.scale = scale;
    ds.offset[0] = (el.width / scale - (x1 - x0)) / 2 - x0;
    ds.offset[1] = top / scale - y0;
    app.canvas.setDirty(true, true);
  }, [PREPARE, TRAIN]);
  await page.waitForTimeout(1500); // the node elements follow the canvas transform
  const rects = await page.evaluate((kinds) => {
    const nodes = window.app.graph._nodes.filter((n) => kinds.includes(n.comfyClass ?? n.type))
      .map((n) => document.querySelector(`[data-node-id="${n.id}"]`)).filter(Boolean);
    const footers = [...document.querySelectorAll("button")].filter((b) => /advanced inputs/i.test(b.innerText)
      && nodes.some((el) => el.contains(b) || el.parentElement?.contains(b)));
    return { nodes: nodes.length, all: [...nodes, ...footers].map((e) => e.getBoundingClientRect().toJSON()) };
  }, [PREPARE, TRAIN]);
  if (rects.nodes !== 2) return null;
  const vp = page.viewportSize();
  const all = rects.all;
  const x = Math.max(0, Math.min(...all.map((r) => r.left)) - 12);
  const y = Math.max(0, Math.min(...all.map((r) => r.top)) - 12);
  const clip = { x, y, width: Math.min(vp.width, Math.max(...all.map((r) => r.right)) + 12) - x,
    height: Math.min(vp.height, Math.max(...all.map((r) => r.bottom)) + 12) - y };
  await page.screenshot({ path, clip });
  return { path, clip };
}

let exitCode = 0;
try {
  // ---- 1. the page on a server with no runs: console clean, no 404 from the pack ----------------------
  await setPhase("load");
  await page.goto(cfg.url, { waitUntil: "load", timeout: T.ready * 1000 });
  await waitReady();
  await page.waitForTimeout(4000); // let the startup requests settle
  report.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  report.checks.extension_registered = await page.evaluate(
    () => window.app.extensions.some((e) => e.name === "acestep_lora.TrainingChart"));
  report.checks.route_idle = await route("/acestep_lora/training");

  // ---- 2. templates dialog lists the pack's workflows under its folder name ----------------------------
  await setPhase("templates");
  try {
    report.checks.workflow_templates_api = (await route("/workflow_templates")).body;
    // a first visit opens the templates dialog by itself; otherwise open it with its command
    const dialog = page.locator('[role="dialog"]').filter({ hasText: "Templates" });
    for (let i = 0; i < 4 && !(await dialog.count()); i++) {
      await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
      await page.waitForTimeout(2000);
    }
    await dialog.last().getByText(PACK, { exact: true }).first().click({ timeout: 20_000 });
    await page.waitForTimeout(1500);
    report.checks.templates_dialog_text = (await dialog.last().innerText()).slice(0, 4000);
    if (cfg.templates_screenshot) await page.screenshot({ path: cfg.templates_screenshot });
    for (let i = 0; i < 3 && (await dialog.count()); i++) {
      await page.keyboard.press("Escape");
      await page.waitForTimeout(700);
    }
  } catch (e) {
    report.notes.push(`templates dialog: ${e}`);
    if (cfg.screenshot_error) await page.screenshot({ path: cfg.screenshot_error.replace(/\.png$/, "_templates.png") });
  }

  // ---- 3. example workflow (1) with the test's settings -----------------------------------------------
  await setPhase("workflow");
  const workflow = JSON.parse(readFileSync(cfg.workflow, "utf-8"));
  report.checks.loaded = await page.evaluate(async ({ workflow, widgets, loadAudio, TRAIN }) => {
    const app = window.app;
    await app.loadGraphData(workflow);
    const nodes = [...app.graph._nodes].sort((a, b) => a.id - b.id);
    const missing = [];
    for (const node of nodes) {
      const kind = node.comfyClass ?? node.type;
      const values = { ...(widgets[kind] || {}) };
      if (kind === "LoadAudio") values.audio = loadAudio[nodes.filter((n) => n.type === "LoadAudio").indexOf(node)];
      for (const [name, value] of Object.entries(values)) {
        const w = node.widgets?.find((x) => x.name === name);
        if (!w) {
          missing.push(`${kind}.${name}`);
          continue;
        }
        w.value = value;
        try { w.callback?.(value, app.canvas, node); } catch { /* some callbacks need pointer events */ }
      }
    }
    app.graph.setDirtyCanvas(true, true);
    const train = nodes.find((n) => (n.comfyClass ?? n.type) === TRAIN);
    const { output, workflow: saved } = await app.graphToPrompt();
    const savedTrain = saved.nodes.find((n) => n.id === train.id);
    return {
      missing, train_id: String(train.id), node_count: nodes.length,
      train_widgets: train.widgets.map((w) => w.name),
      api_train_inputs: Object.keys(output[String(train.id)]?.inputs ?? {}),
      ui_train_widgets_values: savedTrain.widgets_values,
      train_values: Object.fromEntries(train.widgets.filter((w) => w.name !== "loss_chart")
        .map((w) => [w.name, w.value])),
    };
  }, { workflow, widgets: cfg.widgets, loadAudio: cfg.load_audio, TRAIN });
  await frameNode();
  await page.waitForTimeout(1500); // the chart asks the route for runs (none yet)
  report.checks.before_run = await chartState();
  save();

  // ---- 4. queue it and watch the chart ------------------------------------------------------------------
  await setPhase("run");
  // an earlier run of the same node id (the route keeps it) must not count: wait for this run's points
  const trainId = report.checks.loaded.train_id;
  const earlier = (await route("/acestep_lora/training")).body?.runs?.[trainId]?.started ?? null;
  await page.evaluate(() => window.app.queuePrompt(0));
  const firstPoints = await until(async ({ TRAIN, id, earlier }) => {
    const r = await window.app.api.fetchApi("/acestep_lora/training", { cache: "no-store" });
    const run = (await r.json()).runs?.[id];
    if (!run || run.started === earlier || run.done) return false;
    const n = window.app.graph._nodes.find((x) => (x.comfyClass ?? x.type) === TRAIN);
    const c = n?.acestepLoraChart;
    return Boolean(c && c.state.points.length > 0 && c.state.info.done === false && c.state.info.step <= run.step + 50);
  }, { TRAIN, id: trainId, earlier }, T.points, 200);
  report.checks.first_points_at = firstPoints ? (Date.now() - started) / 1000 : null;
  if (!firstPoints) throw new Error("the chart received no points");
  const samples = report.samples;
  const sample = async () => {
    const s = await chartState();
    samples.push({ t: (Date.now() - started) / 1000, points: s.points, last_step: s.last_step, status: s.status,
      pixels: s.pixels, preview_images: s.preview_images });
    return s;
  };
  await sample();
  // enough points for a visible curve and the first PIL preview image, then the mid-run screenshot
  const want = cfg.min_points_shot || 40;
  const deadline = Date.now() + T.shot_points * 1000;
  let mid = await sample();
  while ((mid.points < want || !mid.node_imgs) && !mid.info?.done && Date.now() < deadline) {
    await page.waitForTimeout(1000);
    mid = await sample();
  }
  await frameNode(); // the node grew when the preview image arrived
  mid = await sample();
  report.checks.mid = mid;
  report.checks.mid_route = await route("/acestep_lora/training");
  report.checks.shot = await shootNode(cfg.screenshot);
  report.checks.mid_after_shot = await sample();
  save();

  // ---- 5. reload mid-training: the chart redraws the history from the route -----------------------------
  await setPhase("reload");
  const before = await chartState();
  const summaryBefore = (await route("/acestep_lora/training")).body;
  report.checks.before_reload = { points: before.points, last_step: before.last_step, summary: summaryBefore };
  const t0 = Date.now();
  await page.reload({ waitUntil: "load", timeout: T.ready * 1000 });
  await waitReady();
  const restored = await until(({ TRAIN, n }) => {
    const node = window.app.graph._nodes.find((x) => (x.comfyClass ?? x.type) === TRAIN);
    const c = node?.acestepLoraChart;
    return c && c.state.points.length >= n ? { points: c.state.points.length } : null;
  }, { TRAIN, n: before.points }, T.reload, 100);
  report.checks.reload = {
    seconds_to_points: restored ? (Date.now() - t0) / 1000 : null,
    after: await chartState(),
    summary_after: (await route("/acestep_lora/training")).body,
  };
  await frameNode();
  report.checks.reload.framed = await sample(); // drawn again (pixels)
  await page.waitForTimeout(3000);
  report.checks.reload.later = await sample(); // the websocket keeps adding points after the reload
  if (cfg.screenshot_reload) report.checks.shot_reload = await shootNode(cfg.screenshot_reload);
  save();

  // ---- 6. node help panel: select the Train node, selection toolbox "Node Info" -> right side panel, Info tab
  await setPhase("help");
  try {
    const box = await frameNode();
    await page.mouse.click(box.x + 8 + 80 * box.scale, box.y + 28 + 15 * box.scale); // select it: click its title
    const button = page.locator('[data-testid="info-button"]').first(); // the selection toolbox's "Node Info"
    try {
      await button.waitFor({ timeout: 10_000 });
      await button.click({ timeout: 5000 });
      report.checks.help_opened_by = "selection toolbox Node Info button";
    } catch {
      await page.locator('button[aria-label="Toggle properties panel"]').click({ timeout: 5000 });
      await page.getByRole("tab", { name: "Info", exact: true }).first().click({ timeout: 10_000 });
      report.checks.help_opened_by = "properties panel, Info tab";
    }
    const doc = readFileSync(cfg.help_doc, "utf-8");
    const title = doc.match(/^#\s+(.+)$/m)?.[1]?.trim();
    const first = doc.split("\n").find((l) => l && !l.startsWith("#")) ?? "";
    const sentence = first.replace(/\*\*/g, "").split(/\s+/).slice(0, 4).join(" "); // "Trains a LoRA adapter"
    const text = page.getByText(sentence, { exact: false }).first();
    await text.waitFor({ timeout: 20_000 });
    const panel = text.locator("xpath=ancestor::*[.//h1 or .//h2][1]");
    report.checks.help = { opened_by: report.checks.help_opened_by, doc_title: title, doc_sentence: sentence,
      panel_text: (await panel.innerText().catch(() => text.innerText())).slice(0, 3000) };
    if (cfg.help_screenshot) await page.screenshot({ path: cfg.help_screenshot });
  } catch (e) {
    report.notes.push(`help panel: ${e}`);
    if (cfg.screenshot_error) await page.screenshot({ path: cfg.screenshot_error.replace(/\.png$/, "_help.png") });
  }
  await page.evaluate(() => {
    const pinia = document.querySelector("#vue-app")?.__vue_app__?.config.globalProperties.$pinia;
    pinia?._s.get("rightSidePanel")?.closePanel?.();
    window.app.canvas.deselectAll?.();
  }).catch(() => {});
  save();

  // ---- 6b. previews mid-run: the player and the validation series ---------------------------------------------
  await setPhase("previews");
  try {
    const ready = await until(({ TRAIN, n }) => {
      const node = window.app.graph._nodes.find((x) => (x.comfyClass ?? x.type) === TRAIN);
      const c = node?.acestepLoraChart;
      const epochs = (c?.state.previews ?? []).filter((p) => !p.base && p.audio?.length);
      return c && epochs.length && (c.state.validation?.length ?? 0) >= n ? { sets: epochs.length } : null;
    }, { TRAIN, n: cfg.min_validation || 3 }, T.previews, 500);
    if (!ready) throw new Error("no preview set of an epoch (and enough validation losses) came");
    await frameNode(); // the node grew when the player appeared
    const state = await chartState();
    // Chromium loads the first clip as the player would (its duration), and its bytes come from /view
    state.clip = await page.evaluate(async ({ TRAIN }) => {
      const node = window.app.graph._nodes.find((x) => (x.comfyClass ?? x.type) === TRAIN);
      const audio = node.acestepLoraChart.player.querySelector("audio");
      const probe = new Audio();
      const loaded = new Promise((resolve) => {
        probe.addEventListener("loadedmetadata", () => resolve({ duration: probe.duration }), { once: true });
        probe.addEventListener("error", () => resolve({ error: probe.error?.code ?? "error" }), { once: true });
        setTimeout(() => resolve({ error: "timeout" }), 20000);
      });
      probe.preload = "metadata";
      probe.src = audio.src;
      const meta = await loaded;
      const r = await fetch(audio.src, { cache: "no-store" });
      const bytes = (await r.arrayBuffer()).byteLength;
      return { src: audio.src, ...meta, status: r.status, type: r.headers.get("content-type"), bytes };
    }, { TRAIN });
    state.route = (await route(`/acestep_lora/training/${trainId}`)).body;
    state.route = { validation: state.route?.validation?.length ?? 0, previews: state.route?.previews?.length ?? 0,
      done: state.route?.done };
    report.checks.previews = state;
    if (cfg.previews_screenshot) report.checks.previews.shot = await shootNode(cfg.previews_screenshot);
  } catch (e) {
    report.notes.push(`previews: ${e}`);
    if (cfg.screenshot_error) await page.screenshot({ path: cfg.screenshot_error.replace(/\.png$/, "_previews.png") });
  }
  save();

  // ---- 7. the end of the run ------------------------------------------------------------------------------
  await setPhase("finish");
  const ended = async (id) => {
    const r = await window.app.api.fetchApi("/acestep_lora/training", { cache: "no-store" });
    const runs = (await r.json()).runs;
    return runs?.[id]?.done ? runs : null;
  };
  const done = await until(ended, trainId, T.finish, 1000);
  report.checks.finished_route = done;
  if (!done) { // too slow: stop it (Cancel), so the server is idle again
    report.notes.push(`the run did not finish in ${T.finish} s; interrupted`);
    await page.evaluate(() => window.app.api.fetchApi("/interrupt", { method: "POST" }));
    report.checks.interrupted_route = await until(ended, trainId, 120, 1000);
  }
  await page.waitForTimeout(3000); // the "executed" event refreshes the chart from the route
  report.checks.end = await chartState();
  if (cfg.screenshot_end) report.checks.shot_end = await shootNode(cfg.screenshot_end);

  // ---- 8. advanced inputs: the classic canvas, then Nodes 2.0 folded and unfolded ---------------------------
  await setPhase("advanced");
  try {
    await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);
    await page.waitForTimeout(1500);
    const adv = { classic: await classicWidgets() };
    report.checks.advanced = adv;
    await page.evaluate(() => window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", true));
    await page.waitForTimeout(2000);
    await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);
    await page.waitForTimeout(3000);
    adv.folded = await vueNodeText();
    if (cfg.advanced_screenshot) adv.shot = await shootPair(cfg.advanced_screenshot);
    adv.folded_after_shot = await vueNodeText();
    for (const kind of [PREPARE, TRAIN]) {
      const id = await page.evaluate((k) => String(window.app.graph._nodes.find((n) => (n.comfyClass ?? n.type) === k).id),
        kind);
      await page.locator(`[data-node-id="${id}"]`).getByText("Show advanced inputs").click({ timeout: 10_000 });
      await page.waitForTimeout(800);
    }
    adv.unfolded = await vueNodeText();
    if (cfg.advanced_open_screenshot) adv.shot_open = await shootPair(cfg.advanced_open_screenshot);
  } catch (e) {
    report.notes.push(`advanced inputs: ${e}`);
    if (cfg.screenshot_error) await page.screenshot({ path: cfg.screenshot_error.replace(/\.png$/, "_advanced.png") });
  }
  await page.evaluate(() => window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", false)).catch(() => {});
  save();
  await setPhase("end");
} catch (e) {
  report.error = String(e && e.stack ? e.stack : e);
  log("error", report.error);
  try {
    report.checks.at_error = await chartState();
    if (cfg.screenshot_error) await page.screenshot({ path: cfg.screenshot_error });
  } catch { /* page gone */ }
  exitCode = 1;
} finally {
  await collectStacks();
  save();
  await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(exitCode);
