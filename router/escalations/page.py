"""The reviewer page served at ``/review``: one HTML document with inline CSS and vanilla JS.

The key a reviewer types is kept in ``sessionStorage`` and sent as ``Authorization: Bearer`` to
the ``/v1/escalations`` API. Everything that comes from an escalation (messages, model, user,
metadata, reasons) is put on the page with ``textContent`` only; the script builds elements
with ``createElement`` and never assigns HTML strings (no ``innerHTML`` and friends), and the
``Content-Security-Policy`` header allows only this page's own script and style (by nonce).
``__NONCE__`` is replaced per response.
"""

from __future__ import annotations

__all__ = ["REVIEW_PAGE", "render_review_page"]

REVIEW_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Review queue · sparsity-router</title>
<style nonce="__NONCE__">
:root {
  --bg: #f5f6f8; --panel: #fff; --ink: #1d2330; --muted: #6b7385; --line: #e3e6ec;
  --accent: #2f5bea; --accent-ink: #fff; --ok: #1f8a4c; --warn: #b26a00; --bad: #c0392b;
  --user: #eef2ff; --assistant: #f0faf3; --system: #f6f6f6;
}
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink); background: var(--bg); }
header { display: flex; align-items: center; gap: 16px; padding: 12px 24px;
  background: #1d2330; color: #fff; }
header h1 { font-size: 16px; margin: 0; font-weight: 600; letter-spacing: .2px; }
header .sub { color: #aab3c5; font-size: 13px; }
header .spacer { flex: 1; }
button { font: inherit; border: 1px solid var(--line); background: #fff; color: var(--ink);
  padding: 6px 12px; border-radius: 6px; cursor: pointer; }
button:hover { border-color: #c5cad6; }
button.primary { background: var(--accent); color: var(--accent-ink);
  border-color: var(--accent); }
button.danger { color: var(--bad); border-color: #efc7c2; }
button:disabled { opacity: .5; cursor: default; }
header button { background: transparent; color: #fff; border-color: #3b4457; }
input, textarea { font: inherit; border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 10px; width: 100%; background: #fff; color: var(--ink); }
textarea { min-height: 110px; resize: vertical; }
#login { max-width: 380px; margin: 12vh auto; background: var(--panel); padding: 28px;
  border-radius: 10px; border: 1px solid var(--line);
  box-shadow: 0 6px 24px rgba(20,30,60,.06); }
#login h2 { margin: 0 0 6px; font-size: 18px; }
#login p { margin: 0 0 16px; color: var(--muted); }
#login form { display: grid; gap: 12px; }
#login-error { color: var(--bad); min-height: 1.2em; }
#app { display: grid; grid-template-columns: minmax(420px, 46%) 1fr; gap: 16px;
  padding: 16px 24px; align-items: start; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 10px;
  overflow: hidden; }
.panel > .bar { display: flex; align-items: center; gap: 8px; padding: 10px 14px;
  border-bottom: 1px solid var(--line); }
.panel > .bar h2 { font-size: 14px; margin: 0; flex: 1; }
.filters button { padding: 3px 10px; font-size: 12px; border-radius: 999px; }
.filters button.on { background: var(--ink); color: #fff; border-color: var(--ink); }
table { width: 100%; border-collapse: collapse; table-layout: fixed; }
th, td { text-align: left; padding: 8px 10px; border-bottom: 1px solid var(--line);
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
th:nth-child(1) { width: 64px; } th:nth-child(2), th:nth-child(3) { width: 66px; }
th:nth-child(4) { width: 96px; } th:nth-child(6) { width: 96px; }
th:first-child, td:first-child { padding-left: 14px; }
th { font-size: 12px; color: var(--muted); font-weight: 500; background: #fafbfc; }
td.num { font-variant-numeric: tabular-nums; }
tbody tr { cursor: pointer; }
tbody tr:hover { background: #f7f9ff; }
tbody tr.selected { background: #eaf0ff; }
.preview { color: var(--muted); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px;
  background: #eef0f4; color: var(--muted); }
.badge.pending { background: #fff4e0; color: var(--warn); }
.badge.claimed { background: #e8efff; color: var(--accent); }
.badge.answered { background: #e6f6ec; color: var(--ok); }
.badge.rejected, .badge.expired { background: #fbeaea; color: var(--bad); }
.empty { padding: 28px 14px; color: var(--muted); text-align: center; }
#detail .body { padding: 14px; display: grid; gap: 14px; }
#conversation { display: grid; gap: 8px; }
.facts { margin: 0; display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px;
  font-size: 13px; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; word-break: break-all; }
.msg { border-radius: 8px; padding: 10px 12px; border: 1px solid var(--line); }
.msg .role { font-size: 11px; text-transform: uppercase; letter-spacing: .6px; color: var(--muted);
  margin-bottom: 4px; }
.msg .text { white-space: pre-wrap; word-break: break-word; }
.msg.user { background: var(--user); }
.msg.assistant { background: var(--assistant); }
.msg.system { background: var(--system); }
.actions { display: grid; gap: 8px; }
.row { display: flex; gap: 8px; align-items: center; }
.row input { flex: 1; }
.hint { color: var(--muted); font-size: 12px; }
#toast { position: fixed; right: 20px; bottom: 20px; background: #1d2330; color: #fff;
  padding: 10px 14px; border-radius: 8px; opacity: 0; transition: opacity .2s; max-width: 420px; }
#toast.show { opacity: .95; }
#toast.bad { background: var(--bad); }
[hidden] { display: none !important; }
</style>
</head>
<body>
<header>
  <h1>sparsity-router</h1><span class="sub">Human review queue</span>
  <span class="spacer"></span>
  <span class="sub" id="whoami"></span>
  <button id="logout" hidden>Log out</button>
</header>

<section id="login">
  <h2>Reviewer sign-in</h2>
  <p>Paste a key with scope <b>reviewer</b> or <b>admin</b>. It is kept in this tab only.</p>
  <form id="login-form" autocomplete="off">
    <input id="token" type="password" placeholder="Reviewer key" aria-label="Reviewer key">
    <button id="login-button" class="primary" type="submit">Sign in</button>
    <div id="login-error" role="alert"></div>
  </form>
</section>

<main id="app" hidden>
  <section class="panel" id="queue-panel">
    <div class="bar">
      <h2>Queue <span class="badge" id="count">0</span></h2>
      <div class="filters" id="filters">
        <button data-status="open" class="on">Open</button>
        <button data-status="answered">Answered</button>
        <button data-status="rejected,expired">Closed</button>
        <button data-status="all">All</button>
      </div>
    </div>
    <table id="queue">
      <thead><tr><th>Age</th><th>Score</th><th>Pct</th><th>Rule</th><th>Request</th><th>Status</th></tr></thead>
      <tbody></tbody>
    </table>
    <div class="empty" id="queue-empty">Nothing waiting. New escalations appear here.</div>
  </section>

  <section class="panel" id="detail">
    <div class="bar"><h2 id="detail-title">Select an escalation</h2>
      <span class="badge" id="detail-status" hidden></span></div>
    <div class="body" id="detail-body" hidden>
      <dl class="facts" id="facts"></dl>
      <div id="conversation"></div>
      <div class="actions" id="actions">
        <div class="row"><button id="claim">Claim</button>
          <span class="hint" id="claim-hint"></span></div>
        <textarea id="answer-text"
          placeholder="Write the answer the client will receive"></textarea>
        <div class="row"><button id="send-answer" class="primary">Send answer</button></div>
        <div class="row"><input id="reject-reason" placeholder="Reason for rejecting (optional)">
          <button id="reject" class="danger">Reject</button></div>
      </div>
      <div id="outcome" hidden></div>
    </div>
  </section>
</main>
<div id="toast" role="status"></div>

<script nonce="__NONCE__">
"use strict";
(function () {
  const KEY = "sparsity-router.review-token";
  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(KEY) || "";
  let filter = "open";
  let selected = null;
  let shownVersion = "";
  let timer = null;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function toast(text, bad) {
    const t = $("toast");
    t.textContent = text;
    t.className = "show" + (bad ? " bad" : "");
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.className = ""; }, 3000);
  }

  async function api(path, body) {
    const init = { headers: { "authorization": "Bearer " + token } };
    if (body !== undefined) {
      init.method = "POST";
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      const msg = data && data.error ? data.error.message : "HTTP " + r.status;
      const err = new Error(msg);
      err.status = r.status;
      throw err;
    }
    return data;
  }

  function age(seconds) {
    const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h";
    return Math.floor(s / 86400) + " d";
  }
  const fmt = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
  const pct = (p) => (p === null || p === undefined ? "–" : (100 * p).toFixed(1) + "%");

  function partsText(content) {
    if (content === null || content === undefined) return "";
    if (typeof content === "string") return content;
    if (Array.isArray(content)) {
      return content.map((p) => (p && typeof p.text === "string" ? p.text : JSON.stringify(p)))
        .join("\\n");
    }
    return JSON.stringify(content);
  }

  function preview(e) {
    const msgs = Array.isArray(e.messages) ? e.messages : [];
    const last = msgs.filter((m) => m && m.role === "user").pop() || msgs[msgs.length - 1];
    const text = last ? partsText(last.content) : partsText(e.prompt);
    return text.length > 80 ? text.slice(0, 80) + "…" : text;
  }

  function renderQueue(items) {
    const body = $("queue").tBodies[0];
    const rows = items.map((e) => {
      const tr = el("tr");
      tr.dataset.id = e.id;
      if (e.id === selected) tr.className = "selected";
      tr.append(el("td", "num", age(e.created)), el("td", "num", fmt(e.score, 3)),
        el("td", "num", pct(e.percentile)), el("td", null, e.rule),
        el("td", "preview", preview(e)));
      const st = el("td");
      st.append(el("span", "badge " + e.status, e.status));
      tr.append(st);
      tr.addEventListener("click", () => select(e.id));
      return tr;
    });
    body.replaceChildren(...rows);
    $("queue-empty").hidden = items.length > 0;
    $("count").textContent = String(items.length);
  }

  function fact(list, name, value) {
    list.append(el("dt", null, name), el("dd", null, value === null || value === undefined ||
      value === "" ? "–" : value));
  }

  function renderDetail(e) {
    $("detail-title").textContent = "Escalation " + e.id;
    const badge = $("detail-status");
    badge.hidden = false;
    badge.className = "badge " + e.status;
    badge.textContent = e.status;
    $("detail-body").hidden = false;
    const facts = $("facts");
    facts.replaceChildren();
    const when = new Date(e.created * 1000).toLocaleString();
    fact(facts, "Created", when + " (" + age(e.created) + " ago)");
    fact(facts, "Rule", e.rule + " (policy " + e.policy + ")");
    fact(facts, "Score", fmt(e.score, 4));
    fact(facts, "Percentile", pct(e.percentile));
    fact(facts, "Model", e.model);
    fact(facts, "User", e.user);
    const meta = e.metadata && Object.keys(e.metadata).length ? JSON.stringify(e.metadata) : "";
    fact(facts, "Metadata", meta);
    fact(facts, "Mode", e.mode);
    if (e.claimed_by) fact(facts, "Claimed by", e.claimed_by);
    const conv = $("conversation");
    const msgs = Array.isArray(e.messages) ? e.messages
      : [{ role: "user", content: partsText(e.prompt) }];
    conv.replaceChildren(...msgs.map((m) => {
      const role = m && typeof m.role === "string" ? m.role : "message";
      const box = el("div", "msg " + (["user", "assistant", "system"].includes(role) ? role : ""));
      box.append(el("div", "role", role), el("div", "text", partsText(m ? m.content : "")));
      return box;
    }));
    const open = e.status === "pending" || e.status === "claimed";
    $("actions").hidden = !open;
    $("claim").disabled = e.status === "claimed";
    $("claim-hint").textContent = e.status === "claimed"
      ? "Claimed by " + e.claimed_by + " until " +
        new Date(e.lease_until * 1000).toLocaleTimeString()
      : "Claim it so that nobody else answers at the same time.";
    const out = $("outcome");
    out.hidden = open;
    out.replaceChildren();
    if (!open) {
      const text = e.status === "answered" ? e.answer : e.reason;
      const box = el("div", "msg assistant");
      box.append(el("div", "role", e.status + (e.answered_by ? " by " + e.answered_by : "")),
        el("div", "text", text || ""));
      out.append(box);
    }
  }

  async function select(id) {
    selected = id;
    shownVersion = "";
    $("answer-text").value = "";
    $("reject-reason").value = "";
    for (const tr of $("queue").tBodies[0].rows) {
      tr.className = tr.dataset.id === id ? "selected" : "";
    }
    await refreshDetail();
  }

  async function refreshDetail() {
    if (!selected) return;
    const e = await api("/v1/escalations/" + encodeURIComponent(selected));
    const version = e.status + ":" + e.updated + ":" + (e.lease_until || "");
    if (version !== shownVersion) {
      shownVersion = version;
      renderDetail(e);
    }
  }

  async function refresh() {
    try {
      const list = await api("/v1/escalations?status=" + encodeURIComponent(filter));
      renderQueue(list.data);
      await refreshDetail();
    } catch (err) {
      if (err.status === 401 || err.status === 403) { logout(err.message); return; }
      toast(err.message, true);
    }
  }

  async function act(op, body) {
    if (!selected) return;
    try {
      const e = await api("/v1/escalations/" + encodeURIComponent(selected) + "/" + op, body);
      shownVersion = "";
      renderDetail(e);
      toast(op === "claim" ? "Claimed" : op === "answer" ? "Answer sent" : "Rejected");
      refresh();
    } catch (err) {
      toast(err.message, true);
    }
  }

  function start() {
    $("login").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = false;
    refresh();
    clearInterval(timer);
    timer = setInterval(refresh, 2000);
  }

  function logout(message) {
    clearInterval(timer);
    token = "";
    sessionStorage.removeItem(KEY);
    $("app").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
  }

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    try {
      await api("/v1/escalations?status=open&limit=1");
      sessionStorage.setItem(KEY, token);
      $("token").value = "";
      $("login-error").textContent = "";
      start();
    } catch (err) {
      token = "";
      $("login-error").textContent = err.message;
    }
  });
  $("logout").addEventListener("click", () => logout(""));
  $("claim").addEventListener("click", () => act("claim", {}));
  $("send-answer").addEventListener("click", () => {
    const content = $("answer-text").value;
    if (!content.trim()) { toast("Write an answer first", true); return; }
    act("answer", { content: content });
  });
  $("reject").addEventListener("click", () => act("reject", { reason: $("reject-reason").value }));
  for (const b of $("filters").querySelectorAll("button")) {
    b.addEventListener("click", () => {
      filter = b.dataset.status;
      for (const o of $("filters").querySelectorAll("button")) o.className = o === b ? "on" : "";
      refresh();
    });
  }
  if (token) start();
})();
</script>
</body>
</html>
"""


def render_review_page(nonce: str) -> str:
    return REVIEW_PAGE.replace("__NONCE__", nonce)
