// The tuneserve dashboard: one project at a time, through the public /v1 API only, with the API key the user
// pastes (kept in this tab's session storage and sent as the bearer token). No framework: each page is a function
// that renders into <main> and refreshes what changes while it is open.
"use strict";

const KEY_STORAGE = "tuneserve.api_key";
const POLL_MS = 2000;
const view = document.getElementById("view");
// The page on screen: `alive` until the next navigation, `stop` ends its timers and streams. A page that is still
// loading when the user moves on must neither draw over the next one nor keep polling.
let current = { alive: false, stop: () => {} };

// ---------- API ----------

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param;
    this.code = error.code;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(path, { method = "GET", body, key = apiKey(), raw = false } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined && !(body instanceof FormData)) headers["Content-Type"] = "application/json";
  const response = await fetch(`/v1${path}`, {
    method,
    headers,
    body: body === undefined || body instanceof FormData ? body : JSON.stringify(body),
  });
  if (!response.ok) {
    const text = await response.text();
    let parsed = null;
    try { parsed = JSON.parse(text); } catch { /* not JSON */ }
    if (response.status === 401 && key === apiKey()) signOut("Your API key was refused; sign in again.");
    throw new ApiError(response.status, parsed || { error: { message: text || response.statusText } });
  }
  return raw ? response : response.json();
}

async function listAll(path) {
  const items = [];
  let after = null;
  for (;;) {
    const separator = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${separator}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || !page.data.length) return items;
    after = page.data[page.data.length - 1].id;
  }
}

async function download(path, filename) {
  const response = await api(path, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---------- DOM helpers ----------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

function field(labelText, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2)}`;
  input.id = id;
  return h("div", {}, h("label", { for: id }, labelText, hint ? h("span", { class: "hint", text: ` ${hint}` }) : null), input);
}

function alertBox(message) {
  return h("div", { class: "alert", role: "alert", text: message });
}

function table(headers, rows, caption) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      caption ? h("caption", { class: "hint", text: caption }) : null,
      h("thead", {}, h("tr", {}, headers.map((text) => h("th", { scope: "col", text })))),
      h("tbody", {}, rows),
    ),
  );
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "";
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  return m >= 60 ? `${Math.floor(m / 60)} h ${m % 60} min` : m ? `${m} min ${s} s` : `${s} s`;
}

function statusBadge(status) {
  return h("span", { class: `status ${status}`, text: status });
}

function link(href, text) {
  return h("a", { href, text });
}

function show(page, title, ...content) {
  if (!page.alive) return; // the user has moved on
  view.replaceChildren(h("h1", { text: title }), ...content);
  document.title = `${title} · tuneserve`;
}

// ---------- sign in ----------

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  navigate("/ui/", message);
}

function signInPage(page, message) {
  document.getElementById("nav").hidden = true;
  const input = h("input", { type: "password", autocomplete: "off", required: true, size: 40, name: "api_key" });
  const errors = h("div", { "aria-live": "polite" }, message ? alertBox(message) : null);
  const form = h(
    "form",
    {
      onsubmit: async (event) => {
        event.preventDefault();
        errors.replaceChildren();
        const key = input.value.trim();
        try {
          await api("/models", { key });
        } catch (error) {
          errors.replaceChildren(alertBox(`Sign-in failed: ${error.message}`));
          input.focus();
          return;
        }
        sessionStorage.setItem(KEY_STORAGE, key);
        navigate(location.pathname.startsWith("/ui/") && location.pathname !== "/ui/" ? location.pathname : "/ui/jobs");
      },
    },
    field("API key", input, "(ts-…, as `tuneserve up` or `tuneserve keys create` printed it)"),
    h("p", {}, h("button", { class: "primary", type: "submit", text: "Sign in" })),
    errors,
  );
  show(page, "Sign in", form);
  input.focus();
}

// ---------- files ----------

async function filesPage(page) {
  const report = h("div", { "aria-live": "polite" });
  const progress = h("progress", { max: 100, value: 0, hidden: true, "aria-label": "Upload progress" });
  const preview = h("div");
  const list = h("div", {}, h("p", { text: "Loading…" }));
  const purpose = h("select", { name: "purpose" }, ["fine-tune", "batch"].map((p) => h("option", { value: p, text: p })));
  const input = h("input", { type: "file", accept: ".jsonl,.json,.txt", name: "file" });
  const drop = h(
    "div",
    { class: "drop" },
    h("p", { text: "Drop a JSONL file here, or choose one:" }),
    h("label", { for: "upload-file", class: "hint", text: "Training file" }),
    input,
  );
  input.id = "upload-file";

  function upload(file) {
    report.replaceChildren();
    const form = new FormData();
    form.append("purpose", purpose.value);
    form.append("file", file, file.name);
    const request = new XMLHttpRequest();
    request.open("POST", "/v1/files");
    request.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    progress.hidden = false;
    progress.value = 0;
    request.upload.onprogress = (e) => { if (e.lengthComputable) progress.value = (100 * e.loaded) / e.total; };
    request.onload = () => {
      progress.value = 100;
      let body = null;
      try { body = JSON.parse(request.responseText); } catch { /* not JSON */ }
      if (request.status === 200) {
        report.replaceChildren(h("p", { class: "note", role: "status", text: `Uploaded ${body.filename} as ${body.id}.` }));
        refresh();
      } else {
        report.replaceChildren(alertBox(`${file.name} was refused. ${(body && body.error && body.error.message) || request.statusText}`));
      }
    };
    request.onerror = () => report.replaceChildren(alertBox("The upload failed: the service did not answer."));
    request.send(form);
  }

  input.addEventListener("change", () => input.files[0] && upload(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]);
  });

  async function showPreview(file) {
    const response = await api(`/files/${file.id}/content`, { raw: true });
    const lines = (await response.text()).split("\n").filter((l) => l.trim()).slice(0, 5);
    const pretty = lines.map((l) => { try { return JSON.stringify(JSON.parse(l), null, 1); } catch { return l; } });
    preview.replaceChildren(h("h2", { text: `First examples of ${file.filename}` }), h("pre", { tabindex: 0, text: pretty.join("\n\n") }));
  }

  async function refresh() {
    try {
      const files = (await api("/files")).data;
      list.replaceChildren(
        files.length
          ? table(
              ["File", "Name", "Purpose", "Size", "Status", "Created", ""],
              files.map((f) =>
                h("tr", {},
                  h("td", { text: f.id }), h("td", { text: f.filename }), h("td", { text: f.purpose }),
                  h("td", { text: `${(f.bytes / 1024).toFixed(1)} KB` }), h("td", { text: f.status }), h("td", { text: when(f.created_at) }),
                  h("td", {},
                    h("button", { type: "button", onclick: () => showPreview(f), text: "Preview", "aria-label": `Preview ${f.filename}` }), " ",
                    h("button", { type: "button", onclick: () => download(`/files/${f.id}/content`, f.filename), text: "Download", "aria-label": `Download ${f.filename}` }), " ",
                    h("button", {
                      type: "button", "aria-label": `Delete ${f.filename}`, text: "Delete",
                      onclick: async () => {
                        if (!confirm(`Delete ${f.filename}?`)) return;
                        try { await api(`/files/${f.id}`, { method: "DELETE" }); refresh(); }
                        catch (error) { report.replaceChildren(alertBox(error.message)); }
                      },
                    }),
                  ),
                )),
            )
          : h("p", { text: "No files yet." }),
      );
    } catch (error) {
      list.replaceChildren(alertBox(error.message));
    }
  }

  show(page, "Files", h("div", { class: "row" }, field("Purpose", purpose)), drop, progress, report, list, preview);
  refresh();
}

// ---------- jobs ----------

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

function jobDuration(job) {
  const end = job.finished_at || (FINAL.has(job.status) ? null : Date.now() / 1000);
  return end ? duration(end - job.created_at) : "";
}

async function jobsPage(page) {
  const params = new URLSearchParams(location.search);
  const status = h("select", { name: "status" }, ["", "queued", "running", "paused", "succeeded", "failed", "cancelled"].map((s) =>
    h("option", { value: s, text: s || "any", selected: s === (params.get("status") || "") })));
  const metadata = h("input", { name: "metadata", placeholder: "key=value", value: params.get("metadata") || "" });
  const list = h("div", {}, h("p", { text: "Loading…" }));
  const apply = () => {
    const query = new URLSearchParams();
    if (status.value) query.set("status", status.value);
    if (metadata.value.trim()) query.set("metadata", metadata.value.trim());
    history.replaceState(null, "", `/ui/jobs${query.toString() ? `?${query}` : ""}`);
    refresh();
  };
  status.addEventListener("change", apply);
  metadata.addEventListener("change", apply);

  async function refresh() {
    let path = "/fine_tuning/jobs";
    const [key, value] = metadata.value.split("=");
    if (key && value !== undefined) path += `?metadata[${encodeURIComponent(key.trim())}]=${encodeURIComponent(value.trim())}`;
    try {
      const jobs = (await listAll(path)).filter((j) => !status.value || j.status === status.value);
      list.replaceChildren(
        jobs.length
          ? table(["Job", "Status", "Model", "Fine-tuned model", "Created", "Duration"], jobs.map((j) =>
              h("tr", {},
                h("td", {}, link(`/ui/jobs/${j.id}`, j.id)), h("td", {}, statusBadge(j.status)), h("td", { text: j.model }),
                h("td", { text: j.fine_tuned_model || "" }), h("td", { text: when(j.created_at) }), h("td", { text: jobDuration(j) }))))
          : h("p", { text: "No jobs match." }),
      );
    } catch (error) {
      list.replaceChildren(alertBox(error.message));
    }
  }

  show(page, "Jobs",
    h("p", {}, link("/ui/jobs/new", "Create a fine-tuning job")),
    h("div", { class: "row", role: "search" }, field("Status", status), field("Metadata", metadata, "(key=value)")),
    list);
  await refresh();
  const timer = setInterval(refresh, 5 * POLL_MS);
  return () => clearInterval(timer);
}

async function newJobPage(page) {
  const [models, files] = await Promise.all([api("/models"), api("/files?purpose=fine-tune")]);
  const usable = files.data.filter((f) => f.status === "processed");
  const fileOptions = (optional) => [optional ? h("option", { value: "", text: "none" }) : null,
    ...usable.map((f) => h("option", { value: f.id, text: `${f.filename} (${f.id})` }))];
  const inputs = {
    model: h("select", { name: "model" }, models.data.map((m) => h("option", { value: m.id, text: m.id }))),
    training_file: h("select", { name: "training_file", required: true }, fileOptions(false)),
    validation_file: h("select", { name: "validation_file" }, fileOptions(true)),
    suffix: h("input", { name: "suffix", maxlength: 64, pattern: "[A-Za-z0-9._\\-]+" }),
    method: h("select", { name: "method" }, h("option", { value: "supervised", text: "supervised" }), h("option", { value: "dpo", text: "dpo (preference pairs)" })),
    n_epochs: h("input", { name: "n_epochs", placeholder: "auto", inputmode: "numeric" }),
    batch_size: h("input", { name: "batch_size", placeholder: "auto", inputmode: "numeric" }),
    learning_rate_multiplier: h("input", { name: "learning_rate_multiplier", placeholder: "auto", inputmode: "decimal" }),
    lora_r: h("input", { name: "lora_r", placeholder: "model default", inputmode: "numeric" }),
    lora_alpha: h("input", { name: "lora_alpha", placeholder: "model default", inputmode: "decimal" }),
    lora_dropout: h("input", { name: "lora_dropout", placeholder: "model default", inputmode: "decimal" }),
  };
  const errors = h("div", { "aria-live": "polite" });
  const number = (value) => (value.trim() === "" || value.trim() === "auto" ? undefined : Number(value));
  const form = h("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      errors.replaceChildren();
      const hyperparameters = {};
      for (const name of ["n_epochs", "batch_size", "learning_rate_multiplier"]) {
        const value = number(inputs[name].value);
        if (value !== undefined) hyperparameters[name] = value;
      }
      const body = { model: inputs.model.value, training_file: inputs.training_file.value };
      if (inputs.validation_file.value) body.validation_file = inputs.validation_file.value;
      if (inputs.suffix.value.trim()) body.suffix = inputs.suffix.value.trim();
      body.method = { type: inputs.method.value, [inputs.method.value]: { hyperparameters } };
      for (const name of ["lora_r", "lora_alpha", "lora_dropout"]) {
        const value = number(inputs[name].value);
        if (value !== undefined) body[name] = value;
      }
      try {
        const job = await api("/fine_tuning/jobs", { method: "POST", body });
        navigate(`/ui/jobs/${job.id}`);
      } catch (error) {
        errors.replaceChildren(alertBox(`${error.message}${error.param ? ` (${error.param})` : ""}`));
      }
    },
  },
  h("div", { class: "grid" },
    field("Base or fine-tuned model", inputs.model), field("Training file", inputs.training_file),
    field("Validation file", inputs.validation_file), field("Suffix", inputs.suffix), field("Method", inputs.method)),
  h("h2", { text: "Hyperparameters" }),
  h("p", { class: "hint", text: "Empty means auto: epochs, batch size and learning rate are chosen from the dataset size and the base model; the job page shows the values it resolved." }),
  h("div", { class: "grid" },
    field("Epochs", inputs.n_epochs), field("Batch size", inputs.batch_size), field("Learning rate multiplier", inputs.learning_rate_multiplier),
    field("LoRA rank", inputs.lora_r), field("LoRA alpha", inputs.lora_alpha), field("LoRA dropout", inputs.lora_dropout)),
  h("p", {}, h("button", { class: "primary", type: "submit", text: "Create job" })),
  errors);
  show(page, "New fine-tuning job", usable.length ? form : h("p", {}, "Upload a training file first: ", link("/ui/files", "Files")));
}

// The job's metric points, fetched incrementally: GET /v1/fine_tuning/jobs/{id}/metrics?after=<cursor>.
class MetricSeries {
  constructor(jobId) {
    this.jobId = jobId;
    this.after = null;
    this.columns = {};
    this.length = 0;
  }

  async update() {
    const query = this.after ? `?after=${encodeURIComponent(this.after)}` : "";
    const page = await api(`/fine_tuning/jobs/${this.jobId}/metrics${query}`);
    const n = page.data.step ? page.data.step.length : 0;
    for (const name of Object.keys(page.data)) {
      if (!this.columns[name]) this.columns[name] = new Array(this.length).fill(null);
    }
    for (const name of Object.keys(this.columns)) {
      const values = page.data[name];
      for (let i = 0; i < n; i++) this.columns[name].push(values ? values[i] : null);
    }
    this.length += n;
    if (page.last_id) this.after = page.last_id;
    return n;
  }
}

// Each curve is the first of its columns the job has (a DPO job's accuracy is its reward accuracy).
const CURVES = [
  { columns: ["train_loss"], label: "train loss", stroke: "#0b5cad", scale: "loss" },
  { columns: ["valid_loss"], label: "validation loss", stroke: "#d9480f", scale: "loss", points: true },
  { columns: ["full_valid_loss"], label: "full validation loss", stroke: "#862e9c", scale: "loss", points: true },
  { columns: ["train_mean_token_accuracy", "train_reward_accuracy"], label: "train accuracy", stroke: "#2b8a3e", scale: "accuracy" },
];

function lossChart(target, seriesList, { names = CURVES } = {}) {
  // One x axis (step); every series of every job on it.
  const width = () => Math.max(280, target.clientWidth || 600);
  const series = [{ label: "step" }];
  for (const s of seriesList) {
    for (const curve of names) {
      series.push({
        label: s.prefix ? `${s.prefix} ${curve.label}` : curve.label,
        stroke: s.color || curve.stroke,
        dash: s.color && curve.scale === "accuracy" ? [4, 4] : undefined,
        scale: curve.scale,
        spanGaps: true,
        points: { show: Boolean(curve.points) },
        width: 1.5,
      });
    }
  }
  const chart = new uPlot({
    width: width(),
    height: 320,
    series,
    scales: { x: { time: false }, accuracy: { range: [0, 1] } },
    axes: [{ label: "step" }, { scale: "loss", label: "loss" }, { scale: "accuracy", side: 1, label: "accuracy", grid: { show: false } }],
  }, chartData(seriesList, names), target);
  const resize = () => chart.setSize({ width: width(), height: 320 });
  window.addEventListener("resize", resize);
  chart.refresh = () => chart.setData(chartData(seriesList, names));
  chart.stop = () => { window.removeEventListener("resize", resize); chart.destroy(); };
  return chart;
}

function chartData(seriesList, names) {
  // uPlot wants one shared x array: the union of steps, each series null where it has no point.
  const steps = [...new Set(seriesList.flatMap((s) => s.columns.step || []))].sort((a, b) => a - b);
  const index = new Map(steps.map((step, i) => [step, i]));
  const data = [steps];
  for (const s of seriesList) {
    for (const curve of names) {
      const column = new Array(steps.length).fill(null);
      const values = curve.columns.map((name) => s.columns[name]).find(Boolean) || [];
      (s.columns.step || []).forEach((step, i) => { column[index.get(step)] = values[i] ?? null; });
      data.push(column);
    }
  }
  return data;
}

async function jobPage(page, jobId) {
  const facts = h("dl", { class: "facts" });
  const actions = h("div", { class: "row" });
  const message = h("div", { "aria-live": "polite" });
  const chartBox = h("div", { class: "chart", role: "img", "aria-label": "Loss and accuracy by step" });
  const events = h("div");
  const checkpoints = h("div");
  const results = h("div");
  const hyper = h("pre", { tabindex: 0 });
  show(page, `Job ${jobId}`, facts, actions, message, h("h2", { text: "Loss" }), chartBox,
    h("h2", { text: "Checkpoints" }), checkpoints, h("h2", { text: "Result files" }), results,
    h("h2", { text: "Hyperparameters (resolved)" }), hyper, h("h2", { text: "Latest events" }), events);

  const metrics = new MetricSeries(jobId);
  let chart = null;
  let timer = null;
  let lastStatus = null;

  const act = (verb) => async () => {
    try {
      await api(`/fine_tuning/jobs/${jobId}/${verb}`, { method: "POST" });
      message.replaceChildren(h("p", { role: "status", class: "note", text: `Asked to ${verb}.` }));
      refresh();
    } catch (error) {
      message.replaceChildren(alertBox(error.message));
    }
  };

  function showDetails(job) {
    const finish = job.estimated_finish && !FINAL.has(job.status) ? when(job.estimated_finish) : "";
    facts.replaceChildren(...[
      h("dt", { text: "Status" }), h("dd", {}, statusBadge(job.status), job.error ? ` ${job.error.message}` : ""),
      h("dt", { text: "Model" }), h("dd", { text: job.model }),
      h("dt", { text: "Method" }), h("dd", { text: job.method.type }),
      h("dt", { text: "Fine-tuned model" }), h("dd", {}, job.fine_tuned_model ? link(`/ui/playground?model=${encodeURIComponent(job.fine_tuned_model)}`, job.fine_tuned_model) : "not yet"),
      h("dt", { text: "Created" }), h("dd", { text: when(job.created_at) }),
      h("dt", { text: "Duration" }), h("dd", { text: jobDuration(job) }),
      finish ? h("dt", { text: "Estimated finish" }) : null, finish ? h("dd", { text: finish }) : null,
      h("dt", { text: "Trained tokens" }), h("dd", { text: job.trained_tokens ?? "" }),
      job.evaluation ? h("dt", { text: "Evaluation" }) : null,
      job.evaluation ? h("dd", { text: `exact match: base ${job.evaluation.base.exact_match}, fine-tuned ${job.evaluation.fine_tuned.exact_match}` }) : null,
    ].filter(Boolean));
    const allowed = { cancel: !FINAL.has(job.status), pause: ["queued", "running"].includes(job.status), resume: job.status === "paused" };
    actions.replaceChildren(...Object.entries(allowed).map(([verb, ok]) =>
      h("button", { type: "button", disabled: !ok, onclick: act(verb), text: verb[0].toUpperCase() + verb.slice(1) })));
    hyper.textContent = JSON.stringify(job.hyperparameters, null, 2);
  }

  async function showResults(job) {
    if (!job.result_files.length) {
      results.replaceChildren(h("p", { class: "hint", text: "When the job succeeds." }));
      return;
    }
    const items = await Promise.all(job.result_files.map(async (id) => {
      try {
        const file = await api(`/files/${id}`);
        return h("li", {}, h("button", { type: "button", class: "link", onclick: () => download(`/files/${id}/content`, file.filename), text: `Download ${file.filename}` }));
      } catch (error) {
        return h("li", { text: `${id}: ${error.status === 404 ? "deleted" : error.message}` });
      }
    }));
    results.replaceChildren(h("ul", {}, items));
  }

  async function showChart() {
    const added = await metrics.update();
    if (!chart && metrics.length) {
      chartBox.replaceChildren();
      chart = lossChart(chartBox, [metrics]);
      // For measurements (benchmarks/bench_dashboard.py): the frame after the chart's first draw.
      requestAnimationFrame(() => performance.mark("chart-painted"));
    } else if (chart && added) {
      chart.refresh();
    } else if (!metrics.length) {
      chartBox.replaceChildren(h("p", { class: "hint", text: "No steps yet." }));
    }
    chartBox.dataset.points = metrics.length;
    chartBox.setAttribute("aria-label", `Loss and accuracy by step: ${metrics.length} steps so far`);
  }

  async function showEvents() {
    const eventPage = await api(`/fine_tuning/jobs/${jobId}/events?limit=20`);
    events.replaceChildren(table(["Time", "Level", "Message"], eventPage.data.map((e) =>
      h("tr", {}, h("td", { text: when(e.created_at) }), h("td", { text: e.level }), h("td", { text: e.message, style: "white-space: normal" })))));
  }

  async function showCheckpoints() {
    const checkpointPage = await api(`/fine_tuning/jobs/${jobId}/checkpoints?limit=100`);
    checkpoints.replaceChildren(checkpointPage.data.length
      ? table(["Step", "Model", "Train loss", "Validation loss", ""], checkpointPage.data.map((c) =>
          h("tr", {}, h("td", { text: c.step_number }), h("td", { text: c.fine_tuned_model_checkpoint }),
            h("td", { text: c.metrics.train_loss?.toFixed(4) ?? "" }), h("td", { text: c.metrics.full_valid_loss?.toFixed(4) ?? "" }),
            h("td", {}, link(`/ui/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}`, "Chat")))))
      : h("p", { class: "hint", text: "None yet." }));
  }

  // One refresh at a time (the timer and a button may both ask): two at once would fetch the same new points twice.
  let refreshing = null;
  function refresh() {
    refreshing ??= refreshOnce().finally(() => { refreshing = null; });
    return refreshing;
  }

  async function refreshOnce() {
    let job;
    try {
      job = await api(`/fine_tuning/jobs/${jobId}`);
    } catch (error) {
      message.replaceChildren(alertBox(error.message));
      if (error.status === 404) stopPolling(); // no such job (any more): nothing will change
      return;
    }
    showDetails(job);
    // Each part on its own: one that fails leaves the others showing. Result files are listed once final.
    const parts = [showChart(), showEvents(), showCheckpoints()];
    if (!FINAL.has(lastStatus)) parts.push(showResults(job));
    const failed = (await Promise.allSettled(parts)).filter((r) => r.status === "rejected");
    message.replaceChildren(...failed.slice(0, 1).map((r) => alertBox(r.reason.message)));
    if (FINAL.has(job.status) && lastStatus !== null && !FINAL.has(lastStatus)) await showChart(); // its last steps
    lastStatus = job.status;
    if (FINAL.has(job.status)) stopPolling();
  }

  function stopPolling() {
    if (timer) clearInterval(timer);
    timer = null;
    lastStatus ??= "gone";
  }

  await refresh();
  if (!FINAL.has(lastStatus) && lastStatus !== "gone") timer = setInterval(refresh, POLL_MS);
  return () => { if (timer) clearInterval(timer); if (chart) chart.stop(); };
}

// ---------- compare ----------

const PALETTE = ["#0b5cad", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#087f8c", "#c2255c", "#5f3dc4"];

async function comparePage(page) {
  const chosen = new Set((new URLSearchParams(location.search).get("jobs") || "").split(",").filter(Boolean));
  const jobs = await listAll("/fine_tuning/jobs");
  const chartBox = h("div", { class: "chart", role: "img", "aria-label": "Training loss of the chosen jobs by step" });
  const boxes = jobs.map((j) => h("input", { type: "checkbox", value: j.id, checked: chosen.has(j.id), id: `cmp-${j.id}` }));
  let chart = null;
  let drawing = 0; // the latest choice's draw; an earlier one still loading gives way to it
  async function draw() {
    const mine = ++drawing;
    const ids = boxes.filter((b) => b.checked).map((b) => b.value);
    history.replaceState(null, "", `/ui/compare${ids.length ? `?jobs=${ids.join(",")}` : ""}`);
    const series = await Promise.all(ids.map(async (id, i) => {
      const s = new MetricSeries(id);
      await s.update();
      return Object.assign(s, { prefix: id, color: PALETTE[i % PALETTE.length] });
    }));
    if (mine !== drawing || !page.alive) return;
    if (chart) { chart.stop(); chart = null; }
    chartBox.replaceChildren();
    if (!ids.length) chartBox.append(h("p", { class: "hint", text: "Choose jobs to compare." }));
    else chart = lossChart(chartBox, series, { names: CURVES.slice(0, 2) });
  }
  boxes.forEach((b) => b.addEventListener("change", draw));
  show(page, "Compare jobs",
    h("fieldset", {}, h("legend", { text: "Jobs" }),
      jobs.length ? jobs.map((j, i) => h("div", {}, boxes[i], " ", h("label", { for: boxes[i].id, style: "display:inline", text: `${j.id} · ${j.status} · ${j.model}` })))
        : h("p", { text: "No jobs yet." })),
    chartBox);
  await draw();
  return () => chart && chart.stop();
}

// ---------- models ----------

async function modelsPage(page) {
  const message = h("div", { "aria-live": "polite" });
  const list = h("div");
  async function refresh() {
    const [models, jobs] = await Promise.all([api("/models"), listAll("/fine_tuning/jobs")]);
    const jobOf = new Map(jobs.filter((j) => j.fine_tuned_model).map((j) => [j.fine_tuned_model, j.id]));
    list.replaceChildren(table(["Model", "Owned by", "Created", "Job", ""], models.data.map((m) => {
      const fineTuned = m.id.startsWith("ft:");
      const job = jobOf.get(m.id.replace(/:ckpt-step-\d+$/, "")); // a checkpoint's model is its job's too
      const safe = m.id.replace(/[^A-Za-z0-9._-]+/g, "_");
      return h("tr", {},
        h("td", { text: m.id }), h("td", { text: m.owned_by }), h("td", { text: when(m.created) }),
        h("td", {}, job ? link(`/ui/jobs/${job}`, job) : ""),
        h("td", {},
          link(`/ui/playground?model=${encodeURIComponent(m.id)}`, "Chat"), " ",
          fineTuned ? h("button", { type: "button", text: "Download adapter", "aria-label": `Download the adapter of ${m.id}`, onclick: () => download(`/models/${encodeURIComponent(m.id)}/adapter`, `${safe}.tar`) }) : null, " ",
          fineTuned ? h("button", {
            type: "button", text: "Delete", "aria-label": `Delete ${m.id}`,
            onclick: async () => {
              if (!confirm(`Delete ${m.id}?`)) return;
              try { await api(`/models/${encodeURIComponent(m.id)}`, { method: "DELETE" }); refresh(); }
              catch (error) { message.replaceChildren(alertBox(error.message)); }
            },
          }) : null));
    })));
  }
  show(page, "Models", message, list);
  await refresh();
}

// ---------- playground ----------

async function* streamChat(model, messages, signal) {
  // /v1/chat/completions with stream: true, read as server-sent events.
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    signal,
    headers: { Authorization: `Bearer ${apiKey()}`, "Content-Type": "application/json" },
    body: JSON.stringify({ model, messages, stream: true, max_tokens: 256 }),
  });
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch { /* not JSON */ }
    throw new ApiError(response.status, body);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) yield delta.content;
      }
    }
  }
}

async function playgroundPage(page) {
  const models = (await api("/models")).data.map((m) => m.id);
  const wanted = new URLSearchParams(location.search).get("model");
  const options = (selected, none) => [none ? h("option", { value: "", text: "none" }) : null,
    ...models.map((id) => h("option", { value: id, text: id, selected: id === selected }))];
  const left = h("select", { name: "model" }, options(wanted || models[0], false));
  const right = h("select", { name: "compare_model" }, options(null, true));
  const prompt = h("textarea", { name: "prompt", rows: 3, cols: 60, required: true });
  const sides = [{ select: left, box: h("div", { class: "chat", "aria-live": "polite" }), history: [] },
    { select: right, box: h("div", { class: "chat", "aria-live": "polite" }), history: [] }];
  const controller = new AbortController();

  async function answer(side, text) {
    const model = side.select.value;
    if (!model) return;
    side.history.push({ role: "user", content: text });
    side.box.append(h("p", { class: "msg user", text: `You: ${text}` }));
    const out = h("p", { class: "msg assistant", "data-model": model });
    side.box.append(out);
    let reply = "";
    try {
      for await (const piece of streamChat(model, side.history, controller.signal)) {
        reply += piece;
        out.textContent = reply;
      }
      side.history.push({ role: "assistant", content: reply });
    } catch (error) {
      if (error.name !== "AbortError") side.box.append(alertBox(error.message));
    }
  }

  const form = h("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      const text = prompt.value.trim();
      if (!text) return;
      prompt.value = "";
      await Promise.all(sides.map((side) => answer(side, text)));
    },
  },
  h("div", { class: "row" }, field("Model", left), field("Side by side with", right)),
  field("Message", prompt),
  h("p", {}, h("button", { class: "primary", type: "submit", text: "Send" }), " ",
    h("button", { type: "button", text: "Clear", onclick: () => sides.forEach((s) => { s.history = []; s.box.replaceChildren(); }) })));
  for (const side of sides) side.select.addEventListener("change", () => { side.history = []; side.box.replaceChildren(); });
  show(page, "Playground", form, h("div", { class: "sides" }, sides.map((s) => s.box)));
  return () => controller.abort();
}

// ---------- routing ----------

const ROUTES = [
  [/^\/ui\/files$/, filesPage],
  [/^\/ui\/jobs\/new$/, newJobPage],
  [/^\/ui\/jobs\/([^/]+)$/, jobPage],
  [/^\/ui\/(jobs)?$/, jobsPage],
  [/^\/ui\/compare$/, comparePage],
  [/^\/ui\/models$/, modelsPage],
  [/^\/ui\/playground$/, playgroundPage],
];

// `moveFocus`: after a navigation, focus goes to the new page's content (not on first load: a reader starts at the top).
async function render(message, moveFocus = false) {
  current.alive = false;
  current.stop();
  const page = (current = { alive: true, stop: () => {} });
  if (location.pathname === "/") history.replaceState(null, "", "/ui/");
  if (!apiKey()) return signInPage(page, message);
  document.getElementById("nav").hidden = false;
  for (const a of document.querySelectorAll("#nav a")) {
    const here = location.pathname === a.pathname || (a.pathname === "/ui/jobs" && location.pathname.startsWith("/ui/jobs"));
    if (here) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const route = ROUTES.find(([pattern]) => pattern.test(location.pathname));
  if (!route) return show(page, "Not found", h("p", {}, "No such page. ", link("/ui/jobs", "Jobs")));
  try {
    const stop = await route[1](page, ...location.pathname.match(route[0]).slice(1).filter((x) => x && x !== "jobs"));
    if (typeof stop === "function") {
      if (page.alive) page.stop = stop;
      else stop();
    }
  } catch (error) {
    show(page, "Something went wrong", alertBox(error.message));
  }
  if (moveFocus && page.alive) view.focus();
}

function navigate(path, message) {
  history.pushState(null, "", path);
  render(message, true);
}

document.addEventListener("click", (event) => {
  const a = event.target.closest("a");
  if (!a || a.origin !== location.origin || !a.pathname.startsWith("/ui/") || a.target || event.ctrlKey || event.metaKey) return;
  event.preventDefault();
  navigate(a.pathname + a.search);
});
window.addEventListener("popstate", () => render(undefined, true));
document.getElementById("sign-out").addEventListener("click", () => signOut());
render();
