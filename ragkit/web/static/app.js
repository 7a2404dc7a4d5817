// ragkit's page: answers stream in over server-sent events; the status page runs and follows an index run.
"use strict";

const $ = (id) => document.getElementById(id);

function location_(c) {
  const lines = c.start_line === c.end_line ? `${c.start_line}` : `${c.start_line}-${c.end_line}`;
  if (c.page !== null && c.page !== undefined && c.end_page !== null && c.end_page !== undefined && c.end_page !== c.page) {
    return `${c.path} p.${c.page}:${c.start_line}–p.${c.end_page}:${c.end_line}`;
  }
  return c.page !== null && c.page !== undefined ? `${c.path} p.${c.page}:${lines}` : `${c.path}:${lines}`;
}

function documentLink(c, evidence) {
  const p = new URLSearchParams({ path: c.path, line: c.start_line });
  const crossesPage = c.page !== null && c.page !== undefined && c.end_page !== null && c.end_page !== undefined && c.end_page !== c.page;
  p.set("end", crossesPage ? -1 : c.end_line);  // -1: to the end of the page
  if (c.page !== null && c.page !== undefined) p.set("page", c.page);
  if (c.chunk_id) p.set("chunk", c.chunk_id);
  if (evidence && evidence.length) p.set("ev", evidence.map((e) => `${e.start}-${e.end}`).join(","));
  return `/document?${p.toString()}#L${c.start_line}`;
}

function renderAnswer(answer, hits) {
  const text = $("answer-text");
  const known = new Set(answer.citations.map((c) => c.n));
  text.textContent = "";
  let at = 0;
  for (const m of answer.answer.matchAll(/\[(\d+)\]/g)) {
    text.append(answer.answer.slice(at, m.index));
    const n = Number(m[1]);
    if (known.has(n)) {
      const a = document.createElement("a");
      a.className = "cite"; a.href = `#cite-${n}`; a.textContent = m[0];
      text.append(a);
    } else {
      text.append(m[0]);
    }
    at = m.index + m[0].length;
  }
  text.append(answer.answer.slice(at));
  const list = $("citations");
  list.textContent = "";
  for (const c of answer.citations) {
    const hit = hits.find((h) => h.chunk_id === c.chunk_id);
    const li = document.createElement("li");
    li.id = `cite-${c.n}`; li.value = c.n;
    const a = document.createElement("a");
    a.href = documentLink(c, hit ? hit.evidence : []);
    a.textContent = location_(c);
    li.append(a);
    if (c.heading) {
      const h = document.createElement("span");
      h.className = "dim"; h.textContent = " " + c.heading;
      li.append(h);
    }
    list.append(li);
  }
  $("answer-state").textContent = answer.reader + (answer.model ? ` · ${answer.model.split("/").pop()}` : "");
}

function showError(message) {
  let box = $("error");
  if (!box) {
    box = document.createElement("p");
    box.id = "error"; box.className = "error";
    $("query-form").after(box);
  }
  box.textContent = message;
}

function ask(form) {
  const params = new URLSearchParams(new FormData(form));
  params.delete("do");
  for (const key of [...params.keys()]) if (!params.get(key)) params.delete(key);
  history.replaceState(null, "", `/?${params.toString()}&do=ask`);
  const old = $("error"); if (old) old.remove();
  const results = $("results"); if (results) results.remove();
  $("answer-box").hidden = false;
  $("answer-text").textContent = "";
  $("citations").textContent = "";
  $("answer-state").textContent = "reading…";
  let hits = [];
  let finished = false;
  const source = new EventSource(`/api/ask/stream?${params.toString()}`);
  source.addEventListener("hits", (e) => { hits = JSON.parse(e.data); $("answer-state").textContent = "writing…"; });
  source.addEventListener("token", (e) => { $("answer-text").append(JSON.parse(e.data)); });
  source.addEventListener("answer", (e) => { finished = true; source.close(); renderAnswer(JSON.parse(e.data), hits); });
  source.addEventListener("failure", (e) => {
    finished = true; source.close();
    $("answer-state").textContent = "";
    showError(JSON.parse(e.data).error);
  });
  source.onerror = () => {
    if (!finished) { source.close(); $("answer-state").textContent = ""; showError("The connection to ragkit was lost."); }
  };
}

function followIndexRun() {
  const bar = $("index-bar"), stage = $("index-stage"), message = $("index-message");
  $("index-progress").hidden = false;
  const poll = async () => {
    const job = await (await fetch("/api/index")).json();
    bar.max = job.total || 1; bar.value = job.done;
    stage.textContent = job.stage ? `${job.stage} ${job.done}/${job.total}` : "";
    message.textContent = job.message;
    if (job.state === "running") setTimeout(poll, 400);
    else { $("index-progress").hidden = true; if (job.state === "done") setTimeout(() => location.reload(), 600); }
  };
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  const form = $("query-form");
  if (form) {
    form.addEventListener("submit", (e) => {
      if (e.submitter && e.submitter.value === "ask") { e.preventDefault(); ask(form); }
    });
  }
  const button = $("index-button");
  if (button) {
    button.addEventListener("click", async () => {
      const response = await fetch("/api/index", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
      const body = await response.json();
      if (!response.ok) { $("index-message").textContent = body.error; return; }
      followIndexRun();
    });
    if (!$("index-progress").hidden) followIndexRun();
  }
  const target = location.hash && document.getElementById(location.hash.slice(1));
  if (target) target.scrollIntoView({ block: "start" });  // with the scroll margin the stylesheet leaves above
});
