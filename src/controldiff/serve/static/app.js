// controldiff's web page: a form for the native API (/controldiff/v1). The controls' forms are
// built from the request's JSON Schema, so a new control appears here without page code.
"use strict";

const API = "controldiff/v1";  // relative: the page also works with the app mounted under a prefix
const local = (url) => String(url).replace(/^\/(?=controldiff\/)/, "");  // the API's own URLs, likewise
const $ = (id) => document.getElementById(id);
const lists = { models: [], loras: [], embeddings: [], controlnets: [], samplers: [] };
let ROOT = {};                 // the request schema (for $ref)
let controlTypes = {};         // control name -> its (resolved) schema
let job = null;                // the job being watched: {id}
let lastJob = null;            // the id of the last job this page made

// the fields the page lays out itself; every other request property goes to "More settings"
const OWN_FIELDS = ["prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale",
  "scheduler", "seed", "model", "image", "mask_image", "strength", "controls", "loras", "embeddings"];

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

async function api(path, options = {}) {
  const opts = { ...options };
  if (opts.json !== undefined) {
    opts.method = opts.method || "POST";
    opts.headers = { "Content-Type": "application/json" };
    opts.body = JSON.stringify(opts.json);
    delete opts.json;
  }
  const res = await fetch(`${API}/${path}`, opts);
  const body = await res.json().catch(() => null);
  if (!res.ok) throw Object.assign(new Error(`HTTP ${res.status}`), { status: res.status, body });
  return body;
}

// ---- JSON Schema --------------------------------------------------------------------------

function deref(s) {
  for (let i = 0; s && s.$ref && i < 32; i++) {
    let target = ROOT;
    for (const part of s.$ref.replace(/^#\/?/, "").split("/").filter(Boolean))
      target = target ? target[part.replace(/~1/g, "/").replace(/~0/g, "~")] : undefined;
    const { $ref, ...rest } = s;
    s = { ...(target || {}), ...rest };
  }
  if (s && s.allOf) {
    let merged = { ...s };
    delete merged.allOf;
    for (const part of s.allOf) merged = { ...deref(part), ...merged };
    s = merged;
  }
  return s || {};
}

const isNull = (s) => { s = deref(s); return s.type === "null" || s.const === null; };

// One concrete schema for a field: unions are reduced to the form a person fills in
// (a list of objects before an object, a string before a list of strings), nulls to "optional".
function choose(s) {
  s = deref(s);
  let nullable = false;
  const alts = s.anyOf || s.oneOf;
  if (alts && !s.type && !s.properties) {
    const opts = alts.map(deref).filter((a) => !isNull(a));
    nullable = opts.length < alts.length;
    const pick = opts.find((a) => a.type === "array" && choose(a.items || {}).schema.type === "object")
      || opts.find((a) => a.type === "object") || opts.find((a) => a.type === "string")
      || opts.find((a) => a.enum) || opts[0] || {};
    s = { ...pick, default: s.default !== undefined ? s.default : pick.default,
      title: s.title || pick.title, description: s.description || pick.description };
  }
  if (Array.isArray(s.type)) {
    nullable = nullable || s.type.includes("null");
    const types = s.type.filter((t) => t !== "null");
    s = { ...s, type: types.includes("string") && types.length > 1 ? "string" : types[0] };
  }
  return { schema: s, nullable };
}

// The control variants of the request's "controls" items: name -> schema.
function findControls(root) {
  const items = deref((deref(root).properties || {}).controls || {}).items || {};
  const it = deref(items);
  const variants = it.oneOf || it.anyOf || (it.properties ? [it] : []);
  const out = {};
  for (const v of variants) {
    const s = deref(v);
    const t = deref((s.properties || {}).type || {});
    const name = t.const !== undefined ? t.const : (t.enum && t.enum.length === 1 ? t.enum[0] : s.title);
    if (name) out[name] = s;
  }
  return out;
}

// ---- widgets: {el, get() -> value | undefined (left out), set(value)} ----------------------

const title = (key, s) => s.title && s.title.toLowerCase() !== String(key).toLowerCase() ? s.title : String(key).replace(/_/g, " ");

function wrap(key, s, input, required) {
  return el("label", { class: "field", "data-key": key, title: s.description || null },
    el("span", {}, title(key, s) + (required ? " *" : "")), input);
}

function isImage(key, s) {
  if (s.contentEncoding === "base64" || (s.contentMediaType || "").startsWith("image/")) return true;
  if (["binary", "byte", "data-url", "image"].includes(s.format)) return true;
  return (s.type === "string" || s.type === undefined) && /(^|_)(image|mask)$/.test(String(key));
}

function widget(key, raw, ctx = {}) {
  const { schema: s, nullable } = choose(raw);
  const required = !!ctx.required;
  if (isImage(key, s)) return imageWidget(key, s, required);
  const folder = s["x-controldiff-folder"];  // a name listed by GET /controldiff/v1/<folder>
  if (folder && lists[folder] && s.type === "string") return selectWidget(key, s, lists[folder], required);
  if (s.enum) return selectWidget(key, s, s.enum, required || !nullable && s.default === undefined);
  if (s.type === "boolean") return checkWidget(key, s);
  if (s.type === "integer" || s.type === "number") return numberWidget(key, s, required);
  if (s.type === "string") return textWidget(key, s, required);
  if (s.type === "array") {
    const item = choose(s.items || {}).schema;
    if (item.type === "object") return listWidget(key, s, ctx);
    if (isImage("", item)) return imageWidget(key, s, required, true);
    if (["string", "number", "integer"].includes(item.type) || (s.items && (s.items.anyOf || s.items.oneOf)))
      return csvWidget(key, s, item, required);
  }
  if (s.type === "object" && s.properties) return objectWidget(key, s, ctx);
  return jsonWidget(key, s, required);
}

function numberWidget(key, s, required) {
  const input = el("input", { type: "number", step: s.type === "integer" ? 1 : "any", min: s.minimum, max: s.maximum,
    placeholder: s.default === null || s.default === undefined ? "default" : null });
  const w = {
    el: wrap(key, s, input, required),
    get: () => input.value.trim() === "" ? undefined : Number(input.value),
    set: (v) => { input.value = v === null || v === undefined ? "" : v; },
  };
  w.set(s.default);
  return w;
}

function textWidget(key, s, required) {
  const long = /prompt/.test(key);
  const input = long ? el("textarea", { rows: 2 }) : el("input", { type: "text" });
  const w = {
    el: wrap(key, s, input, required),
    get: () => input.value === "" && !required ? undefined : input.value,
    set: (v) => { input.value = v === null || v === undefined ? "" : v; },
  };
  w.set(s.default);
  return w;
}

function checkWidget(key, s) {
  const input = el("input", { type: "checkbox" });
  const w = { el: wrap(key, s, input), get: () => input.checked, set: (v) => { input.checked = v === true || v === "True" || v === "true"; } };
  w.set(s.default);
  return w;
}

function selectWidget(key, s, options, required) {
  const select = el("select");
  if (!required) select.append(el("option", { value: "" }, "(default)"));
  for (const o of options) select.append(el("option", { value: String(o) }, String(o)));
  const w = {
    el: wrap(key, s, select, required),
    get: () => {
      if (select.value === "") return undefined;
      const hit = options.find((o) => String(o) === select.value);
      return hit !== undefined ? hit : select.value;
    },
    set: (v) => { setSelect(select, v); },
  };
  if (s.default !== undefined && s.default !== null) w.set(s.default);
  return w;
}

function csvWidget(key, s, item, required) {
  const numeric = item.type === "number" || item.type === "integer";
  const input = el("input", { type: "text", placeholder: numeric ? "comma-separated numbers" : "comma-separated" });
  const w = {
    el: wrap(key, s, input, required),
    get: () => {
      if (input.value.trim() === "") return undefined;
      return input.value.split(",").map((p) => p.trim()).filter((p) => p !== "")
        .map((p) => (numeric || /^-?\d+(\.\d+)?$/.test(p)) && !isNaN(Number(p)) ? Number(p) : p);
    },
    set: (v) => { input.value = Array.isArray(v) ? v.join(", ") : v === null || v === undefined ? "" : v; },
  };
  w.set(s.default);
  return w;
}

function jsonWidget(key, s, required) {
  const input = el("input", { type: "text", placeholder: "JSON" });
  const w = {
    el: wrap(key, s, input, required),
    get: () => {
      if (input.value.trim() === "") return undefined;
      try { return JSON.parse(input.value); } catch (e) { return input.value; }
    },
    set: (v) => { input.value = v === null || v === undefined ? "" : JSON.stringify(v); },
  };
  w.set(s.default);
  return w;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

// An upload sent as a data URL; ``many``: a list of images (FABRIC's liked/disliked).
function imageWidget(key, s, required, many = false) {
  const input = el("input", { type: "file", accept: "image/*", multiple: many });
  const thumbs = el("span", { class: "thumbs" });
  let data = [];
  input.addEventListener("change", async () => {
    data = await Promise.all([...input.files].map(readFile));
    thumbs.replaceChildren(...data.map((d) => el("img", { class: "thumb", src: d, alt: key })));
  });
  const label = wrap(key, s, input, required);
  label.append(thumbs);
  const get = () => data.length ? (many ? data : data[0]) : undefined;
  return { el: label, get, set: () => {} };  // images are not in the infotext
}

function objectWidget(key, s, ctx) {
  const box = el("fieldset", { class: "object", "data-key": key });
  if (ctx.legend !== false) box.append(el("legend", {}, title(key, s)));
  const fields = {};
  const required = s.required || [];
  for (const [name, prop] of Object.entries(s.properties || {})) {
    const p = deref(prop);
    if (name === "type" && (p.const !== undefined || (p.enum && p.enum.length === 1))) continue;
    fields[name] = widget(name, prop, { required: required.includes(name) });
    box.append(fields[name].el);
  }
  return {
    el: box, fields,
    get: () => {
      const out = {};
      for (const [name, f] of Object.entries(fields)) {
        const v = f.get();
        if (v !== undefined) out[name] = v;
      }
      return out;
    },
    set: (v) => { for (const [name, f] of Object.entries(fields)) if (v && v[name] !== undefined) f.set(v[name]); },
  };
}

function renumber(container) {
  [...container.children].forEach((c, i) => { c.dataset.key = i; });
}

// A list of objects (SEGA's concepts, Regions' regions): add/remove items; items with a "box"
// are also drawn, and can be drawn, on a canvas of the image's size.
function listWidget(key, s, ctx) {
  const itemSchema = choose(s.items || {}).schema;
  const items = el("div", { class: "items" });
  const entries = [];
  const box = el("fieldset", { class: "list", "data-key": key }, el("legend", {}, title(key, s)), items);
  const canvas = "box" in (itemSchema.properties || {}) ? boxCanvas(entries, () => add()) : null;
  function add(value) {
    const item = objectWidget("", itemSchema, { legend: false });
    const entry = { item, el: el("div", { class: "item" }, item.el) };
    entry.el.append(el("button", { type: "button", class: "remove", onclick: () => {
      entries.splice(entries.indexOf(entry), 1);
      entry.el.remove();
      renumber(items);
      if (canvas) canvas.draw();
    } }, "Remove"));
    item.el.removeAttribute("data-key");
    entries.push(entry);
    items.append(entry.el);
    renumber(items);
    if (value) item.set(value);
    entry.el.addEventListener("input", () => canvas && canvas.draw());
    if (canvas) canvas.draw();
    return entry;
  }
  box.append(el("button", { type: "button", class: "add", onclick: () => add() }, "Add " + singular(key)));
  if (canvas) box.append(canvas.el);
  add();
  return {
    el: box,
    get: () => entries.map((e) => e.item.get()),
    set: (v) => {
      for (const e of entries.splice(0)) e.el.remove();
      for (const x of Array.isArray(v) ? v : [v]) add(x);
      if (!entries.length) add();
    },
  };
}

const singular = (key) => String(key).replace(/ies$/, "y").replace(/s$/, "");
const formSize = () => [Number($("width").value) || 512, Number($("height").value) || 512];

function boxCanvas(entries, addEntry) {
  const canvas = el("canvas", { class: "boxes", title: "drag to draw a region's box" });
  const ctx2d = canvas.getContext("2d");
  let drag = null;
  const scale = () => { const [w, h] = formSize(); return Math.min(256 / w, 256 / h); };
  const toImage = (ev) => {
    const r = canvas.getBoundingClientRect(), [w, h] = formSize(), k = scale();
    return [Math.max(0, Math.min(w, (ev.clientX - r.left) / k)), Math.max(0, Math.min(h, (ev.clientY - r.top) / k))];
  };
  function draw() {
    const [w, h] = formSize(), k = scale();
    canvas.width = Math.round(w * k);
    canvas.height = Math.round(h * k);
    ctx2d.fillStyle = "#eef";
    ctx2d.fillRect(0, 0, canvas.width, canvas.height);
    ctx2d.font = "12px sans-serif";
    const boxes = entries.map((e) => e.item.fields.box.get());
    if (drag && drag.end) boxes.push(drag.box());
    boxes.forEach((b, i) => {
      if (!Array.isArray(b) || b.length !== 4) return;
      ctx2d.strokeStyle = ctx2d.fillStyle = `hsl(${(i * 77) % 360} 70% 40%)`;
      ctx2d.lineWidth = 2;
      ctx2d.strokeRect(b[0] * k, b[1] * k, (b[2] - b[0]) * k, (b[3] - b[1]) * k);
      ctx2d.fillText(String(i), b[0] * k + 3, b[1] * k + 13);
    });
  }
  canvas.addEventListener("mousedown", (ev) => {
    const start = toImage(ev);
    drag = { start, end: null, box() {
      const [a, b] = [this.start, this.end];
      return [Math.round(Math.min(a[0], b[0])), Math.round(Math.min(a[1], b[1])),
        Math.round(Math.max(a[0], b[0])), Math.round(Math.max(a[1], b[1]))];
    } };
  });
  canvas.addEventListener("mousemove", (ev) => { if (drag) { drag.end = toImage(ev); draw(); } });
  window.addEventListener("mouseup", (ev) => {
    if (!drag) return;
    drag.end = toImage(ev);
    const b = drag.box();
    drag = null;
    if (b[2] > b[0] && b[3] > b[1]) {
      const free = entries.find((e) => e.item.fields.box.get() === undefined) || addEntry();
      free.item.fields.box.set(b);
    }
    draw();
  });
  for (const id of ["width", "height"]) $(id).addEventListener("input", draw);
  return { el: canvas, draw };
}

// ---- the control stack ---------------------------------------------------------------------

const stack = [];  // [{type, form, el}]

function addControl(type, values) {
  const schema = controlTypes[type];
  const form = objectWidget("", schema, { legend: false });
  form.el.removeAttribute("data-key");
  const card = el("div", { class: "control", "data-type": type },
    el("div", { class: "control-head" }, el("strong", {}, type),
      schema.description ? el("small", {}, " " + schema.description.split("\n")[0]) : null,
      el("button", { type: "button", class: "remove", onclick: () => {
        stack.splice(stack.findIndex((c) => c.el === card), 1);
        card.remove();
        renumber($("controls"));
      } }, "Remove")),
    form.el);
  stack.push({ type, form, el: card });
  $("controls").append(card);
  renumber($("controls"));
  if (values) form.set(values);
  return form;
}

// ---- the init image and its inpaint mask ---------------------------------------------------

const init = { data: null, image: null, painted: false };

function setupPainting() {
  const base = $("init-canvas"), mask = $("mask-canvas"), mctx = mask.getContext("2d");
  let last = null;  // the stroke's previous point while the button is down
  const paint = (ev) => {
    const r = mask.getBoundingClientRect(), p = [ev.clientX - r.left, ev.clientY - r.top];
    Object.assign(mctx, { strokeStyle: "#fff", lineWidth: Number($("brush").value), lineCap: "round", lineJoin: "round" });
    mctx.beginPath();
    mctx.moveTo(...(last || p));
    mctx.lineTo(...p);
    mctx.stroke();
    last = p;
    init.painted = true;
  };
  mask.addEventListener("mousedown", (ev) => { last = null; paint(ev); });
  mask.addEventListener("mousemove", (ev) => { if (last) paint(ev); });
  window.addEventListener("mouseup", () => { last = null; });
  $("mask-clear").addEventListener("click", () => { mctx.clearRect(0, 0, mask.width, mask.height); init.painted = false; });
  $("init-remove").addEventListener("click", () => {
    Object.assign(init, { data: null, image: null, painted: false });
    $("init-file").value = "";
    document.querySelector(".paint").hidden = true;
  });
  $("init-file").addEventListener("change", async () => {
    const file = $("init-file").files[0];
    if (!file) return;
    init.data = await readFile(file);
    init.image = await new Promise((resolve, reject) => {
      const im = new Image();
      im.onload = () => resolve(im);
      im.onerror = reject;
      im.src = init.data;
    });
    const k = Math.min(4, 384 / init.image.naturalWidth, 384 / init.image.naturalHeight);
    for (const c of [base, mask]) {
      c.width = Math.round(init.image.naturalWidth * k);
      c.height = Math.round(init.image.naturalHeight * k);
    }
    base.getContext("2d").drawImage(init.image, 0, 0, base.width, base.height);
    init.painted = false;
    document.querySelector(".paint").hidden = false;
  });
}

// The painted strokes at the image's own size: white = repaint, black = keep.
function maskData() {
  const mask = $("mask-canvas");
  const out = el("canvas");
  out.width = init.image.naturalWidth;
  out.height = init.image.naturalHeight;
  const c = out.getContext("2d");
  c.fillStyle = "#000";
  c.fillRect(0, 0, out.width, out.height);
  c.drawImage(mask, 0, 0, out.width, out.height);
  return out.toDataURL("image/png");
}

// ---- request <-> form ----------------------------------------------------------------------

const more = {};  // generated widgets for the other request properties

function numberOf(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function collect() {
  const req = { prompt: $("prompt").value };
  const put = (k, v) => { if (v !== undefined && v !== "") req[k] = v; };
  put("negative_prompt", $("negative_prompt").value);
  for (const k of ["width", "height", "num_inference_steps", "guidance_scale", "seed", "strength"]) put(k, numberOf(k));
  if (req.seed === -1) delete req.seed;
  put("scheduler", $("scheduler").value);
  put("model", $("model").value);
  for (const [k, w] of Object.entries(more)) put(k, w.get());
  if (init.data) {
    req.image = init.data;
    if (init.painted) req.mask_image = maskData();
  }
  if (stack.length) req.controls = stack.map((c) => ({ type: c.type, ...c.form.get() }));
  return req;
}

function setSelect(select, value) {
  if (value === undefined || value === null) return;
  const v = String(value);
  const hit = [...select.options].find((o) => o.value === v || o.value.toLowerCase() === v.toLowerCase()
    || o.value.replace(/\.\w+$/, "") === v);
  if (hit) select.value = hit.value;
  else { select.append(el("option", { value: v }, v)); select.value = v; }
}

// A1111's infotext parser (modules/infotext_utils.py), as controldiff.png.parse_parameters.
const PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

function parseParameters(text) {
  const lines = String(text).trim().split("\n");
  let last = lines.pop();
  if ([...last.matchAll(PARAM)].length < 3) { lines.push(last); last = ""; }
  const prompt = [], negative = [];
  let inNegative = false;
  for (let line of lines) {
    line = line.trim();
    if (line.startsWith("Negative prompt:")) { inNegative = true; line = line.slice(16).trim(); }
    (inNegative ? negative : prompt).push(line);
  }
  const res = { Prompt: prompt.join("\n"), "Negative prompt": negative.join("\n") };
  for (const [, key, raw] of last.matchAll(PARAM)) {
    let value = raw;
    if (!value) continue;
    if (value.length > 1 && value[0] === '"' && value[value.length - 1] === '"') {
      try { value = JSON.parse(value); } catch (e) { /* kept as written */ }
    }
    const m = /^(\d+)x(\d+)$/.exec(value);
    if (m) { res[`${key}-1`] = m[1]; res[`${key}-2`] = m[2]; }
    res[key] = value;
  }
  return res;
}

// The controls written in an infotext: "NAME N: {json}" and sd-webui-controlnet's "ControlNet N".
function infotextControls(p) {
  const found = [];
  for (const [key, value] of Object.entries(p)) {
    const m = /^(.+) (\d+)$/.exec(key);
    if (!m || !(m[1] in controlTypes)) continue;
    let settings = null;
    if (m[1] === "ControlNet" && !String(value).trim().startsWith("{")) {
      const unit = Object.fromEntries(String(value).split(",").map((f) => f.split(": ").map((x) => x.trim())));
      settings = { model: unit.Model, scale: numOrText(unit.Weight), start: numOrText(unit["Guidance Start"]),
        end: numOrText(unit["Guidance End"]), guess_mode: unit["Control Mode"] === "ControlNet is more important" };
    } else {
      try { settings = JSON.parse(value); } catch (e) { continue; }
    }
    found.push({ type: m[1], order: Number(m[2]), settings });
  }
  return found;
}

const numOrText = (v) => v === undefined || isNaN(Number(v)) ? v : Number(v);

function sendToForm(parameters) {
  const p = parseParameters(parameters);
  $("prompt").value = p.Prompt;
  $("negative_prompt").value = p["Negative prompt"];
  const fields = { num_inference_steps: "Steps", guidance_scale: "CFG scale", seed: "Seed", width: "Size-1",
    height: "Size-2", strength: "Denoising strength" };
  for (const [id, key] of Object.entries(fields)) if (p[key] !== undefined) $(id).value = p[key];
  if (p.Sampler) setSelect($("scheduler"), p.Sampler);
  if (p.Model) setSelect($("model"), p.Model);
  // A1111's "Clip skip: N" uses the N-th layer from the end: our clip_skip is N - 1 (1: none)
  if (more.clip_skip && p["Clip skip"] !== undefined) more.clip_skip.set(Number(p["Clip skip"]) - 1 || null);
  if (more.num_images && p["Batch size"] !== undefined) more.num_images.set(numOrText(p["Batch size"]));
  for (const c of stack.splice(0)) c.el.remove();
  for (const c of infotextControls(p)) addControl(c.type, c.settings);
  window.scrollTo(0, 0);
}

// ---- errors, jobs, gallery -----------------------------------------------------------------

function fieldPath(node) {
  const keys = [];
  for (let n = node; n && n.id !== "form"; n = n.parentElement) if (n.dataset && n.dataset.key !== undefined) keys.unshift(n.dataset.key);
  return keys.join(".");
}

function clearErrors() {
  document.querySelectorAll(".field-error").forEach((e) => e.remove());
  document.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
  $("errors").textContent = "";
}

// HTTP 422 {"detail": [{"loc": [...], "msg"}]}: each message next to the field it names
// (the nearest enclosing field when the named one has no input of its own).
function showErrors(err) {
  const detail = err.body && err.body.detail;
  if (!Array.isArray(detail)) {
    $("errors").textContent = typeof detail === "string" ? detail : err.message;
    return;
  }
  const byPath = new Map([...$("form").querySelectorAll("[data-key]")].map((n) => [fieldPath(n), n]));
  for (const d of detail) {
    let loc = (d.loc || []).map(String);
    if (loc[0] === "body") loc = loc.slice(1);
    let target = null;
    for (let n = loc.length; n > 0 && !target; n--) target = byPath.get(loc.slice(0, n).join("."));
    const msg = el("span", { class: "field-error" }, d.msg);
    if (target) {
      target.classList.add("invalid");
      target.append(msg);
    } else {
      msg.textContent = `${loc.join(".") || "request"}: ${d.msg}`;
      $("errors").append(msg);
    }
  }
  const first = document.querySelector(".invalid");
  if (first) {
    $("errors").prepend(`Refused: ${document.querySelectorAll(".invalid").length} marked field(s) to fix.\n`);
    first.scrollIntoView({ block: "center" });
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
}

async function generate() {
  clearErrors();
  let id;
  try {
    ({ id } = await api("jobs", { json: collect() }));
  } catch (err) {
    showErrors(err);
    return;
  }
  job = { id };
  lastJob = id;
  $("job-state").textContent = "queued";
  $("progress").value = 0;
  setRunning(true);
  poll();
}

async function poll() {
  if (!job) return;
  let j;
  try {
    j = await api(`jobs/${job.id}`);
  } catch (err) {
    $("errors").textContent = `job ${job.id}: ${err.message}`;
    setRunning(false);
    job = null;
    return;
  }
  const total = Math.max(1, j.total_steps || 1) * Math.max(1, j.num_images || 1);
  const done = (j.image_index || 0) * (j.total_steps || 0) + (j.step || 0);
  $("progress").value = j.state === "done" ? 1 : Math.min(1, done / total);
  $("job-state").textContent = j.state === "running" ? `running: image ${(j.image_index || 0) + 1}/${j.num_images || 1}, `
    + `step ${j.step || 0}/${j.total_steps || "?"}` : j.state;
  $("job-state").dataset.state = j.state;
  if (j.preview) {
    $("preview").src = j.preview.startsWith("data:") ? j.preview : `data:image/png;base64,${j.preview}`;
    $("preview").hidden = false;
  }
  if (["done", "cancelled", "failed"].includes(j.state)) {
    if (j.images && j.images.length) { $("preview").src = local(j.images[j.images.length - 1].url); $("preview").hidden = false; }
    if (j.error) $("errors").textContent = j.error;
    job = null;
    setRunning(false);
    refreshGallery();
    return;
  }
  setTimeout(poll, 250);
}

async function cancel() {
  if (!job) return;
  $("job-state").textContent = "cancelling…";
  try { await api(`jobs/${job.id}/cancel`, { method: "POST" }); } catch (err) { $("errors").textContent = err.message; }
}

async function refreshGallery() {
  let items;
  try { items = await api("outputs"); } catch (err) { $("errors").textContent = `gallery: ${err.message}`; return; }
  const gallery = $("gallery");
  gallery.replaceChildren(...items.map((it) => el("figure", { class: "card", "data-url": it.url },
    el("a", { href: local(it.url), target: "_blank" }, el("img", { src: local(it.url), alt: `seed ${it.seed}`, loading: "lazy" })),
    el("figcaption", {}, el("span", {}, `seed ${it.seed}`),
      el("button", { type: "button", class: "send", onclick: () => sendToForm(it.parameters || "") }, "Send to form")),
    el("details", {}, el("summary", {}, "settings"), el("pre", { class: "parameters" }, it.parameters || "")))));
}

// ---- start -----------------------------------------------------------------------------------

function insertAtCursor(textarea, text) {
  const start = textarea.selectionStart ?? textarea.value.length, end = textarea.selectionEnd ?? start;
  const before = textarea.value.slice(0, start), after = textarea.value.slice(end);
  const sep = before && !/\s$/.test(before) ? " " : "";
  textarea.value = before + sep + text + after;
  textarea.focus();
}

function fillOptions(select, names, empty) {
  select.replaceChildren(...(empty ? [el("option", { value: "" }, empty)] : []),
    ...names.map((n) => el("option", { value: String(n) }, String(n))));
}

async function start() {
  const names = Object.keys(lists);
  const [schema, ...values] = await Promise.all([api("schema"), ...names.map((n) => api(n).catch(() => []))]);
  names.forEach((n, i) => { lists[n] = Array.isArray(values[i]) ? values[i].map((v) => typeof v === "object" ? v.name : v) : []; });
  ROOT = schema;
  controlTypes = findControls(schema);
  fillOptions($("scheduler"), lists.samplers, "(model default)");
  fillOptions($("model"), lists.models, "(default model)");
  fillOptions($("lora-pick"), lists.loras);
  fillOptions($("embedding-pick"), lists.embeddings);
  fillOptions($("control-type"), Object.keys(controlTypes));
  const refused = deref((deref(schema).properties || {}).controls || {}).items || {};
  for (const [name, why] of Object.entries(deref(refused)["x-refused-controls"] || {}))
    $("control-type").append(el("option", { value: "", disabled: true, title: why }, `${name} (not over HTTP)`));
  const props = deref(schema).properties || {};
  for (const k of ["width", "height", "num_inference_steps", "guidance_scale", "strength"]) {
    const d = props[k] && choose(props[k]).schema.default;
    if (typeof d === "number") $(k).value = d;
  }
  for (const [k, s] of Object.entries(props)) {
    if (OWN_FIELDS.includes(k)) continue;
    more[k] = widget(k, s, { required: (schema.required || []).includes(k) });
    $("more-fields").append(more[k].el);
  }
  $("lora-insert").addEventListener("click", () => { if ($("lora-pick").value) insertAtCursor($("prompt"), `<lora:${$("lora-pick").value}:1>`); });
  $("embedding-insert").addEventListener("click", () => { if ($("embedding-pick").value) insertAtCursor($("prompt"), $("embedding-pick").value); });
  $("add-control").addEventListener("click", () => { if ($("control-type").value) addControl($("control-type").value); });
  $("generate").addEventListener("click", generate);
  $("cancel").addEventListener("click", cancel);
  setupPainting();
  await refreshGallery();
  $("load-state").textContent = "ready";
  document.body.dataset.ready = "1";
}

start().catch((err) => { $("load-state").textContent = `could not load: ${err.message}`; });
