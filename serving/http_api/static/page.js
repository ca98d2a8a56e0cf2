// The drawing page: draw on the pad, send it to the server, show the answer and what the model saw.
// Plain JavaScript, no build step, no library: everything it loads comes from this server.
"use strict";

const pad = document.getElementById("pad");
const ink = pad.getContext("2d");
const seen = document.getElementById("seen").getContext("2d");
const pen = document.getElementById("pen");
const $ = (id) => document.getElementById(id);

// The pad is 280x280: MNIST's 28x28 times ten. A 22 px stroke ends up ~2 px wide once the server
// scales the digit's ink box to 20 px, the width of MNIST's pen strokes.
const STROKE = 22;
const KEY_STEP = 8;

const state = {
  model: null,        // /api/model: name, version, provider, class names
  input: "images",    // the KServe input and output names, from /v2/models/<name>
  output: "probabilities",
  digits: null,       // the sample of MNIST test digits: {labels, per_row} and the sprite image
  sprite: new Image(),
  drawing: false,     // a pointer is down on the pad
  last: null,         // the pen's previous point
  keyPen: { x: 140, y: 140, down: false },
  hasInk: false,      // something was drawn since the last Clear
  generation: 0,      // bumped by Clear and Random: answers about an older drawing are dropped
  inFlight: false,    // one request at a time; strokes made meanwhile are sent when it returns
  dirty: false,
};

function clearPad() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.strokeStyle = "#fff";
  ink.lineWidth = STROKE;
  state.hasInk = false;
  state.generation += 1;
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: (event.clientX - box.left) * pad.width / box.width,
    y: (event.clientY - box.top) * pad.height / box.height,
  };
}

function stroke(from, to) {
  ink.beginPath();
  ink.moveTo(from.x, from.y);
  ink.lineTo(to.x, to.y);
  ink.stroke();
  state.hasInk = true;
  changed();
}

// ---- pointer drawing (mouse, pen, finger) ----
pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  if (!state.hasInk) { clearPad(); $("truth").textContent = ""; }  // a random digit is replaced, not drawn on
  state.drawing = true;
  state.last = padPoint(event);
  stroke(state.last, state.last);
});
pad.addEventListener("pointermove", (event) => {
  if (!state.drawing) return;
  const point = padPoint(event);
  stroke(state.last, point);
  state.last = point;
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => { if (state.drawing) { state.drawing = false; changed(); } });
}

// ---- keyboard drawing: arrows move the pen, Space lowers or lifts it ----
function showPen() {
  const box = pad.getBoundingClientRect();
  pen.style.left = `${state.keyPen.x * box.width / pad.width}px`;
  pen.style.top = `${state.keyPen.y * box.height / pad.height}px`;
  pen.classList.toggle("down", state.keyPen.down);
}
pad.addEventListener("focus", () => { pen.hidden = false; showPen(); });
pad.addEventListener("blur", () => { pen.hidden = true; });
pad.addEventListener("keydown", (event) => {
  const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  const p = state.keyPen;
  if (event.key in moves) {
    const step = event.shiftKey ? 3 * KEY_STEP : KEY_STEP;
    const [dx, dy] = moves[event.key];
    const from = { x: p.x, y: p.y };
    p.x = Math.min(pad.width, Math.max(0, p.x + dx * step));
    p.y = Math.min(pad.height, Math.max(0, p.y + dy * step));
    if (p.down) stroke(from, p);
  } else if (event.key === " " || event.key === "Enter") {
    p.down = !p.down;
    if (p.down) {
      if (!state.hasInk) clearPad();
      stroke(p, p);
    }
  } else {
    return;  // other keys (Tab...) keep their usual meaning
  }
  event.preventDefault();
  showPen();
});

// ---- talking to the server ----
async function postJson(url, body, contentType) {
  const response = await fetch(url, { method: "POST", body, headers: { "Content-Type": contentType } });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || `the server answered ${response.status}`);
  return answer;
}

// One request at a time: while one is out, new strokes only mark the drawing dirty, and the
// answer's arrival sends the newest drawing. The chart follows the pen without a backlog.
function changed() {
  state.dirty = true;
  if (!state.inFlight) sendDrawing();
}

async function sendDrawing() {
  if (!state.hasInk || !state.model) return;
  state.dirty = false;
  state.inFlight = true;
  const generation = state.generation;
  try {
    const png = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
    const answer = await postJson("/api/classify", png, "image/png");
    if (generation === state.generation) show(answer.probabilities, answer.framed);
  } catch (error) {
    status(error.message);
  } finally {
    state.inFlight = false;
    if (state.dirty) sendDrawing();
  }
}

// A random digit from the shipped sample goes through the standard KServe v2 REST call, as UINT8.
async function randomDigit() {
  if (!state.digits || !state.model) return;
  const index = Math.floor(Math.random() * state.digits.labels.length);
  const cell = document.createElement("canvas");
  cell.width = cell.height = 28;
  const context = cell.getContext("2d");
  const perRow = state.digits.per_row;
  context.drawImage(state.sprite, (index % perRow) * 28, Math.floor(index / perRow) * 28, 28, 28, 0, 0, 28, 28);
  const rgba = context.getImageData(0, 0, 28, 28).data;
  const pixels = Array.from({ length: 784 }, (_, k) => rgba[4 * k]);

  clearPad();
  ink.imageSmoothingEnabled = false;
  ink.drawImage(cell, 0, 0, pad.width, pad.height);
  const generation = state.generation;
  const { model_name: name, model_version: version } = state.model;
  const request = {
    inputs: [{ name: state.input, datatype: "UINT8", shape: [1, 28, 28, 1], data: pixels }],
    outputs: [{ name: state.output }],
  };
  try {
    const answer = await postJson(`/v2/models/${encodeURIComponent(name)}/versions/${version}/infer`,
                                  JSON.stringify(request), "application/json");
    if (generation !== state.generation) return;
    show(answer.outputs[0].data, pixels);
    const truth = state.model.class_names[state.digits.labels[index]];
    $("truth").textContent = `MNIST test image ${index}, labelled ${truth}.`;
  } catch (error) {
    status(error.message);
  }
}

// ---- showing the answer ----
function buildBars() {
  const list = $("bars");
  list.replaceChildren(...state.model.class_names.map((name) => {
    const row = document.createElement("li");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    row.append(label, track, value);
    return row;
  }));
}

function show(probabilities, pixels) {
  const names = state.model.class_names;
  let best = 0;
  probabilities.forEach((p, i) => { if (p > probabilities[best]) best = i; });
  $("label").textContent = names[best];
  $("label").dataset.label = String(best);
  $("confidence").textContent = `${(100 * probabilities[best]).toFixed(1)} % sure`;
  [...$("bars").children].forEach((row, i) => {
    const percent = (100 * probabilities[i]).toFixed(1);
    row.classList.toggle("top", i === best);
    row.querySelector(".fill").style.width = `${percent}%`;
    row.querySelector(".value").textContent = `${percent} %`;
  });
  const image = seen.createImageData(28, 28);
  pixels.forEach((v, k) => { image.data.set([v, v, v, 255], 4 * k); });
  seen.putImageData(image, 0, 0);
  status("");
}

// Back to an empty pad: no answer, empty bars, nothing seen.
function reset() {
  clearPad();
  if (state.model) show(state.model.class_names.map(() => 0), new Array(784).fill(0));
  for (const row of $("bars").children) row.classList.remove("top");
  $("label").textContent = "–";
  $("label").dataset.label = "";
  $("confidence").textContent = "";
  $("truth").textContent = "";
}

function status(message) { $("status").textContent = message; }

async function start() {
  clearPad();
  $("clear").addEventListener("click", () => { reset(); pad.focus(); });
  $("random").addEventListener("click", randomDigit);
  try {
    state.model = await (await fetch("/api/model")).json();
    const m = state.model;
    const metadata = await (await fetch(`/v2/models/${encodeURIComponent(m.model_name)}`)).json();
    state.input = metadata.inputs[0].name;
    state.output = metadata.outputs[0].name;
    const accuracy = m.test_accuracy ? ` · test accuracy ${(100 * m.test_accuracy).toFixed(2)} %` : "";
    $("model-info").textContent =
      `Model ${m.model_name}, version ${m.model_version}, on ${m.execution_provider}${accuracy}`;
    buildBars();
    reset();
    state.digits = await (await fetch("/static/digits.json")).json();
    state.sprite.src = "/static/digits.png";
    await state.sprite.decode();
    document.body.dataset.ready = "true";  // for tests: the page can draw, classify and pick digits
  } catch (error) {
    status(`The server did not answer as expected: ${error.message}`);
  }
}

start();
