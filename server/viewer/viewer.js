// logitstore store browser: plain JavaScript, no framework, no build step, no network but
// this server. Data comes from /v1/stores and /v1/stores/NAME/view/* (docs/PROTOCOL.md §6).
// Everything a store holds (token text, names, provenance) enters the page through
// textContent only, never as markup.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const AUTH = document.querySelector('meta[name="logitstore-auth"]').content;
  const TOKEN_KEY = "logitstore-token";
  const WINDOW = 512; // positions per request while scrolling (the server allows 2048)
  const LIST = 32; // candidates listed per position
  const SCALES = {
    entropy: { max: 4, unit: "nats", what: "teacher entropy" },
    surprisal: { max: 8, unit: "nats", what: "surprisal of the next token" },
    residual: { max: 1, unit: "", what: "mass outside the stored candidates" },
    kl: { max: 1, unit: "nats", what: "KL(this ‖ compared)" },
  };

  const S = {
    store: null, stores: [], measure: "entropy", compare: "", seq: null,
    lo: 0, hi: 0, values: new Map(), pinned: null, shown: null, gen: 0, loading: false,
    cache: new Map(), search: null,
  };

  class ApiError extends Error {}

  // ---- requests and the token ----------------------------------------------------------
  let asking = null;
  function askToken(reason) {
    if (asking) return asking;
    asking = new Promise((resolve) => {
      const dialog = $("auth");
      $("auth-error").textContent = reason;
      $("token").value = "";
      $("auth-form").onsubmit = (ev) => {
        ev.preventDefault();
        sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
        dialog.close();
        asking = null;
        resolve();
      };
      dialog.oncancel = (ev) => ev.preventDefault(); // Escape: the page has nothing to show without a token
      dialog.showModal();
    });
    return asking;
  }

  async function api(path) {
    for (;;) {
      const token = sessionStorage.getItem(TOKEN_KEY);
      if (AUTH === "bearer" && !token) {
        await askToken("");
        continue;
      }
      const headers = token ? { Authorization: "Bearer " + token } : {};
      let r;
      try {
        r = await fetch(path, { headers });
      } catch (e) {
        if (e instanceof TypeError && token && /[^\x20-\x7e]/.test(token)) {
          sessionStorage.removeItem(TOKEN_KEY); // not a header value: cannot be a token
          await askToken("A token is printable ASCII; that one is not.");
          continue;
        }
        throw new ApiError("the server cannot be reached: " + e.message);
      }
      if (r.status === 401 || r.status === 403) {
        sessionStorage.removeItem(TOKEN_KEY);
        await askToken(r.status === 403 ? "The server refused that token." : "");
        continue;
      }
      let body;
      try {
        body = await r.json();
      } catch (e) {
        throw new ApiError(`HTTP ${r.status}: not a logitstore answer`);
      }
      if (!r.ok) throw new ApiError(body.error ? body.error.message : `HTTP ${r.status}`);
      return body;
    }
  }

  const storeUrl = (name, rest = "") => `/v1/stores/${encodeURIComponent(name)}${rest}`;

  function say(text, isError = false) {
    const m = $("message");
    m.textContent = text;
    m.classList.toggle("error", isError);
    m.hidden = !text;
  }

  // ---- text and colour -----------------------------------------------------------------
  // Control, format and direction characters are shown as escapes, so a token can neither
  // reorder its neighbours nor hide itself.
  function visible(text) {
    let out = "";
    for (const ch of text) {
      const c = ch.codePointAt(0);
      if (ch === "\n") out += "↵\n";
      else if (ch === "\t") out += "⇥\t";
      else if (c < 0x20 || (c >= 0x7f && c < 0xa0)) out += "\\x" + c.toString(16).padStart(2, "0");
      else if (c === 0x61c || c === 0xad || c === 0xfeff || (c >= 0x200b && c <= 0x200f) ||
               (c >= 0x2028 && c <= 0x202e) || (c >= 0x2060 && c <= 0x206f) ||
               (c >= 0xfff9 && c <= 0xfffb)) out += "\\u" + c.toString(16).padStart(4, "0");
      else out += ch;
    }
    return out === "" ? "∅" : out;
  }

  function ramp(t) {
    const x = Math.max(0, Math.min(1, t));
    return `hsl(${Math.round(55 - 55 * x)}, 90%, ${Math.round(94 - 40 * x)}%)`;
  }

  function colourOf(v) {
    if (!v) return null;
    if (S.measure === "mask") return v.mask ? "hsl(210, 75%, 86%)" : "hsl(0, 0%, 88%)";
    const x = v[S.measure];
    if (x === null || x === undefined) return null;
    return ramp(x / SCALES[S.measure].max);
  }

  function paint(span) {
    const v = S.values.get(Number(span.dataset.pos));
    const c = colourOf(v);
    span.style.backgroundColor = c || "transparent";
    span.classList.toggle("na", !c);
    span.title = tooltip(v);
  }

  function tooltip(v) {
    if (!v) return "";
    const f = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));
    const parts = [`position ${v.pos}`, `id ${v.id}`];
    if (v.entropy !== undefined) {
      parts.push(`entropy ${f(v.entropy)}`, `surprisal ${v.stored ? "" : "≥ "}${f(v.surprisal)}`,
                 `residual ${f(v.residual)}`, `top-1 ${f(v.top1)}`);
    }
    if (v.kl !== undefined) parts.push(`KL ${f(v.kl)}`);
    parts.push(v.mask ? "counts for training" : "masked");
    return parts.join(" · ");
  }

  function legend() {
    const l = $("legend");
    l.replaceChildren();
    const label = (t) => { const s = document.createElement("span"); s.textContent = t; l.append(s); };
    if (S.measure === "mask") {
      for (const [c, t] of [["hsl(210, 75%, 86%)", "counts for training"], ["hsl(0, 0%, 88%)", "masked (e.g. prompt)"]]) {
        const sw = document.createElement("span");
        sw.className = "swatch";
        sw.style.backgroundColor = c;
        l.append(sw);
        label(t);
      }
      return;
    }
    const sc = SCALES[S.measure];
    label(`${sc.what}: 0`);
    const r = document.createElement("span");
    r.className = "ramp";
    r.style.background = `linear-gradient(to right, ${ramp(0)}, ${ramp(0.5)}, ${ramp(1)})`;
    l.append(r);
    label(`≥ ${sc.max} ${sc.unit}`);
  }

  // ---- the sequence, window by window --------------------------------------------------
  async function loadWindow(lo, hi, prepend) {
    const gen = S.gen;
    const name = S.store;
    const data = await api(storeUrl(name, `/view/tokens?start=${lo}&stop=${hi}`));
    let kl = null;
    if (S.compare) {
      try {
        kl = (await api(storeUrl(name, `/view/compare?other=${encodeURIComponent(S.compare)}&start=${lo}&stop=${hi}`))).kl;
      } catch (e) {
        say(`cannot compare with ${S.compare}: ${e.message}`, true);
      }
    }
    if (gen !== S.gen) return; // the user went elsewhere meanwhile
    // Windows join the shown run only at its ends: a window that another request (a scroll
    // while the sequence's first window loaded, a second click) has already added is dropped.
    if (prepend ? hi !== S.lo : lo !== S.hi) return;
    const frag = document.createDocumentFragment();
    for (let i = 0; i < data.input_ids.length; i++) {
      const pos = lo + i;
      const v = { pos, id: data.input_ids[i], mask: data.loss_mask[i] === 1 };
      if (data.entropy) {
        Object.assign(v, { entropy: data.entropy[i], surprisal: data.surprisal[i],
          residual: data.residual[i], top1: data.top1[i], stored: data.next_stored[i] });
      }
      if (kl) v.kl = kl[i];
      S.values.set(pos, v);
      const span = document.createElement("span");
      span.className = "tok";
      span.dataset.pos = String(pos);
      span.textContent = visible(data.text[i]);
      paint(span);
      frag.append(span);
    }
    const box = $("tokens");
    if (prepend) {
      const pane = $("text-pane");
      const before = pane.scrollHeight;
      box.prepend(frag);
      pane.scrollTop += pane.scrollHeight - before;
      S.lo = lo;
    } else {
      box.append(frag);
      S.hi = hi;
    }
    $("earlier").hidden = S.lo <= S.seq.start;
    $("more").textContent = S.hi < S.seq.stop ? "scroll for more…" : "(end of sequence)";
  }

  async function moreIfNeeded() {
    if (!S.seq || S.loading || S.hi >= S.seq.stop) return;
    const pane = $("text-pane");
    if (pane.scrollTop + pane.clientHeight < pane.scrollHeight - 200) return;
    S.loading = true;
    try {
      await loadWindow(S.hi, Math.min(S.hi + WINDOW, S.seq.stop), false);
    } catch (e) {
      say(e.message, true);
    } finally {
      S.loading = false;
    }
    requestAnimationFrame(moreIfNeeded);
  }

  async function showSequence(query, focus) {
    const seq = await api(storeUrl(S.store, `/view/locate?${query}`));
    say("");
    S.gen += 1;
    S.seq = seq;
    S.values.clear();
    $("tokens").replaceChildren();
    $("seq").value = seq.sequence;
    $("seq-count").textContent = `of ${seq.num_sequences}`;
    $("seq-info").textContent = `sequence ${seq.sequence}: positions ${seq.start}–${seq.stop - 1} ` +
      `(${seq.stop - seq.start} tokens)`;
    const lo = focus === undefined ? seq.start : Math.max(seq.start, focus - 64);
    S.lo = lo;
    S.hi = lo;
    $("text-pane").scrollTop = 0;
    await loadWindow(lo, Math.min(lo + WINDOW, seq.stop), false);
    saveHash(focus);
    if (focus !== undefined) {
      const span = $("tokens").querySelector(`[data-pos="${focus}"]`);
      if (span) {
        span.classList.add("focus");
        span.scrollIntoView({ block: "center" });
        pin(focus);
      }
    }
    moreIfNeeded();
  }

  function recolour() {
    for (const span of $("tokens").children) paint(span);
    legend();
    saveHash();
  }

  // ---- candidates ----------------------------------------------------------------------
  function fetchPosition(name, pos) {
    const key = `${name}\u0000${pos}`;
    if (!S.cache.has(key)) {
      const p = api(storeUrl(name, `/view/position/${pos}?limit=${LIST}`));
      p.catch(() => S.cache.delete(key));
      S.cache.set(key, p);
    }
    return S.cache.get(key);
  }

  function barRow(cls, text, p, id) {
    const row = document.createElement("div");
    row.className = "cand " + cls;
    if (id !== undefined) row.dataset.id = String(id);
    row.dataset.p = String(p);
    const t = document.createElement("span");
    t.className = "text";
    t.textContent = text;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    bar.append(fill);
    const num = document.createElement("span");
    num.className = "p";
    num.textContent = p.toFixed(4);
    row.append(t, bar, num);
    return row;
  }

  function candidateList(d) {
    const box = document.createElement("div");
    box.className = "cand-list";
    if (d.kind === "none") {
      const p = document.createElement("p");
      p.className = "hint";
      p.textContent = "tokens only: this store holds no teacher distribution";
      box.append(p);
      return box;
    }
    const nextId = d.next ? d.next.id : null;
    let listed = false;
    for (const c of d.candidates) {
      const isNext = c.id === nextId;
      listed ||= isNext;
      const row = barRow(isNext ? "next" : "", visible(c.text), c.p, c.id);
      row.title = `id ${c.id}, p = ${c.p}` + (isNext ? " · the next token in the data" : "");
      box.append(row);
    }
    if (d.rest > 0) {
      const rest = barRow("rest", `+${d.stored - d.candidates.length} stored`, d.rest);
      rest.title = `${d.stored - d.candidates.length} more stored candidates, together`;
      box.append(rest);
    }
    if (d.kind === "topk") {
      const res = barRow("residual", "residual", d.residual);
      res.title = "mass outside the stored top-k candidates";
      box.append(res);
    }
    if (nextId !== null && !listed) {
      const p = document.createElement("p");
      p.className = "cand-sub next-missing";
      p.textContent = `next token ${JSON.stringify(visible(d.next.text))} (id ${nextId}) is not among the listed candidates`;
      box.append(p);
    }
    return box;
  }

  async function showCandidates(pos) {
    S.shown = pos;
    const names = S.compare ? [S.store, S.compare] : [S.store];
    let ds;
    try {
      ds = await Promise.all(names.map((n) => fetchPosition(n, pos)));
    } catch (e) {
      say(e.message, true);
      return;
    }
    if (S.shown !== pos) return;
    const d = ds[0];
    const box = $("candidates");
    box.replaceChildren();
    box.dataset.pos = String(pos);
    const head = document.createElement("p");
    head.className = "cand-head";
    head.textContent = `position ${pos} · sequence ${d.sequence}, token ${d.offset}`;
    const sub = document.createElement("p");
    sub.className = "cand-sub";
    const next = d.next ? `${JSON.stringify(visible(d.next.text))} (id ${d.next.id})` : "(end of sequence)";
    sub.textContent = `reads ${JSON.stringify(visible(d.token.text))} (id ${d.token.id}); next in the data: ${next}` +
      (d.loss_mask ? "" : " · masked for training");
    box.append(head, sub);
    if (ds.length === 1) {
      box.append(candidateList(d));
      return;
    }
    const v = S.values.get(pos);
    if (v && v.kl !== undefined) {
      const k = document.createElement("p");
      k.className = "cand-sub kl";
      k.textContent = `KL(${S.store} ‖ ${S.compare}) = ${v.kl === null ? "–" : v.kl.toFixed(4)} nats`;
      box.append(k);
    }
    const cols = document.createElement("div");
    cols.className = "columns";
    names.forEach((n, i) => {
      const col = document.createElement("div");
      col.dataset.store = n;
      const h = document.createElement("h4");
      h.textContent = n;
      col.append(h, candidateList(ds[i]));
      cols.append(col);
    });
    box.append(cols);
  }

  function pin(pos) {
    for (const el of $("tokens").querySelectorAll(".pinned")) el.classList.remove("pinned");
    S.pinned = pos;
    if (pos !== null) {
      const span = $("tokens").querySelector(`[data-pos="${pos}"]`);
      if (span) span.classList.add("pinned");
      showCandidates(pos);
    }
  }

  // ---- store info and histograms -------------------------------------------------------
  function infoRows(info) {
    const e = info.encoding;
    const kind = { topk: `top-${e.k}`, sampled: `sampled, n = ${e.samples}`, full: "full", none: "tokens only" }[e.kind] || e.kind;
    const t = info.teacher || {};
    const rows = [
      ["encoding", e.kind === "none" ? kind : `${kind}, values ${e.values}, T = ${e.temperature}`],
      ["teacher", `${t.name ?? "–"} (revision ${t.revision ?? "–"}, ${t.dtype ?? "–"})`],
      ["tokenizer", info.tokenizer ? `${info.tokenizer.name ?? "?"} (${String(info.tokenizer.vocab_hash ?? "").slice(0, 19)}…)` : "none stored"],
      ["vocabulary", info.vocab_size.toLocaleString("en")],
      ["positions", `${info.num_positions.toLocaleString("en")} in ${info.num_sequences.toLocaleString("en")} sequences`],
      ["on disk", `${info.bytes_on_disk.toLocaleString("en")} bytes, ${info.bytes_per_position.toFixed(1)} B/position`],
      ["vs full bf16", `${info.compression_ratio_vs_full_bf16.toFixed(1)}× smaller`],
      ["created", `${info.created_at} by logitstore ${(info.tool || {}).version ?? "?"}`],
      ["format", `${info.format_version}, ${info.state}`],
      ["identity", info.identity],
    ];
    if (info.loss_mask_positions !== null && info.loss_mask_positions !== undefined) {
      rows.push(["loss mask", `${info.loss_mask_positions.toLocaleString("en")} positions count`]);
    }
    if (info.generation) rows.push(["generation", JSON.stringify(info.generation)]);
    return rows;
  }

  function histogram(title, h) {
    const div = document.createElement("div");
    div.className = "hist";
    const t = document.createElement("h4");
    t.textContent = h.mean === null ? title : `${title} (mean ${h.mean.toFixed(3)})`;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    const n = h.counts.length;
    const top = Math.max(1, ...h.counts);
    svg.setAttribute("viewBox", `0 0 ${n * 10} 60`);
    svg.setAttribute("preserveAspectRatio", "none");
    h.counts.forEach((c, i) => {
      const r = document.createElementNS(ns, "rect");
      const height = (c / top) * 58;
      r.setAttribute("x", String(i * 10 + 1));
      r.setAttribute("width", "8");
      r.setAttribute("y", String(60 - height));
      r.setAttribute("height", String(height));
      const tip = document.createElementNS(ns, "title");
      tip.textContent = `${h.edges[i]}–${h.edges[i + 1]}: ${c}`;
      r.append(tip);
      svg.append(r);
    });
    const axis = document.createElement("div");
    axis.className = "axis";
    for (const x of [h.edges[0], h.edges[n]]) {
      const s = document.createElement("span");
      s.textContent = String(x);
      axis.append(s);
    }
    div.append(t, svg, axis);
    return div;
  }

  async function showInfo() {
    const info = await api(storeUrl(S.store));
    const dl = $("info");
    dl.replaceChildren();
    for (const [k, v] of infoRows(info)) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = String(v);
      dl.append(dt, dd);
    }
    const hists = $("hists");
    hists.replaceChildren();
    if (info.encoding.kind === "none") return;
    const st = await api(storeUrl(S.store, "/view/stats"));
    const note = document.createElement("p");
    note.className = "cand-sub";
    note.textContent = `over a sample of ${st.positions.toLocaleString("en")} positions`;
    hists.append(note, histogram("entropy (nats)", st.entropy),
      histogram("residual mass", st.residual), histogram("top-1 probability", st.top1));
  }

  // ---- search ----------------------------------------------------------------------------
  async function runSearch(q, from, append) {
    const box = $("matches");
    const res = await api(storeUrl(S.store, `/view/search?q=${encodeURIComponent(q)}&from_sequence=${from}`));
    if (!append) {
      box.replaceChildren();
      const h = document.createElement("p");
      h.className = "cand-head";
      h.textContent = `matches for ${JSON.stringify(q)}`;
      box.append(h, document.createElement("ul"));
    }
    const ul = box.querySelector("ul");
    for (const m of res.matches) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.className = "match";
      b.dataset.position = String(m.position);
      b.textContent = `seq ${m.sequence}, pos ${m.position}: ${visible(m.snippet)}`;
      b.onclick = () => go(() => showSequence(`position=${m.position}`, m.position));
      li.append(b);
      ul.append(li);
    }
    box.querySelector(".more-matches")?.remove();
    if (res.next_sequence !== null) {
      const more = document.createElement("button");
      more.type = "button";
      more.className = "more-matches";
      more.textContent = `search on from sequence ${res.next_sequence}`;
      more.onclick = () => go(() => runSearch(q, res.next_sequence, true));
      box.append(more);
    } else if (!ul.children.length) {
      const none = document.createElement("p");
      none.className = "hint";
      none.textContent = "no match";
      box.append(none);
    }
    box.hidden = false;
  }

  // ---- page state in the URL's fragment ---------------------------------------------------
  function saveHash(focus) {
    const p = new URLSearchParams();
    if (S.seq) p.set("seq", S.seq.sequence);
    if (focus !== undefined) p.set("pos", focus);
    p.set("measure", S.measure);
    if (S.compare) p.set("compare", S.compare);
    history.replaceState(null, "", "#" + p.toString());
  }

  async function go(action) {
    try {
      await action();
    } catch (e) {
      say(e.message, true);
    }
  }

  async function home() {
    $("home").hidden = false;
    const { stores } = await api("/v1/stores");
    const ul = $("store-list");
    ul.replaceChildren();
    for (const s of stores) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = storeUrl(s.name, "/view");
      a.textContent = s.name;
      const info = document.createElement("span");
      info.textContent = ` — ${s.encoding.kind}, ${s.num_positions.toLocaleString("en")} positions`;
      li.append(a, info);
      ul.append(li);
    }
    if (!stores.length) say("this server serves no store");
  }

  async function viewer(name) {
    S.store = name;
    $("store-name").textContent = name;
    document.title = `${name} · logitstore`;
    $("viewer").hidden = false;
    $("controls").hidden = false;
    const { stores } = await api("/v1/stores");
    S.stores = stores.map((s) => s.name);
    if (!S.stores.includes(name)) throw new ApiError(`no store named ${JSON.stringify(name)} on this server`);
    for (const other of S.stores.filter((n) => n !== name)) {
      const o = document.createElement("option");
      o.value = other;
      o.textContent = other;
      $("compare").append(o);
    }
    const h = new URLSearchParams(location.hash.slice(1));
    S.compare = S.stores.includes(h.get("compare")) && h.get("compare") !== name ? h.get("compare") : "";
    const asked = h.get("measure");
    S.measure = SCALES[asked] || asked === "mask" ? asked : S.compare ? "kl" : "entropy";
    if (S.measure === "kl" && !S.compare) S.measure = "entropy";
    $("measure").value = S.measure;
    $("compare").value = S.compare;
    legend();
    bind();
    showInfo().catch((e) => say(e.message, true));
    const pos = h.get("pos");
    if (pos !== null && pos !== "") await showSequence(`position=${Number(pos)}`, Number(pos));
    else await showSequence(`sequence=${Number(h.get("seq") || 0)}`);
  }

  function bind() {
    const tokens = $("tokens");
    tokens.addEventListener("mouseover", (ev) => {
      const t = ev.target.closest(".tok");
      if (t && S.pinned === null) showCandidates(Number(t.dataset.pos));
    });
    tokens.addEventListener("click", (ev) => {
      const t = ev.target.closest(".tok");
      if (!t) return;
      const pos = Number(t.dataset.pos);
      pin(S.pinned === pos ? null : pos);
    });
    $("text-pane").addEventListener("scroll", moreIfNeeded, { passive: true });
    $("earlier").onclick = () => go(() => loadWindow(Math.max(S.seq.start, S.lo - WINDOW), S.lo, true));
    $("measure").onchange = () => {
      S.measure = $("measure").value;
      if (S.measure === "kl" && !S.compare) say("choose a store to compare with: KL needs two");
      recolour();
    };
    $("compare").onchange = () => {
      S.compare = $("compare").value;
      S.cache.clear();
      if (S.compare) { S.measure = "kl"; $("measure").value = "kl"; }
      else if (S.measure === "kl") { S.measure = "entropy"; $("measure").value = "entropy"; }
      legend();
      go(() => showSequence(`sequence=${S.seq.sequence}`));
    };
    const seqGo = (i) => go(() => showSequence(`sequence=${i}`));
    $("seq").onchange = () => seqGo(Number($("seq").value));
    $("prev").onclick = () => seqGo(Math.max(0, S.seq.sequence - 1));
    $("next").onclick = () => seqGo(Math.min(S.seq.num_sequences - 1, S.seq.sequence + 1));
    $("pos-form").onsubmit = (ev) => {
      ev.preventDefault();
      const p = Number($("pos").value);
      go(() => showSequence(`position=${p}`, p));
    };
    $("search-form").onsubmit = (ev) => {
      ev.preventDefault();
      const q = $("search").value;
      if (q) go(() => runSearch(q, 0, false));
    };
    document.addEventListener("keydown", (ev) => {
      if (S.pinned === null || ev.target.closest("input, select")) return;
      const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
      if (!step) return;
      const span = $("tokens").querySelector(`[data-pos="${S.pinned + step}"]`);
      if (span) { ev.preventDefault(); pin(S.pinned + step); span.scrollIntoView({ block: "nearest" }); }
    });
  }

  function start() {
    const m = location.pathname.match(/^\/v1\/stores\/([^/]+)\/view\/?$/);
    let name = null;
    if (m) {
      try {
        name = decodeURIComponent(m[1]);
      } catch (e) {
        name = m[1];
      }
    }
    go(() => (name === null ? home() : viewer(name))).then(() => { document.body.dataset.ready = "1"; });
  }

  start();
})();
