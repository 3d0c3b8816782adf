// The textgen playground: one prompt (or conversation) across several models and strategies,
// streamed side by side from POST /generate. No build step; talks to this server only.
"use strict";

const PARAMS = [
  "max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty",
  "no_repeat_ngram_size", "repetition_stop", "seed", "stop", "ignore_eos",
];
const CHAT_KEY = "textgen.conversation";
const KEY_KEY = "textgen.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  models: [], strategies: [], ranges: {}, presets: [],
  conversation: load(CHAT_KEY, []),
  running: [],
};

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}

function saveConversation() {
  localStorage.setItem(CHAT_KEY, JSON.stringify(state.conversation));
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// Model output is untrusted: HTML in it is shown as text, and what Markdown makes is sanitised.
window.addEventListener("DOMContentLoaded", () => {
  window.marked.use({ renderer: { html: (token) => escapeHtml(token.text ?? token.raw ?? "") } });
  init().catch(explain);
});

function render(element, text) {
  const html = window.marked.parse(text, { async: false });
  element.innerHTML = window.DOMPurify.sanitize(html, { USE_PROFILES: { html: true } });
}

function headers() {
  const out = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.json();
}

async function failure(response) {
  let error = { message: `${response.status} ${response.statusText}` };
  try { error = (await response.json()).error ?? error; } catch { /* not JSON */ }
  error.status = response.status;
  error.retryAfter = response.headers.get("Retry-After");
  return error;
}

function banner(message) {
  const box = $("banner");
  box.textContent = message;
  box.hidden = !message;
}

async function init() {
  $("api-key").value = sessionStorage.getItem(KEY_KEY) ?? "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_KEY, $("api-key").value.trim());
    loadListings().catch(explain);
  });
  document.querySelectorAll("input[name=mode]").forEach((radio) =>
    radio.addEventListener("change", showMode));
  $("generate").addEventListener("click", () => generate().catch(explain));
  $("stop").addEventListener("click", stopAll);
  $("copy-curl").addEventListener("click", () => copy(asCurl()));
  $("copy-python").addEventListener("click", () => copy(asPython()));
  $("export").addEventListener("click", exportConversation);
  $("import").addEventListener("change", importConversation);
  $("clear").addEventListener("click", () => { state.conversation = []; saveConversation(); drawConversation(); });
  $("preset").addEventListener("change", () => {
    const preset = state.presets.find((p) => p.name === $("preset").value);
    $("preset-help").textContent = preset ? `${preset.description} For ${preset.models}.` : "";
  });
  for (const id of ["prompt", "user-message"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate().catch(explain);
    });
  }
  drawConversation();
  showMode();
  await loadListings();
}

async function loadListings() {
  const [models, strategies, presets] = await Promise.all([
    getJson("/models"), getJson("/strategies"), getJson("/presets"),
  ]);
  banner("");
  state.models = models.models;
  state.strategies = strategies.strategies;
  state.presets = presets.presets;
  state.ranges = {};
  for (const strategy of state.strategies) {
    for (const [name, range] of Object.entries(strategy.parameters)) {
      if (!(name in state.ranges)) state.ranges[name] = range;
    }
  }
  checkboxes("models", state.models.map((m) => m.name), [models.default], "model");
  checkboxes("strategies", state.strategies.map((s) => s.name), ["greedy"], "strategy");
  drawParams();
  const select = $("preset");
  select.replaceChildren(new Option("none", ""), ...state.presets.map((p) => new Option(p.name, p.name)));
}

function checkboxes(id, names, checked, kind) {
  const box = $(id);
  box.querySelectorAll("label").forEach((label) => label.remove());
  for (const name of names) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = name;
    input.dataset.kind = kind;
    input.checked = checked.includes(name);
    label.append(input, ` ${name}`);
    box.append(label);
  }
}

function selected(kind) {
  return [...document.querySelectorAll(`input[data-kind=${kind}]:checked`)].map((i) => i.value);
}

function drawParams() {
  const box = $("params");
  box.querySelectorAll(".param").forEach((p) => p.remove());
  for (const name of PARAMS) {
    const range = state.ranges[name];
    if (!range) continue;
    const wrap = document.createElement("div");
    wrap.className = "param";
    const id = `param-${name}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = name;
    const controls = document.createElement("div");
    controls.className = "controls";
    const value = document.createElement("input");
    value.id = id;
    value.dataset.param = name;
    const help = document.createElement("p");
    help.className = "help";
    help.id = `help-${name}`;
    value.setAttribute("aria-describedby", help.id);
    const low = range.min ?? range.min_exclusive;
    const users = state.strategies.filter((s) => name in s.parameters).map((s) => s.name);
    help.textContent = [
      low !== undefined && range.max !== undefined ? `${fmt(low)} to ${fmt(range.max)}` : range.type,
      range.default !== undefined ? `default ${range.default}` : "",
      users.length < state.strategies.length ? `for ${users.join(", ")}` : "",
    ].filter(Boolean).join("; ");
    if (name === "stop") {
      value.type = "text";
      value.placeholder = "comma-separated";
      controls.append(value);
    } else if (range.type === "boolean") {
      value.type = "checkbox";
      controls.append(value);
    } else {
      value.type = "number";
      value.placeholder = range.default !== undefined ? String(range.default) : "unset";
      const integer = range.type === "integer";
      value.step = integer ? "1" : "0.01";
      const bounded = low !== undefined && range.max !== undefined && Math.abs(range.max) < 1e6;
      if (bounded) {
        value.min = String(range.min_exclusive !== undefined ? 0.01 : low);
        value.max = String(range.max);
        const slider = document.createElement("input");
        slider.type = "range";
        slider.min = value.min;
        slider.max = value.max;
        slider.step = value.step;
        slider.value = String(range.default ?? value.min);
        slider.setAttribute("aria-label", `${name} slider`);
        slider.addEventListener("input", () => { value.value = slider.value; });
        value.addEventListener("input", () => { if (value.value !== "") slider.value = value.value; });
        controls.append(slider);
      }
      controls.append(value);
    }
    const error = document.createElement("div");
    error.className = "error";
    error.id = `err-${name}`;
    error.setAttribute("role", "alert");
    wrap.append(label, controls, help, error);
    box.append(wrap);
  }
}

function fmt(number) {
  return Number.isInteger(number) ? String(number) : String(Number(number.toFixed(4)));
}

function showMode() {
  const chat = mode() === "chat";
  $("chat-box").hidden = !chat;
  $("completion-box").hidden = chat;
  $("preset-box").hidden = chat;
  $("work-title").textContent = chat ? "Conversation" : "Prompt";
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

// --- requests -----------------------------------------------------------------------------
function bodies() {
  const models = selected("model");
  const strategies = selected("strategy");
  if (!models.length || !strategies.length) throw { message: "choose at least one model and one strategy" };
  const seed = $("same-seed").checked ? Math.floor(Math.random() * 2 ** 31) : null;
  const shared = {};
  if (mode() === "chat") {
    const messages = [];
    if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
    messages.push(...state.conversation.map(({ role, content }) => ({ role, content })));
    if ($("user-message").value.trim()) messages.push({ role: "user", content: $("user-message").value });
    shared.messages = messages;
  } else {
    shared.prompt = $("prompt").value;
    if ($("preset").value) shared.preset = $("preset").value;
  }
  const postprocess = {};
  if ($("pp-strip").checked) postprocess.strip_prompt = true;
  if ($("pp-lines").checked) postprocess.drop_repeated_lines = true;
  if ($("pp-words").value) postprocess.max_words = Number($("pp-words").value);
  if (Object.keys(postprocess).length) shared.postprocess = postprocess;
  const out = [];
  for (const model of models) {
    for (const name of strategies) {
      const strategy = state.strategies.find((s) => s.name === name);
      const body = { model, strategy: name, ...shared };
      for (const input of document.querySelectorAll("[data-param]")) {
        const param = input.dataset.param;
        if (!(param in strategy.parameters)) continue;
        if (input.type === "checkbox") {
          if (input.checked) body[param] = true;
          continue;
        }
        if (input.value === "") continue;
        body[param] = param === "stop"
          ? input.value.split(",").map((s) => s.trim()).filter(Boolean)
          : Number(input.value);
      }
      if (seed !== null && "seed" in strategy.parameters && body.seed === undefined) body.seed = seed;
      out.push(body);
    }
  }
  return out;
}

async function generate() {
  stopAll();
  clearErrors();
  banner("");
  const all = bodies();
  if (mode() === "chat" && $("user-message").value.trim()) {
    state.conversation.push({ role: "user", content: $("user-message").value });
    $("user-message").value = "";
    saveConversation();
    drawConversation();
  }
  const outputs = $("outputs");
  outputs.replaceChildren();
  $("stop").disabled = false;
  const runs = all.map((body) => run(body, column(outputs, body)));
  const texts = await Promise.all(runs);
  $("stop").disabled = true;
  if (mode() === "chat" && texts[0] !== null) {
    state.conversation.push({ role: "assistant", content: texts[0] });
    saveConversation();
    drawConversation();
  }
}

function column(parent, body) {
  const box = document.createElement("article");
  box.className = "column";
  box.setAttribute("aria-label", `${body.model} ${body.strategy}`);
  const title = document.createElement("h3");
  title.textContent = `${body.model} · ${body.strategy}`;
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.setAttribute("aria-live", "off");
  const output = document.createElement("div");
  output.className = "output";
  box.append(title, stats, output);
  parent.append(box);
  return { box, stats, output };
}

// One column: stream the request, render the text as it grows; its final text, or null.
async function run(body, view) {
  const controller = new AbortController();
  state.running.push(controller);
  const started = performance.now();
  let first = null;
  let text = "";
  let pieces = 0;
  const show = (finish) => {
    const now = performance.now();
    const parts = [];
    if (first !== null) parts.push(`TTFT ${((first - started) / 1000).toFixed(2)} s`);
    if (first !== null && now > first && pieces > 1) {
      parts.push(`≈${((pieces - 1) / ((now - first) / 1000)).toFixed(1)} tok/s`);
    }
    if (finish) parts.push(...finish);
    view.stats.textContent = parts.join(" · ");
  };
  try {
    const response = await fetch("/generate", {
      method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const error = await failure(response);
      view.output.textContent = error.message;
      explain(error);
      return null;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const data = JSON.parse(event.slice(6));
        if (data.error) {
          view.output.textContent = `${text}\n\n[error: ${data.error.message}]`;
          return null;
        }
        if (data.prompt_index !== undefined && data.index === 0) {
          if (data.text) {
            first ??= performance.now();
            pieces += 1;
            text += data.text;
            render(view.output, text);
          }
          if (data.finish_reason) {
            finish = [`${data.completion_tokens} tokens`, `finish: ${data.finish_reason}`];
            if (data.postprocessed) finish.push(`post-processed: ${data.postprocessed.join(", ")}`);
          }
        }
        if (data.usage && data.results) {
          const result = data.results[0];
          const cached = data.usage.prompt_tokens_details?.cached_tokens ?? 0;
          const speed = result.timings.tokens_per_second;
          finish = [
            ...(finish ?? []),
            `${data.usage.prompt_tokens} prompt tokens (${cached} cached)`,
            speed ? `${speed.toFixed(1)} tok/s on the server` : "",
          ].filter(Boolean);
        }
        show(finish);
      }
    }
    show(finish);
    return text;
  } catch (error) {
    if (error.name === "AbortError") {
      view.stats.textContent += " · stopped";
      return null;
    }
    throw error;
  } finally {
    state.running = state.running.filter((c) => c !== controller);
  }
}

function stopAll() {
  // Closing the connection is what the server notices: it cancels the request at once.
  for (const controller of state.running) controller.abort();
  state.running = [];
  $("stop").disabled = true;
}

function clearErrors() {
  document.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
}

function explain(error) {
  if (error.status === 401) {
    banner(`This server needs an API key: enter one above. (${error.message})`);
  } else if (error.status === 429) {
    const wait = error.retryAfter ? ` Retry after ${error.retryAfter} s.` : "";
    banner(`Too many requests, or the server is busy.${wait} (${error.message})`);
  } else if (error.param && $(`err-${error.param.split(".")[0]}`)) {
    $(`err-${error.param.split(".")[0]}`).textContent = error.message;
  } else {
    banner(error.message ?? String(error));
  }
}

// --- copying the request ----------------------------------------------------------------
function copy(text) {
  const box = $("copied");
  box.textContent = text;
  box.hidden = false;
  navigator.clipboard?.writeText(text).catch(() => { /* shown on the page anyway */ });
}

function asCurl() {
  const body = { ...bodies()[0], stream: true };
  const key = $("api-key").value.trim() ? ` \\\n  -H 'Authorization: Bearer YOUR_KEY'` : "";
  const json = JSON.stringify(body).replaceAll("'", "'\\''");
  return `curl -N -X POST ${location.origin}/generate \\\n  -H 'Content-Type: application/json'${key} \\\n  -d '${json}'`;
}

function asPython() {
  const body = bodies()[0];
  const args = [`model=${JSON.stringify(body.model)}`];
  const extra = {};
  if (body.max_new_tokens !== undefined) args.push(`max_tokens=${body.max_new_tokens}`);
  if (body.strategy === "greedy") args.push("temperature=0");
  else if (body.temperature !== undefined) args.push(`temperature=${body.temperature}`);
  if (body.top_p !== undefined) args.push(`top_p=${body.top_p}`);
  if (body.seed !== undefined) args.push(`seed=${body.seed}`);
  if (body.stop !== undefined) args.push(`stop=${JSON.stringify(body.stop)}`);
  for (const name of ["top_k", "repetition_penalty", "no_repeat_ngram_size", "num_beams"]) {
    if (body[name] !== undefined) extra[name] = body[name];
  }
  if (Object.keys(extra).length) args.push(`extra_body=${JSON.stringify(extra)}`);
  const call = body.messages
    ? `client.chat.completions.create(\n    messages=${JSON.stringify(body.messages)},\n    ${args.join(",\n    ")},\n)\nprint(reply.choices[0].message.content)`
    : `client.completions.create(\n    prompt=${JSON.stringify(body.prompt)},\n    ${args.join(",\n    ")},\n)\nprint(reply.choices[0].text)`;
  const key = $("api-key").value.trim() ? '"YOUR_KEY"' : '"unused"';
  return `from openai import OpenAI\n\nclient = OpenAI(base_url="${location.origin}/v1", api_key=${key})\nreply = ${call}`;
}

// --- the conversation --------------------------------------------------------------------
function drawConversation() {
  const list = $("conversation");
  list.replaceChildren();
  state.conversation.forEach((turn, number) => {
    const item = document.createElement("li");
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = turn.role;
    const content = document.createElement("textarea");
    content.rows = 2;
    content.value = turn.content;
    content.setAttribute("aria-label", `Turn ${number + 1} (${turn.role})`);
    content.addEventListener("input", () => { turn.content = content.value; saveConversation(); });
    const again = document.createElement("button");
    again.type = "button";
    again.textContent = "Run from here";
    again.setAttribute("aria-label", `Run again from turn ${number + 1}`);
    again.addEventListener("click", () => {
      // Keep the turns up to this one (an assistant turn is replaced by a new reply).
      const keep = turn.role === "assistant" ? number : number + 1;
      state.conversation = state.conversation.slice(0, keep);
      saveConversation();
      drawConversation();
      generate().catch(explain);
    });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Delete";
    remove.setAttribute("aria-label", `Delete turn ${number + 1}`);
    remove.addEventListener("click", () => {
      state.conversation.splice(number, 1);
      saveConversation();
      drawConversation();
    });
    item.append(role, content, again, remove);
    list.append(item);
  });
}

function exportConversation() {
  const data = JSON.stringify({ system: $("system").value, messages: state.conversation }, null, 2);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([data], { type: "application/json" }));
  link.download = "conversation.json";
  link.click();
  URL.revokeObjectURL(link.href);
}

async function importConversation(event) {
  const file = event.target.files[0];
  if (!file) return;
  try {
    const data = JSON.parse(await file.text());
    const messages = Array.isArray(data) ? data : data.messages;
    const valid = Array.isArray(messages) && messages.every((m) =>
      ["user", "assistant", "system"].includes(m.role) && typeof m.content === "string");
    if (!valid) throw new Error("expected {messages: [{role, content}, ...]}");
    if (typeof data.system === "string") $("system").value = data.system;
    state.conversation = messages.filter((m) => m.role !== "system");
    saveConversation();
    drawConversation();
  } catch (error) {
    banner(`Could not import: ${error.message}`);
  }
}
