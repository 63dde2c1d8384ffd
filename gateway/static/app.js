// The web page: submit a job, watch it over the WebSocket, play the result, list and cancel jobs.
// Plain JavaScript against the public API (docs/API.md); no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const FILE_FIELD = { "image-to-video": "image", "video-to-video": "video" };
let models = [];
let socket = null;

function apiKey() {
  return $("api-key").value.trim();
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error || {};
    const details = (error.details || []).map((d) => `  ${d.field}: ${d.message}`).join("\n");
    throw new Error(`${response.status} ${error.code || ""}: ${error.message || response.statusText}` +
      (details ? `\n${details}` : ""));
  }
  return body;
}

let modelsError = "";

async function loadModels() {
  try {
    const listing = await api("/api/v1/models");
    models = listing.models;
    fillModels(listing.default_model);
    // Clear only this function's own message: a submission's error stays until the next submission.
    if (modelsError && $("form-error").textContent === modelsError) $("form-error").textContent = "";
    modelsError = "";
  } catch (error) {
    modelsError = $("form-error").textContent = error.message;
  }
}

function fillModels(preferred) {
  const mode = $("mode").value;
  const select = $("model");
  const current = select.value || preferred;
  select.replaceChildren(...models.filter((m) => m.modes.includes(mode)).map((m) => {
    const option = new Option(`${m.id} (${m.workers ?? "?"} workers)`, m.id);
    option.selected = m.id === current;
    return option;
  }));
  const field = FILE_FIELD[mode];
  $("file-field").hidden = !field;
  $("file-label").textContent = field === "video" ? "Video" : "Image";
  $("file").accept = field === "video" ? "video/*" : "image/*";
}

async function submitJob(event) {
  event.preventDefault();
  $("form-error").textContent = "";
  const mode = $("mode").value;
  const fields = { prompt: $("prompt").value, model: $("model").value, priority: $("priority").value };
  for (const name of ["width", "height", "num_frames", "num_inference_steps"]) {
    if ($(name).value) fields[name] = Number($(name).value);
  }
  const field = FILE_FIELD[mode];
  let options;
  if (field) {
    const file = $("file").files[0];
    if (!file) {
      $("form-error").textContent = `${field}: choose a file`;
      return;
    }
    const form = new FormData();
    for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
    form.append(field, file);
    options = { method: "POST", body: form };
  } else {
    options = { method: "POST", body: JSON.stringify(fields), headers: { "Content-Type": "application/json" } };
  }
  $("submit").disabled = true;
  try {
    const accepted = await api(`/api/v1/generate/${mode}`, options);
    watch(accepted.job_id);
    refreshJobs();
  } catch (error) {
    $("form-error").textContent = error.message;
  } finally {
    $("submit").disabled = false;
  }
}

function watch(jobId) {
  if (socket) socket.close();
  $("current").hidden = false;
  $("job-id").textContent = jobId;
  $("result").hidden = true;
  $("result").removeAttribute("src");
  $("job-error").textContent = "";
  $("progress").value = 0;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const params = new URLSearchParams({ job_id: jobId });
  if (apiKey()) params.set("access_token", apiKey());  // browsers cannot set headers on a WebSocket
  socket = new WebSocket(`${scheme}://${location.host}/api/v1/ws?${params}`);
  socket.onmessage = (message) => show(JSON.parse(message.data));
  socket.onerror = () => { $("job-error").textContent = "the event stream failed; see the job in the list below"; };
}

function show(frame) {
  $("status").textContent = frame.status;
  $("status").className = `badge ${frame.status}`;
  $("phase").textContent = frame.phase;
  $("step").textContent = frame.step ? `step ${frame.step}/${frame.total_steps}` : "";
  $("eta").textContent = frame.eta_s != null ? `about ${Math.ceil(frame.eta_s)} s left` : "";
  $("progress").value = frame.progress;
  if (frame.status === "queued" && frame.queue_position != null) {
    $("step").textContent = `${frame.queue_position} ahead`;
  }
  const job = frame.job;
  if (!job) return;
  if (job.result) {
    $("result").src = job.result.url;
    $("result").hidden = false;
  } else if (job.error) {
    $("job-error").textContent = `${job.error.code}: ${job.error.message}`;
  }
  refreshJobs();
}

async function refreshJobs() {
  try {
    const listing = await api("/api/v1/jobs?limit=10");
    $("jobs").replaceChildren(...listing.jobs.map(jobRow));
  } catch (error) {
    $("jobs").replaceChildren();
  }
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.jobId = job.job_id;
  const cells = [new Date(job.created_at).toLocaleTimeString(), job.model, job.mode, job.status,
    `${Math.round(job.progress * 100)}%`];
  for (const text of cells) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  const actions = document.createElement("td");
  const view = document.createElement("button");
  view.textContent = "watch";
  view.onclick = () => watch(job.job_id);
  actions.append(view);
  if (job.status === "queued" || job.status === "running") {
    const cancel = document.createElement("button");
    cancel.textContent = "cancel";
    cancel.className = "cancel";
    cancel.onclick = async () => {
      try {
        await api(`/api/v1/jobs/${job.job_id}/cancel`, { method: "POST" });
      } catch (error) {
        $("form-error").textContent = error.message;
      }
      refreshJobs();
    };
    actions.append(cancel);
  }
  row.append(actions);
  return row;
}

$("api-key").value = localStorage.getItem("videogen-api-key") || "";
let usedKey = apiKey();
$("api-key").addEventListener("change", () => {
  if (apiKey() === usedKey) return;  // a blur without an edit: nothing to reload
  usedKey = apiKey();
  localStorage.setItem("videogen-api-key", usedKey);
  loadModels();
  refreshJobs();
});
$("mode").addEventListener("change", () => fillModels());
$("job-form").addEventListener("submit", submitJob);
$("refresh").addEventListener("click", refreshJobs);
loadModels();
refreshJobs();
