// t2i's page. It speaks the server's public API only:
//   POST /t2i/v1/jobs (a txt2img/img2img body) -> job id; GET /sdapi/v1/progress?id_task= for the bar and
//   live preview; GET /t2i/v1/jobs/{id}/result for the images; DELETE /t2i/v1/jobs/{id} to interrupt;
//   /sdapi/v1/png-info, /samplers, /schedulers, /sd-models, /loras, /options (model switch), /t2i/v1/models (defaults).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { job: null, lastSeed: null, initImage: null, painted: false };

// ------------------------------------------------------------------ helpers

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && data.detail;
    const text = Array.isArray(detail) ? detail.map((d) => d.msg).join("; ") : detail || response.statusText;
    throw new Error(`${response.status}: ${text}`);
  }
  return data;
}

function say(text, error = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", error);
}

function option(select, value, label = value) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  select.append(o);
  return o;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const snap8 = (n) => Math.max(8, Math.round(n / 8) * 8);

// ------------------------------------------------------------------ settings from the server

async function loadChoices() {
  // the model's defaults are known once it is loaded (the server loads it first thing)
  while (!(await api("GET", "/t2i/v1/health")).loaded) {
    say("loading the model…");
    await sleep(500);
  }
  const [samplers, models, loras, options, info, schedulers] = await Promise.all([
    api("GET", "/sdapi/v1/samplers"), api("GET", "/sdapi/v1/sd-models"), api("GET", "/sdapi/v1/loras"),
    api("GET", "/sdapi/v1/options"), api("GET", "/t2i/v1/models"), api("GET", "/sdapi/v1/schedulers"),
  ]);
  const sampler = $("sampler");
  sampler.replaceChildren();
  for (const s of samplers) {
    const o = option(sampler, s.name);
    if (s.aliases.includes(info.defaults.sampler)) o.selected = true;
  }
  // A1111's "Schedule type" beside the sampler: its labels, Automatic (the sampler's own schedule) first
  const scheduler = $("scheduler");
  scheduler.replaceChildren();
  for (const s of schedulers) option(scheduler, s.label);
  scheduler.value = "Automatic";
  const model = $("model");
  model.replaceChildren();
  for (const m of models) {
    const o = option(model, m.title, m.model_name);
    if (m.title === options.sd_model_checkpoint || m.model_name === info.selected) o.selected = true;
  }
  const lora = $("lora");
  lora.replaceChildren();
  option(lora, "", loras.length ? "add a LoRA…" : "no LoRAs (--lora-dir)");
  for (const l of loras) option(lora, l.name);
  const d = info.defaults;
  $("steps").value = d.steps;
  $("cfg").value = d.guidance;
  $("width").value = d.width;
  $("height").value = d.height;
}

$("model").addEventListener("change", async (event) => {
  say(`loading ${event.target.value}…`);
  try {
    await api("POST", "/sdapi/v1/options", { sd_model_checkpoint: event.target.value });
    await loadChoices();
    say(`model ${event.target.selectedOptions[0].textContent}`);
  } catch (e) {
    say(e.message, true);
  }
});

$("lora").addEventListener("change", (event) => {
  if (!event.target.value) return;
  const prompt = $("prompt");
  prompt.value = `${prompt.value.trim()} <lora:${event.target.value}:1>`.trim();
  event.target.value = "";
});

$("reuse-seed").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
$("random-seed").addEventListener("click", () => { $("seed").value = -1; });

for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => { $("img2img").hidden = !$("mode-img2img").checked; });
}

// ------------------------------------------------------------------ init image and mask painting

function setInitImage(src) {
  const image = new Image();
  image.onload = () => {
    state.initImage = image;
    for (const canvas of [$("init-canvas"), $("mask-canvas")]) {
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
    }
    $("init-canvas").getContext("2d").drawImage(image, 0, 0);
    clearMask();
    $("width").value = snap8(image.naturalWidth);
    $("height").value = snap8(image.naturalHeight);
    $("mode-img2img").checked = true;
    $("img2img").hidden = false;
  };
  image.src = src;
}

$("init-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInitImage(reader.result);
  reader.readAsDataURL(file);
});

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.painted = false;
}
$("clear-mask").addEventListener("click", clearMask);

(function maskPainting() {
  const canvas = $("mask-canvas");
  let drawing = false;
  let last = null;
  const at = (event) => {  // mouse position in image pixels (the canvas is scaled to fit)
    const r = canvas.getBoundingClientRect();
    return [(event.clientX - r.left) * canvas.width / r.width, (event.clientY - r.top) * canvas.height / r.height];
  };
  const stroke = (from, to) => {
    const ctx = canvas.getContext("2d");
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.strokeStyle = ctx.fillStyle = "#ff2020";
    ctx.lineWidth = $("brush").value * scale;
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
    state.painted = true;
  };
  canvas.addEventListener("pointerdown", (e) => { drawing = true; last = at(e); stroke(last, last); canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", (e) => { if (drawing) { const p = at(e); stroke(last, p); last = p; } });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { drawing = false; });
})();

function maskPNG() {
  // painted = white (repaint), the rest black (keep)
  const painted = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = painted.width;
  out.height = painted.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  const src = painted.getContext("2d").getImageData(0, 0, out.width, out.height);
  const dst = ctx.getImageData(0, 0, out.width, out.height);
  for (let i = 3; i < src.data.length; i += 4) {
    if (src.data[i] > 0) dst.data[i - 3] = dst.data[i - 2] = dst.data[i - 1] = 255;
  }
  ctx.putImageData(dst, 0, 0);
  return out.toDataURL("image/png");
}

// ------------------------------------------------------------------ generating

function request() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    steps: Number($("steps").value),
    cfg_scale: Number($("cfg").value),
    width: Number($("width").value),
    height: Number($("height").value),
    batch_size: Number($("batch").value),
    seed: Number($("seed").value),
  };
  if ($("mode-img2img").checked) {
    if (!state.initImage) throw new Error("choose an init image first");
    body.init_images = [$("init-canvas").toDataURL("image/png")];
    body.denoising_strength = Number($("strength").value);
    if (state.painted) {
      body.mask = maskPNG();
      body.mask_blur = Number($("mask-blur").value);
      body.inpainting_mask_invert = $("invert-mask").checked ? 1 : 0;
    }
  }
  return body;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  let job;
  try {
    job = await api("POST", "/t2i/v1/jobs", request());
  } catch (e) {
    say(e.message, true);
    return;
  }
  state.job = job.id;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  say(`job ${job.id}, seed ${job.seed}`);
  try {
    await follow(job.id);
    const result = await api("GET", `/t2i/v1/jobs/${encodeURIComponent(job.id)}/result`);
    showResult(result);
  } catch (e) {
    say(e.message, true);
  } finally {
    state.job = null;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("preview").hidden = true;
    $("progress").value = 0;
    $("progress-text").textContent = "";
  }
});

async function follow(id) {
  // poll A1111's progress route by id until the job has finished
  for (;;) {
    const p = await api("GET", `/sdapi/v1/progress?id_task=${encodeURIComponent(id)}`);
    $("progress").value = p.progress;
    $("progress-text").textContent = p.textinfo || "";
    if (p.current_image) {
      $("preview").src = `data:image/png;base64,${p.current_image}`;
      $("preview").hidden = false;
    }
    if (p.progress >= 1 && p.state.job_count === 0) return;
    await sleep(400);
  }
}

$("interrupt").addEventListener("click", async () => {
  if (state.job) await api("DELETE", `/t2i/v1/jobs/${encodeURIComponent(state.job)}`).catch(() => {});
});

function showResult(result) {
  const info = JSON.parse(result.info);
  if (info.interrupted) say(`interrupted; ${result.images.length} image(s) finished`);
  else say(`done: seed ${info.seed}`);
  if (result.images.length) state.lastSeed = info.all_seeds[0];
  // newest first, a batch in seed order
  result.images.map((b64, i) => card(b64, info.infotexts[i], info.all_seeds[i])).reverse()
    .forEach((c) => $("gallery").prepend(c));
}

function card(b64, infotext, seed) {
  const card = $("card").content.firstElementChild.cloneNode(true);
  const src = `data:image/png;base64,${b64}`;
  card.querySelector("img").src = src;
  card.querySelector(".seed").textContent = `Seed: ${seed}`;
  card.querySelector(".params").textContent = infotext;
  const link = card.querySelector(".download");
  link.href = src;
  link.download = `t2i-${seed}.png`;
  card.querySelector(".to-img2img").addEventListener("click", () => setInitImage(src));
  card.querySelector(".use-seed").addEventListener("click", () => { $("seed").value = seed; });
  return card;
}

// ------------------------------------------------------------------ reading a dropped PNG

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (file) readParameters(file);
});

function readParameters(file) {
  const reader = new FileReader();
  reader.onload = async () => {
    try {
      const info = await api("POST", "/sdapi/v1/png-info", { image: reader.result });
      const box = $("png-info");
      box.hidden = false;
      box.textContent = info.info || "this image carries no generation parameters";
      applyParameters(info.parameters);
    } catch (e) {
      say(e.message, true);
    }
  };
  reader.readAsDataURL(file);
}

function applyParameters(p) {
  if (!p || !p.Prompt) return;
  $("prompt").value = p.Prompt;
  $("negative").value = p["Negative prompt"] || "";
  if (p.Steps) $("steps").value = p.Steps;
  if (p["CFG scale"]) $("cfg").value = p["CFG scale"];
  if (p.Seed) $("seed").value = p.Seed;
  if (p["Size-1"]) { $("width").value = p["Size-1"]; $("height").value = p["Size-2"]; }
  if (p.Sampler && [...$("sampler").options].some((o) => o.value === p.Sampler)) $("sampler").value = p.Sampler;
  const schedule = p["Schedule type"] || "Automatic";
  if ([...$("scheduler").options].some((o) => o.value === schedule)) $("scheduler").value = schedule;
}

loadChoices().then(() => say("ready")).catch((e) => say(e.message, true));
