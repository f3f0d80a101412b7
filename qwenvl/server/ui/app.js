// The chat page: a conversation with the served model over its OpenAI-compatible API.
// User text is shown as text; answers go through the DOM-only Markdown renderer (markdown.js).

import { Api, ApiError } from "./api.js";
import { renderGrounding } from "./boxes.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top-p", "max-tokens", "seed"];
const SETTINGS_STORAGE = "qwenvl.settings";

const api = new Api();
const state = {
  model: "",
  history: [], // OpenAI messages of the finished turns (system prompt excluded: it is read per request)
  attachments: [], // {kind: "image" | "video", name, url}
  controller: null,
};

// ---- small DOM helpers -------------------------------------------------------------------------

function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);
  return node;
}

function showError(message) {
  const line = $("error");
  line.textContent = message;
  line.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- settings ----------------------------------------------------------------------------------

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
  } catch {
    saved = {};
  }
  for (const id of SETTINGS) {
    if (typeof saved[id] === "string") $(id).value = saved[id];
    $(id).addEventListener("input", saveSettings);
  }
}

function saveSettings() {
  const values = Object.fromEntries(SETTINGS.map((id) => [id, $(id).value]));
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(values));
}

function samplingFields() {
  const fields = {};
  const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  const pairs = [["temperature", "temperature"], ["top_p", "top-p"], ["max_tokens", "max-tokens"], ["seed", "seed"]];
  for (const [field, id] of pairs) {
    const value = number(id);
    if (value !== null) fields[field] = value;
  }
  return fields;
}

// ---- attachments -------------------------------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attachFiles(files) {
  for (const file of files) {
    const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
    if (!kind) {
      showError(`${file.name || "the pasted item"}: not an image or a video`);
      continue;
    }
    try {
      state.attachments.push({ kind, name: file.name || `pasted ${kind}`, url: await readAsDataUrl(file) });
    } catch (error) {
      showError(`${file.name}: cannot read the file (${error.message})`);
    }
  }
  renderAttachments();
}

function mediaPreview(attachment) {
  if (attachment.kind === "image") {
    const image = el("img");
    image.src = attachment.url;
    image.alt = attachment.name;
    return image;
  }
  const video = el("video");
  video.src = attachment.url;
  video.muted = true;
  video.controls = true;
  video.preload = "metadata";
  return video;
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((attachment, index) => {
    const remove = el("button", "remove", "×");
    remove.type = "button";
    remove.title = `remove ${attachment.name}`;
    remove.addEventListener("click", () => {
      state.attachments.splice(index, 1);
      renderAttachments();
    });
    const chip = el("div", "chip", mediaPreview(attachment), el("span", "name", attachment.name), remove);
    chip.dataset.testid = "attachment";
    box.append(chip);
  });
}

// ---- the conversation --------------------------------------------------------------------------

function userContent(text, attachments) {
  if (!attachments.length) return text;
  const parts = attachments.map((a) =>
    a.kind === "image" ? { type: "image_url", image_url: { url: a.url } } : { type: "video_url", video_url: { url: a.url } },
  );
  if (text) parts.push({ type: "text", text });
  return parts;
}

function requestMessages(userMessage) {
  const system = $("system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...state.history, userMessage];
}

// The data URLs of a request's images in prompt order: the server numbers `qwenvl.images` the same way.
function imageUrls(messages) {
  const urls = [];
  for (const message of messages) {
    if (!Array.isArray(message.content)) continue;
    for (const part of message.content) if (part.type === "image_url") urls.push(part.image_url.url);
  }
  return urls;
}

function addUserBubble(text, attachments) {
  $("empty")?.remove();
  const bubble = el("div", "message user");
  bubble.dataset.testid = "user-message";
  if (attachments.length) bubble.append(el("div", "media", ...attachments.map(mediaPreview)));
  if (text) bubble.append(el("div", "text", text)); // text node: shown as typed, never as HTML
  $("messages").append(bubble);
  return bubble;
}

// One assistant answer being streamed: its text, Markdown rendering (once per frame) and statistics.
class Answer {
  constructor() {
    this.text = "";
    this.node = el("div", "message assistant pending");
    this.node.dataset.testid = "answer";
    this.node.dataset.text = "";
    this.body = el("div", "markdown");
    this.stats = el("div", "stats");
    this.stats.dataset.testid = "stats";
    this.node.append(this.body, this.stats);
    $("messages").append(this.node);
    this.frame = 0;
  }

  append(piece) {
    this.text += piece;
    this.node.dataset.text = this.text;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    this.frame = 0;
    const follow = nearEnd();
    this.body.replaceChildren(renderMarkdown(this.text));
    if (follow) scrollToEnd();
  }

  finish(summary, figure) {
    if (this.frame) cancelAnimationFrame(this.frame);
    const follow = nearEnd();
    this.render();
    this.node.classList.remove("pending");
    this.stats.textContent = summary;
    if (figure) this.node.insertBefore(figure, this.stats);
    if (follow) scrollToEnd();
  }
}

// Follow a growing answer only while the reader is at the end (not while they scroll back to read).
function nearEnd() {
  return window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
}

function scrollToEnd() {
  window.scrollTo({ top: document.body.scrollHeight });
}

function summary(timing, usage, finishReason, stopped) {
  const parts = [];
  if (timing.first !== null) parts.push(`TTFT ${((timing.first - timing.start) / 1000).toFixed(2)} s`);
  const tokens = usage ? usage.completion_tokens : timing.pieces;
  const span = timing.last !== null && timing.first !== null ? (timing.last - timing.first) / 1000 : 0;
  if (tokens > 1 && span > 0) parts.push(`${((tokens - 1) / span).toFixed(1)} tok/s`);
  parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  if (stopped) parts.push("stopped");
  else if (finishReason === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

async function send() {
  if (state.controller) return;
  const text = $("prompt").value;
  const attachments = state.attachments;
  if (!text.trim() && !attachments.length) return;
  clearError();
  const userMessage = { role: "user", content: userContent(text.trim() ? text : "", attachments) };
  const messages = requestMessages(userMessage);
  const bubble = addUserBubble(text, attachments);
  const answer = new Answer();
  $("prompt").value = "";
  state.attachments = [];
  renderAttachments();
  scrollToEnd();

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const timing = { start: performance.now(), first: null, last: null, pieces: 0 };
  let usage = null;
  let finishReason = null;
  let extension = null;
  try {
    const body = {
      model: state.model || "qwenvl",
      messages,
      stream: true,
      stream_options: { include_usage: true },
      ...samplingFields(),
    };
    for await (const chunk of api.chat(body, controller.signal)) {
      if (chunk.error) throw new ApiError(500, chunk.error.message || "the server failed");
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        const now = performance.now();
        if (timing.first === null) timing.first = now;
        timing.last = now;
        timing.pieces += 1;
        answer.append(piece);
      }
      if (choice.finish_reason) {
        finishReason = choice.finish_reason;
        extension = chunk.qwenvl || null;
      }
    }
    state.history.push(userMessage, { role: "assistant", content: answer.text });
    answer.finish(summary(timing, usage, finishReason, false), renderGrounding(extension, imageUrls(messages)));
  } catch (error) {
    if (error.name === "AbortError") {
      // Stopped: the server cancels the request when the connection closes; what was said stays.
      state.history.push(userMessage, { role: "assistant", content: answer.text });
      answer.finish(summary(timing, usage, null, true), null);
    } else {
      // Refused or failed: the turn is taken back, the message returns to the box, the reason shows.
      bubble.remove();
      answer.node.remove();
      $("prompt").value = text;
      state.attachments = [...attachments, ...state.attachments];
      renderAttachments();
      showError(error.message || String(error));
      if (error.status === 401) $("key-panel").hidden = false;
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  $("messages").replaceChildren(el("p", "empty", "Ask something. Attach, drop or paste images and videos."));
  $("messages").firstChild.id = "empty";
  clearError();
}

async function connect() {
  try {
    const list = await api.models();
    state.model = (list.data && list.data[0] && list.data[0].id) || "";
    $("model-name").textContent = state.model;
    $("key-panel").hidden = true;
    clearError();
  } catch (error) {
    if (error.status === 401) {
      $("key-panel").hidden = false;
      showError(api.key ? "the API key was refused" : "this server wants an API key");
      $("api-key").focus();
    } else {
      showError(error.message || String(error));
    }
  }
}

// ---- wiring ------------------------------------------------------------------------------------

function wire() {
  loadSettings();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("attach").addEventListener("change", async (event) => {
    await attachFiles([...event.target.files]);
    event.target.value = "";
  });
  $("prompt").addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (files.length) {
      event.preventDefault();
      attachFiles(files);
    }
  });
  document.addEventListener("dragover", (event) => {
    if ([...(event.dataTransfer?.types || [])].includes("Files")) {
      event.preventDefault();
      document.body.classList.add("dropping");
    }
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) document.body.classList.remove("dropping");
  });
  document.addEventListener("drop", (event) => {
    const files = [...(event.dataTransfer?.files || [])];
    document.body.classList.remove("dropping");
    if (files.length) {
      event.preventDefault();
      attachFiles(files);
    }
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    api.setKey($("api-key").value);
    $("api-key").value = "";
    connect();
  });
  connect();
  $("prompt").focus();
}

wire();
