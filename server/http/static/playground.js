// Janus playground: a client of this server's public API in plain JavaScript (no build step, no
// library, no request to any other origin). Understanding is a chat over /v1/chat/completions that
// sends the whole conversation and streams the answer; generation is /v1/generate with stream: true
// (progress events, previews of each image as it forms, then the images). Stopping aborts the fetch:
// the server cancels a job whose client went away. The API key, when the server wants one, lives in
// sessionStorage only.
"use strict";

const KEY_STORAGE = "janus-playground-api-key";
const SEED_MODULUS = 1n << 63n; // the server's seeds are int64; image i of a request uses seed + i
const PREVIEWS = 8; // the most the server sends; they cost it at most its preview share of time, so always ask
const $ = (id) => document.getElementById(id);

// --- talking to the API -------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

const HEADLINES = {
  400: "The server refused the request",
  401: "The API key is missing or wrong",
  413: "Too large for this server",
  415: "Unsupported content",
  422: "The request was refused",
  499: "Cancelled",
  500: "The server failed",
  503: "The server is busy or not ready",
  504: "The request took too long",
};
// Errors that arrive inside a stream carry the job's code, not an HTTP status.
const CODE_STATUS = { invalid_argument: 400, resource_exhausted: 503, unavailable: 503, deadline_exceeded: 504,
                      cancelled: 499, internal: 500 };

function describe(err) {
  if (err instanceof ApiError) {
    const head = HEADLINES[err.status] || `HTTP ${err.status}`;
    const retry = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
    return `${head} (${err.status}${err.code ? " " + err.code : ""}): ${err.message}${retry}`;
  }
  if (err instanceof TypeError) return `Cannot reach the server (${err.message}).`;
  return String((err && err.message) || err);
}

function streamError(error) {
  const code = (error && error.code) || "";
  return new ApiError(CODE_STATUS[code] || 500, code, (error && error.message) || "the job failed");
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function failure(response) {
  let code = "";
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || "";
      message = body.error.message || message;
    }
  } catch {
    // not JSON (a proxy's error page): keep the status text
  }
  if (response.status === 401) askForKey(message);
  return new ApiError(response.status, code, message, response.headers.get("Retry-After"));
}

// POST `bodyText` and call `onData(text)` with every Server-Sent Events `data:` payload until [DONE].
async function postStream(path, bodyText, signal, onData) {
  const response = await fetch(path, { method: "POST", headers: requestHeaders(), body: bodyText, signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the server closed the stream before it finished");
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onData(data);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // on abort or error: close the connection, so the job stops
  }
}

function showError(id, text) {
  const el = $(id);
  el.textContent = text;
  el.hidden = !text;
}

// --- API key --------------------------------------------------------------------------------------

function askForKey(reason) {
  const dialog = $("key-dialog");
  $("key-button").hidden = false;
  if (sessionStorage.getItem(KEY_STORAGE)) showError("key-error", reason || "");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

function saveKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-input").value = "";
  showError("key-error", "");
  $("key-dialog").close();
  checkServer();
}

// A flow model (JanusFlow) takes ODE steps and no temperature; its CFG weight defaults to 2.
let generator = null;

function showGenerator(kind) {
  if (kind === generator) return;
  generator = kind;
  const flow = kind === "flow";
  $("gen-steps-label").hidden = !flow;
  $("gen-temperature-label").hidden = flow;
  $("gen-cfg").value = flow ? "2" : "5";
}

async function checkServer() {
  try {
    const response = await fetch("/v1/models", { headers: requestHeaders() });
    if (!response.ok) throw await failure(response);
    const models = await response.json();
    const name = models.data && models.data[0] ? models.data[0].id : "?";
    $("model").textContent = `model: ${name}`;
    showGenerator(models.data && models.data[0] ? models.data[0].generator : null);
    $("model").dataset.ready = "true";
  } catch (err) {
    $("model").textContent = describe(err);
  }
}

// --- what the engine is doing (from /metrics), while this page has requests running ------------

let activeRequests = 0;
let pollTimer = null;

function requestStarted() {
  activeRequests += 1;
  if (!pollTimer) pollTimer = setInterval(pollEngine, 1000);
  pollEngine();
}

function requestEnded() {
  activeRequests = Math.max(activeRequests - 1, 0);
  if (activeRequests === 0 && pollTimer) {
    clearInterval(pollTimer);
    pollTimer = null;
    setTimeout(pollEngine, 1500);
  }
}

async function pollEngine() {
  try {
    const response = await fetch("/metrics", { headers: requestHeaders() });
    if (!response.ok) return;
    const text = await response.text();
    const value = (pattern) => {
      const match = text.match(pattern);
      return match ? Math.round(Number(match[1])) : 0;
    };
    const images = value(/^janus_running_requests\{kind="generate"\} (\S+)$/m);
    const chats = value(/^janus_running_requests\{kind="understand"\} (\S+)$/m);
    const depth = value(/^janus_queue_depth (\S+)$/m);
    $("engine").textContent = `engine: ${images} image request(s), ${chats} chat(s) running · queue ${depth}`;
  } catch {
    // the status line is a nicety: a failed scrape changes nothing
  }
}

// --- understanding: a chat ------------------------------------------------------------------------

const chat = { messages: [], pending: [], controller: null };

function addImage(name, url) {
  chat.pending.push({ name, url });
  renderAttachments();
}

function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showError("chat-error", `${file.name} is not an image.`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => addImage(file.name, reader.result);
    reader.onerror = () => showError("chat-error", `Cannot read ${file.name}.`);
    reader.readAsDataURL(file);
  }
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  chat.pending.forEach((image, i) => {
    const item = document.createElement("div");
    item.className = "attachment";
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.name;
    img.title = image.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = `remove ${image.name}`;
    remove.addEventListener("click", () => {
      chat.pending.splice(i, 1);
      renderAttachments();
    });
    item.append(img, remove);
    box.append(item);
  });
}

function appendMessage(role, text, images = []) {
  const log = $("chat-log");
  log.querySelector(".hint")?.remove();
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  if (images.length) {
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    for (const image of images) {
      const img = document.createElement("img");
      img.src = image.url;
      img.alt = image.name;
      thumbs.append(img);
    }
    el.append(thumbs);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  const meta = document.createElement("span");
  meta.className = "meta";
  el.append(body, meta);
  log.append(el);
  log.scrollTop = log.scrollHeight;
  return el;
}

function setChatBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

async function sendChat(event) {
  event.preventDefault();
  if (chat.controller) return;
  const text = $("chat-input").value.trim();
  if (!text) return;
  showError("chat-error", "");
  const images = chat.pending.splice(0);
  renderAttachments();
  const content = images.length
    ? [{ type: "text", text }, ...images.map((image) => ({ type: "image_url", image_url: { url: image.url } }))]
    : text;
  const userTurn = { role: "user", content };
  chat.messages.push(userTurn);
  const userEl = appendMessage("user", text, images);
  const answerEl = appendMessage("assistant", "");
  answerEl.dataset.state = "streaming";
  $("chat-input").value = "";

  const body = {
    messages: chat.messages,
    stream: true,
    temperature: Number($("chat-temperature").value),
    max_tokens: Number($("chat-max-tokens").value),
  };
  const controller = new AbortController();
  chat.controller = controller;
  setChatBusy(true);
  requestStarted();
  const textEl = answerEl.querySelector(".text");
  const metaEl = answerEl.querySelector(".meta");
  let answer = "";
  let updates = 0;
  let finish = "";
  let usage = null;
  try {
    await postStream("/v1/chat/completions", JSON.stringify(body), controller.signal, (data) => {
      const chunk = JSON.parse(data);
      if (chunk.error) throw streamError(chunk.error);
      const choice = chunk.choices && chunk.choices[0];
      const piece = choice && choice.delta && choice.delta.content;
      if (piece) {
        answer += piece;
        updates += 1;
        textEl.textContent = answer;
        answerEl.dataset.updates = String(updates);
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.usage) usage = chunk.usage;
    });
    chat.messages.push({ role: "assistant", content: answer });
    metaEl.textContent = [finish === "length" ? "stopped at max tokens" : finish,
                          usage ? `${usage.completion_tokens} tokens` : ""].filter(Boolean).join(" · ");
    answerEl.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError" && answer) {
      chat.messages.push({ role: "assistant", content: answer }); // the partial answer stays in the conversation
      metaEl.textContent = "stopped";
      answerEl.dataset.state = "stopped";
    } else {
      chat.messages.splice(chat.messages.indexOf(userTurn), 1); // a turn that got no answer is not history
      userEl.classList.add("failed");
      answerEl.classList.add("failed");
      const error = document.createElement("p");
      error.className = "error";
      error.textContent = err.name === "AbortError" ? "Stopped before any text arrived." : describe(err);
      answerEl.append(error);
      answerEl.dataset.state = err.name === "AbortError" ? "stopped" : "error";
    }
  } finally {
    chat.controller = null;
    setChatBusy(false);
    requestEnded();
  }
}

function newChat() {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  chat.pending = [];
  renderAttachments();
  showError("chat-error", "");
  $("chat-log").replaceChildren();
  $("chat-input").focus();
}

// --- generation -----------------------------------------------------------------------------------

function randomSeed() {
  const words = crypto.getRandomValues(new Uint32Array(2));
  return ((BigInt(words[0]) << 32n) | BigInt(words[1])) >> 2n; // 62 bits, like the server's own seeds
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function submitGenerate(event) {
  event.preventDefault();
  showError("gen-error", "");
  const prompt = $("gen-prompt").value.trim();
  const seed = $("gen-seed").value.trim();
  if (seed && !/^\d+$/.test(seed)) {
    showError("gen-error", "The seed must be a whole number (or empty for a random one).");
    return;
  }
  const fields = { prompt, n: Number($("gen-n").value), cfg_weight: Number($("gen-cfg").value) };
  if (generator === "flow") fields.steps = Number($("gen-steps").value);
  else fields.temperature = Number($("gen-temperature").value);
  let body = JSON.stringify({ ...fields, stream: true, previews: PREVIEWS });
  // Seeds go up to 2^63, past what a JavaScript number holds exactly: write the digits as they are.
  if (seed) body = `${body.slice(0, -1)},"seed":${seed}}`;
  runGeneration(prompt, body);
}

async function runGeneration(prompt, body) {
  const card = element("div", "job");
  card.dataset.state = "running";
  const head = element("div", "job-head");
  const stop = element("button", "secondary stop", "Stop");
  stop.type = "button";
  head.append(element("span", "prompt", prompt), stop);
  const progress = element("progress");
  progress.max = 1;
  progress.value = 0;
  const status = element("div", "status", "waiting for the server…");
  const gallery = element("div", "gallery");
  card.append(head, progress, status, gallery);
  $("gen-jobs").prepend(card);

  const controller = new AbortController();
  stop.addEventListener("click", () => controller.abort());
  const started = performance.now();
  let step = 0;
  let total = 0;
  requestStarted();
  try {
    await postStream("/v1/generate", body, controller.signal, (data) => {
      const event = JSON.parse(data);
      if (event.error) throw streamError(event.error);
      if (event.images) {
        const match = /"seed"\s*:\s*(\d+)/.exec(data); // parsed from the text: JSON.parse rounds big seeds
        showImages(gallery, prompt, match ? BigInt(match[1]) : null, event.images);
      } else if ("preview" in event) {
        showPreview(gallery, prompt, event); // not progress: it may arrive after later steps' events
      } else if ("step" in event) {
        step = event.step;
        total = event.total;
        progress.max = total;
        progress.value = step;
        status.textContent = `step ${step} / ${total}`;
        card.dataset.step = String(step);
        card.dataset.total = String(total);
      }
    });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    status.textContent = `done in ${seconds} s`;
    card.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      status.textContent = total ? `stopped at step ${step} / ${total}` : "stopped";
      card.dataset.state = "stopped";
    } else {
      card.append(element("p", "error", describe(err)));
      status.textContent = "failed";
      card.dataset.state = "error";
    }
  } finally {
    stop.hidden = true;
    requestEnded();
  }
}

// Image i's card in the gallery, made on its first preview (or with the result) and kept in index order.
function imageCard(gallery, i) {
  const cards = [...gallery.children];
  let card = cards.find((c) => c.dataset.image === String(i));
  if (card) return card;
  card = element("figure", "card");
  card.dataset.image = String(i);
  card.append(element("img"));
  gallery.insertBefore(card, cards.find((c) => Number(c.dataset.image) > i) || null);
  return card;
}

// A preview is best-effort (the server skips some): show the latest one of its image; a stopped job keeps it.
function showPreview(gallery, prompt, event) {
  const img = imageCard(gallery, event.image).querySelector("img");
  img.src = `data:image/png;base64,${event.preview}`;
  img.alt = `${prompt} (step ${event.step} / ${event.total})`;
  img.dataset.state = "preview";
  img.dataset.step = String(event.step);
}

function showImages(gallery, prompt, seed, images) {
  images.forEach((image, i) => {
    const imageSeed = seed === null ? null : (seed + BigInt(i)) % SEED_MODULUS;
    const label = imageSeed === null ? "seed ?" : `seed ${imageSeed}`;
    const url = `data:image/png;base64,${image.b64_png}`;
    const card = imageCard(gallery, i);
    const img = card.querySelector("img");
    img.src = url;
    img.alt = `${prompt} (${label})`;
    img.dataset.state = "final";
    delete img.dataset.step;
    const caption = element("figcaption", "seed", label);
    if (imageSeed !== null) caption.dataset.seed = String(imageSeed);
    const actions = element("div", "actions");
    const name = `janus-${imageSeed ?? Date.now()}.png`;
    const download = element("a", "download", "Download");
    download.href = url;
    download.download = name;
    const use = element("button", "use", "Use as input");
    use.type = "button";
    use.title = "attach this image to the next chat message";
    use.addEventListener("click", () => {
      addImage(name, url);
      $("chat-input").focus();
    });
    actions.append(download, use);
    if (imageSeed !== null) {
      const again = element("button", "reuse", "Reuse seed");
      again.type = "button";
      again.title = "the same seed, prompt and settings with 1 image give this image again";
      again.addEventListener("click", () => {
        $("gen-seed").value = String(imageSeed);
        $("gen-n").value = "1";
      });
      actions.append(again);
    }
    card.append(caption, actions);
  });
}

// --- wiring ---------------------------------------------------------------------------------------

function wire() {
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("chat-new").addEventListener("click", newChat);
  $("chat-files").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = ""; // picking the same file again still fires `change`
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-input").addEventListener("paste", (event) => {
    const files = event.clipboardData ? [...event.clipboardData.files] : [];
    if (files.length) addFiles(files);
  });
  const zone = $("drop-zone");
  // A file dropped anywhere else would make the browser navigate away from the page.
  for (const name of ["dragover", "drop"]) document.addEventListener(name, (event) => event.preventDefault());
  zone.addEventListener("dragover", () => zone.classList.add("over"));
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  $("chat-panel").addEventListener("drop", (event) => {
    zone.classList.remove("over");
    if (event.dataTransfer) addFiles(event.dataTransfer.files);
  });
  $("gen-form").addEventListener("submit", submitGenerate);
  $("gen-dice").addEventListener("click", () => {
    $("gen-seed").value = String(randomSeed());
  });
  $("key-form").addEventListener("submit", saveKey);
  $("key-button").addEventListener("click", () => askForKey(""));
  if (sessionStorage.getItem(KEY_STORAGE)) $("key-button").hidden = false;
  checkServer();
}

wire();
