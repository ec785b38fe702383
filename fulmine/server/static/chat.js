// fulmine's chat page: streams answers from /v1/chat/completions and shows how fast they come.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, streaming: false };
const settingsKeys = ["system", "temperature", "top-p", "max-tokens", "seed", "api-key", "json-mode"];

// a checkbox keeps "true" / "false", the other settings their text
function settingValue(el) { return el.type === "checkbox" ? String(el.checked) : el.value; }
function saveSettings() {
  for (const key of settingsKeys) localStorage.setItem(`fulmine.${key}`, settingValue($(key)));
}
function loadSettings() {
  for (const key of settingsKeys) {
    const value = localStorage.getItem(`fulmine.${key}`);
    if (value === null) continue;
    if ($(key).type === "checkbox") $(key).checked = value === "true";
    else $(key).value = value;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}
function clearError() { $("error").hidden = true; $("error").textContent = ""; }

async function describeError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  const hints = { 401: "Unauthorized: set the API key in Settings.", 429: "The server is busy.",
                  503: "The server is not ready yet." };
  return `${hints[response.status] ? hints[response.status] + " " : ""}(${response.status}) ${message}`;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) { showError(await describeError(response)); return; }
    const models = (await response.json()).data.map((m) => m.id);
    const select = $("model");
    const current = select.value;
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (models.includes(current)) select.value = current;
    clearError();
  } catch (error) {
    showError(`Cannot reach the server: ${error.message}`);
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  if (role === "user") {
    div.textContent = text;  // never HTML
  } else {
    div.innerHTML = `<details class="thinking" hidden><summary>Thinking…</summary><div class="thought"></div></details>`
      + `<div class="content"></div><div class="stats"><span class="numbers">waiting…</span>`
      + `<canvas width="240" height="48" aria-hidden="true"></canvas></div>`;
  }
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function drawSparkline(canvas, rates) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (rates.length < 2) return;
  const max = Math.max(...rates) * 1.1;
  ctx.strokeStyle = "#ffcc33";
  ctx.lineWidth = 2;
  ctx.beginPath();
  rates.forEach((rate, i) => {
    const x = (i / (rates.length - 1)) * canvas.width;
    const y = canvas.height - (rate / max) * (canvas.height - 4) - 2;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function renderStats(div, s) {
  const parts = [];
  if (s.ttft !== null) parts.push(`TTFT ${Math.round(s.ttft)} ms`);
  if (s.ttfat !== null && s.thinkingTokens) parts.push(`first answer token ${Math.round(s.ttfat)} ms`);
  if (s.rate !== null) parts.push(`${s.rate.toFixed(1)} tok/s`);
  parts.push(`${s.tokens} tokens`);
  if (s.cached !== null) parts.push(`${s.cached} cached`);
  const numbers = div.querySelector(".numbers");
  numbers.textContent = parts.join(" · ");
  if (s.note) {
    const note = document.createElement("span");
    note.className = "stopped";
    note.textContent = ` · ${s.note}`;
    numbers.appendChild(note);
  }
  numbers.dataset.ttftMs = s.ttft === null ? "" : String(Math.round(s.ttft));
  numbers.dataset.cached = s.cached === null ? "" : String(s.cached);
  drawSparkline(div.querySelector("canvas"), s.rates);
}

function setStreaming(on) {
  state.streaming = on;
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("input").disabled = on;
}

function requestBody(messages) {
  const body = {
    model: $("model").value, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
  };
  if ($("max-tokens").value.trim() !== "") body.max_tokens = Number($("max-tokens").value);
  if ($("seed").value.trim() !== "") body.seed = Number($("seed").value);
  if ($("json-mode").checked) body.response_format = { type: "json_object" };  // any JSON object, by grammar
  return body;
}

async function send(text) {
  clearError();
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  const content = div.querySelector(".content");
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  const stats = { ttft: null, ttfat: null, rate: null, tokens: 0, cached: null, rates: [], note: "", thinkingTokens: 0 };
  const thinking = div.querySelector(".thinking");
  const thought = div.querySelector(".thought");
  let answer = "", reasoning = "";
  const summarize = (final) => {  // "thought for 2.1 s, 312 tokens", once the answer began (or ended)
    const seconds = ((stats.ttfat ?? (performance.now() - started)) - (stats.ttft ?? 0)) / 1000;
    const tokens = stats.thinkingTokens ? `, ${stats.thinkingTokens} tokens` : "";
    thinking.querySelector("summary").textContent = final || stats.ttfat !== null
      ? `Thought for ${seconds.toFixed(1)} s${tokens}` : "Thinking…";
  };
  const started = performance.now();
  let firstAt = null;
  state.controller = new AbortController();
  setStreaming(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await describeError(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) !== -1) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.reasoning_content) {
          const now = performance.now();
          if (firstAt === null) { firstAt = now; stats.ttft = now - started; }
          stats.tokens += 1;
          stats.thinkingTokens += 1;
          reasoning += delta.reasoning_content;
          thinking.hidden = false;
          thought.textContent = reasoning;  // never HTML
          summarize(false);
          renderStats(div, stats);
          div.scrollIntoView({ block: "end" });
        }
        if (delta && delta.content) {
          const now = performance.now();
          if (firstAt === null) { firstAt = now; stats.ttft = now - started; }
          if (stats.ttfat === null) { stats.ttfat = now - started; if (reasoning) summarize(false); }
          stats.tokens += 1;
          answer += delta.content;
          if (stats.tokens > 1) {
            stats.rate = (stats.tokens - 1) / ((now - firstAt) / 1000);
            stats.rates.push(stats.rate);
          }
          content.innerHTML = Markdown.render(answer);
          renderStats(div, stats);
          div.scrollIntoView({ block: "end" });
        }
        if (chunk.usage) {
          stats.tokens = chunk.usage.completion_tokens;
          const details = chunk.usage.prompt_tokens_details;
          stats.cached = details ? details.cached_tokens : 0;
          const completion = chunk.usage.completion_tokens_details;
          if (completion && completion.reasoning_tokens) {
            stats.thinkingTokens = completion.reasoning_tokens;
            summarize(true);
          }
          renderStats(div, stats);
        }
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      stats.note = "stopped";
    } else {
      stats.note = "failed";
      showError(error.message);
    }
    renderStats(div, stats);
  } finally {
    state.controller = null;
    setStreaming(false);
    if (answer) state.history.push({ role: "assistant", content: answer });
    else if (stats.note === "failed") state.history.pop();  // let the user retry the same turn
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.streaming) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  clearError();
  $("input").focus();
});
$("settings-toggle").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
});
for (const key of settingsKeys) $(key).addEventListener("change", saveSettings);
$("api-key").addEventListener("change", loadModels);

loadSettings();
loadModels();
$("input").focus();
