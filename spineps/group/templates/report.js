/* spineps group report: everything runs from the inline JSON blob; no network, no libraries. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var SCANS = D.scans;
  var FAILED = D.failed || [];
  var PAGE = 50;
  var SVGNS = "http://www.w3.org/2000/svg";
  var STORE = "spineps-ratings:" + D.report_id;
  var state = { sortCol: "n", sortDir: 1, page: 0, filter: "", flagged: false, unrated: false, rows: [] };
  var ratings = loadRatings();
  var byName = {};
  SCANS.forEach(function (s, i) { byName[s.n] = i; });

  function $(id) { return document.getElementById(id); }
  function esc(t) {
    return String(t == null ? "" : t).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function fmt(v, d) {
    if (v == null || !isFinite(v)) return "n/a";
    var a = Math.abs(v);
    if (d == null) d = a >= 1000 ? 0 : a >= 100 ? 1 : 2;
    return Number(v).toFixed(d);
  }
  function el(tag, attrs, html) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (html != null) e.innerHTML = html;
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    return e;
  }

  /* ---------------- ratings (localStorage) ---------------- */
  function loadRatings() {
    try { return JSON.parse(window.localStorage.getItem(STORE) || "{}") || {}; }
    catch (e) { return {}; }
  }
  function saveRatings() {
    try { window.localStorage.setItem(STORE, JSON.stringify(ratings)); }
    catch (e) { /* storage unavailable (private mode): ratings live until the page closes */ }
    renderRatingSummary();
  }
  function setRating(name, field, value) {
    var r = ratings[name] || { rating: "", note: "" };
    r[field] = value;
    r.time = new Date().toISOString();
    if (!r.rating && !r.note) delete ratings[name]; else ratings[name] = r;
    saveRatings();
  }
  function download(filename, mime, text) {
    var a = $("download-link");
    var url = URL.createObjectURL(new Blob([text], { type: mime }));
    a.href = url;
    a.download = filename;
    a.textContent = filename;
    a.click();
    setTimeout(function () { URL.revokeObjectURL(url); }, 2000);
  }
  function exportRecords() {
    return SCANS.filter(function (s) { return ratings[s.n]; }).map(function (s) {
      var r = ratings[s.n];
      return { bids_name: s.n, rating: r.rating || "", note: r.note || "", rated_at: r.time || "",
               flags: s.flags.join(",") };
    });
  }
  function exportJSON() {
    download("group_T2w_ratings.json", "application/json", JSON.stringify({
      report: D.title, report_id: D.report_id, software: D.software, exported: new Date().toISOString(),
      ratings: exportRecords() }, null, 2) + "\n");
  }
  function exportTSV() {
    var clean = function (t) { return String(t).replace(/[\t\r\n]+/g, " "); };
    var lines = ["bids_name\trating\tnote\trated_at\tflags"];
    exportRecords().forEach(function (r) {
      lines.push([r.bids_name, r.rating || "n/a", clean(r.note) || "n/a", r.rated_at || "n/a", r.flags || "n/a"].join("\t"));
    });
    download("group_T2w_ratings.tsv", "text/tab-separated-values", lines.join("\n") + "\n");
  }
  function importJSON(file) {
    var reader = new FileReader();
    reader.onload = function () {
      try {
        var obj = JSON.parse(reader.result);
        (obj.ratings || []).forEach(function (r) {
          if (r && r.bids_name in byName) ratings[r.bids_name] = { rating: r.rating || "", note: r.note || "", time: r.rated_at || "" };
        });
        saveRatings(); renderTable(); route();
      } catch (e) { alert("Not a ratings file: " + e); }
    };
    reader.readAsText(file);
  }
  function renderRatingSummary() {
    var c = { pass: 0, fail: 0, artifact: 0 }, notes = 0, n = 0;
    Object.keys(ratings).forEach(function (k) {
      if (!(k in byName)) return;
      n++;
      if (ratings[k].rating in c) c[ratings[k].rating]++;
      if (ratings[k].note) notes++;
    });
    $("rating-summary").innerHTML = "<p>" + n + " of " + SCANS.length + " scans rated: <span class='rating-pass'>" + c.pass +
      " pass</span>, <span class='rating-fail'>" + c.fail + " fail</span>, <span class='rating-artifact'>" + c.artifact +
      " artifact</span>; " + notes + " with notes.</p>";
    var card = $("card-rated");
    if (card) card.textContent = n + " / " + SCANS.length;
  }

  /* ---------------- summary ---------------- */
  function renderCards() {
    var subs = {}, flagged = 0, outl = 0, levels = 0;
    SCANS.forEach(function (s) {
      subs[s.sub] = 1;
      if (s.flags.length) flagged++;
      outl += s.ot.length;
      levels += s.nv || 0;
    });
    var cards = [
      ["Scans", SCANS.length, ""], ["Subjects", Object.keys(subs).length, ""],
      ["Flagged scans", flagged, flagged ? "bad" : ""], ["Outlier measurements", outl, outl ? "warn" : ""],
      ["Vertebrae found", levels, ""], ["Rated", "0", "", "card-rated"],
      ["Failed / incomplete", FAILED.length, FAILED.length ? "bad" : "", "card-failed"]
    ];
    var html = cards.map(function (c) {
      return "<div class='card " + c[2] + "'><div class='num'" + (c[3] ? " id='" + c[3] + "'" : "") + ">" + esc(c[1]) +
        "</div><div class='lbl'>" + esc(c[0]) + "</div></div>";
    }).join("");
    var fc = {};
    SCANS.forEach(function (s) { s.flags.forEach(function (f) { fc[f] = (fc[f] || 0) + 1; }); });
    var fl = Object.keys(fc).sort().map(function (f) {
      return "<span class='flag' title='" + esc(D.flag_codes[f] || f) + "'>" + esc(f) + ": " + fc[f] + "</span>";
    }).join(" ");
    $("cards").innerHTML = html + (fl ? "<div class='card'><div class='lbl'>Flags</div><div>" + fl + "</div></div>" : "");
    $("subtitle").textContent = D.software + " \u00b7 " + D.generated + " \u00b7 " + D.output_dir_name;
    $("footer").innerHTML = "Generated by " + esc(D.software) + " from the participant outputs only. Tables: " +
      "<code>group_T2w.tsv</code>, <code>group_T2w_levels.tsv</code>. Outliers: robust z = (x - median) / (1.4826 MAD) per level and measure, |z| &gt; " +
      esc(D.threshold) + ", at least " + esc(D.min_scans) + " scans.";
    $("zthr").textContent = D.threshold;
    $("storage-key").textContent = STORE;
  }

  /* ---------------- distributions (inline SVG) ---------------- */
  function renderSelect() {
    var sel = $("measure-select");
    D.measure_choices.forEach(function (m, i) {
      var o = el("option", { value: String(i) }, esc(m[2]));
      sel.appendChild(o);
    });
    sel.addEventListener("change", renderPlot);
  }
  function hash01(i, j) { var x = Math.sin(i * 12.9898 + j * 78.233) * 43758.5453; return x - Math.floor(x); }
  function renderPlot() {
    var host = $("plot");
    host.innerHTML = "";
    if (!D.measure_choices.length) { host.textContent = "No per-level measurements in this cohort."; return; }
    var choice = D.measure_choices[+$("measure-select").value || 0];
    var cols = [];
    D.keys.forEach(function (k, ki) { if (k[1] === choice[0] && k[2] === choice[1] && D.stats[ki]) cols.push(ki); });
    if (!cols.length) { host.textContent = "No values for this measure."; return; }
    var lo = Infinity, hi = -Infinity;
    cols.forEach(function (ki) {
      SCANS.forEach(function (s) { var v = s.v[ki]; if (v != null) { if (v < lo) lo = v; if (v > hi) hi = v; } });
    });
    if (!isFinite(lo)) { host.textContent = "No values for this measure."; return; }
    if (hi === lo) { hi += 1; lo -= 1; }
    var pad = (hi - lo) * 0.06; lo -= pad; hi += pad;
    var W = Math.max(560, 70 * cols.length + 80), H = 360, L = 64, R = 16, T = 16, B = 46;
    var cw = (W - L - R) / cols.length;
    var y = function (v) { return T + (H - T - B) * (1 - (v - lo) / (hi - lo)); };
    var s = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", id: "dist-svg",
                         "aria-label": choice[2] });
    for (var g = 0; g <= 5; g++) {
      var gv = lo + (hi - lo) * g / 5, gy = y(gv);
      s.appendChild(svg("line", { x1: L, x2: W - R, y1: gy, y2: gy, stroke: "#e3e8ee" }));
      var t = svg("text", { x: L - 6, y: gy + 4, "text-anchor": "end", "font-size": 11, fill: "#5b6672" });
      t.textContent = fmt(gv); s.appendChild(t);
    }
    var yl = svg("text", { x: 14, y: T + (H - T - B) / 2, "font-size": 12, fill: "#1d232a",
                           transform: "rotate(-90 14 " + (T + (H - T - B) / 2) + ")", "text-anchor": "middle" });
    yl.textContent = choice[2]; s.appendChild(yl);
    var MAXPTS = 400;
    cols.forEach(function (ki, ci) {
      var st = D.stats[ki], cx = L + cw * (ci + 0.5), bw = Math.min(36, cw * 0.5);
      s.appendChild(svg("line", { x1: cx, x2: cx, y1: y(st[4]), y2: y(st[5]), stroke: "#7a8896" }));
      s.appendChild(svg("rect", { x: cx - bw / 2, y: y(st[3]), width: bw, height: Math.max(1, y(st[2]) - y(st[3])),
                                  fill: "#dbe8f5", stroke: "#2f6fb3" }));
      s.appendChild(svg("line", { x1: cx - bw / 2, x2: cx + bw / 2, y1: y(st[1]), y2: y(st[1]), stroke: "#14324f", "stroke-width": 2 }));
      var lab = svg("text", { x: cx, y: H - B + 16, "text-anchor": "middle", "font-size": 11, fill: "#1d232a" });
      lab.textContent = D.keys[ki][0]; s.appendChild(lab);
      var nl = svg("text", { x: cx, y: H - B + 30, "text-anchor": "middle", "font-size": 10, fill: "#5b6672" });
      nl.textContent = "n=" + st[0]; s.appendChild(nl);
      var stride = Math.max(1, Math.ceil(st[0] / MAXPTS)), seen = 0;
      SCANS.forEach(function (sc, si) {
        var v = sc.v[ki];
        if (v == null) return;
        var z = (v - st[1]) / st[6], out = Math.abs(z) > D.threshold;
        seen++;
        if (!out && (seen % stride) !== 0) return;
        var c = svg("circle", { cx: cx + (hash01(si, ki) - 0.5) * bw * 1.3, cy: y(v), r: out ? 4 : 2.6,
                                fill: out ? "#c62828" : "#2f6fb3", "fill-opacity": out ? 0.95 : 0.55,
                                "data-scan": String(si), "class": out ? "pt outlier" : "pt" });
        var tt = svg("title", {});
        tt.textContent = sc.n + ": " + fmt(v) + " (z=" + fmt(z, 1) + ")";
        c.appendChild(tt);
        s.appendChild(c);
      });
    });
    s.addEventListener("click", function (ev) {
      var t = ev.target;
      if (t && t.getAttribute && t.getAttribute("data-scan") != null) openScan(+t.getAttribute("data-scan"));
    });
    host.appendChild(s);
  }

  /* ---------------- table ---------------- */
  var COLS = [
    ["n", "Scan"], ["sub", "Subject"], ["ses", "Session"], ["lv", "Levels"], ["nv", "Vertebrae"],
    ["rule", "Naming"], ["conf", "Confidence"], ["flags", "QC flags"], ["no", "Outliers"], ["rating", "Rating"]
  ];
  function value(s, col) {
    if (col === "flags") return s.flags.length;
    if (col === "no") return s.ot.length;
    if (col === "rating") return (ratings[s.n] || {}).rating || "";
    return s[col];
  }
  function applyFilter() {
    var f = state.filter.toLowerCase();
    state.rows = [];
    SCANS.forEach(function (s, i) {
      if (state.flagged && !s.flags.length) return;
      if (state.unrated && ratings[s.n] && ratings[s.n].rating) return;
      if (f && (s.n + " " + s.lv + " " + s.flags.join(" ") + " " + (s.rule || "")).toLowerCase().indexOf(f) < 0) return;
      state.rows.push(i);
    });
    var c = state.sortCol, d = state.sortDir;
    state.rows.sort(function (a, b) {
      var va = value(SCANS[a], c), vb = value(SCANS[b], c);
      if (va == null) va = ""; if (vb == null) vb = "";
      if (typeof va === "number" && typeof vb === "number") return (va - vb) * d || (a - b);
      return String(va).localeCompare(String(vb), undefined, { numeric: true }) * d || (a - b);
    });
  }
  function renderHead() {
    var tr = $("scan-head");
    tr.innerHTML = "";
    COLS.forEach(function (c) {
      var th = el("th", { "data-col": c[0] }, esc(c[1]));
      if (state.sortCol === c[0]) th.className = state.sortDir > 0 ? "sorted-asc" : "sorted-desc";
      th.addEventListener("click", function () {
        if (state.sortCol === c[0]) state.sortDir = -state.sortDir; else { state.sortCol = c[0]; state.sortDir = 1; }
        state.page = 0; renderTable();
      });
      tr.appendChild(th);
    });
  }
  function flagHtml(s) {
    var h = s.flags.map(function (f) { return "<span class='flag' title='" + esc(D.flag_codes[f] || f) + "'>" + esc(f) + "</span>"; }).join("");
    return h || "<span class='ok'>none</span>";
  }
  function ratingHtml(name) {
    var r = ratings[name];
    if (!r || !r.rating) return r && r.note ? "note" : "";
    return "<span class='rating-" + esc(r.rating) + "'>" + esc(r.rating) + "</span>";
  }
  function renderTable() {
    applyFilter();
    renderHead();
    var pages = Math.max(1, Math.ceil(state.rows.length / PAGE));
    if (state.page >= pages) state.page = pages - 1;
    var start = state.page * PAGE, rows = state.rows.slice(start, start + PAGE);
    var body = $("scan-body");
    body.innerHTML = rows.map(function (i) {
      var s = SCANS[i];
      return "<tr data-scan='" + i + "'><td><a href='#scan=" + encodeURIComponent(s.n) + "'>" + esc(s.n) + "</a>" +
        (s.pg ? " <a class='pg' title='the scan&#39;s own page (self-contained)' href='" + esc(s.pg) + "'>page</a>" : "") + "</td><td>" +
        esc(s.sub) + "</td><td>" + esc(s.ses || "") + "</td><td>" + esc(s.lv || "n/a") + "</td><td class='num'>" +
        esc(s.nv == null ? "n/a" : s.nv) + "</td><td>" + esc(s.rule || "n/a") + "</td><td class='num'>" + fmt(s.conf, 2) +
        "</td><td>" + flagHtml(s) + "</td><td class='num'>" + s.ot.length + "</td><td>" + ratingHtml(s.n) + "</td></tr>";
    }).join("");
    $("page-info").textContent = state.rows.length ? ("rows " + (start + 1) + "\u2013" + (start + rows.length) + " of " +
      state.rows.length + " (page " + (state.page + 1) + "/" + pages + ")") : "no scans match";
    $("prev-page").disabled = state.page === 0;
    $("next-page").disabled = state.page >= pages - 1;
    renderGallery(rows);
  }
  function renderGallery(rows) {
    $("gallery").innerHTML = rows.map(function (i) {
      var s = SCANS[i];
      var img = s.fig ? "<img loading='lazy' decoding='async' alt='" + esc(s.n) + "' src='" + esc(s.fig) + "'>" :
        "<div class='nofig'>no figure</div>";
      return "<figure data-scan='" + i + "'>" + img + "<figcaption>" + esc(s.n) + (s.flags.length ? " \u26a0" : "") + "</figcaption></figure>";
    }).join("");
  }

  /* ---------------- one scan ---------------- */
  function openScan(i) { location.hash = "#scan=" + encodeURIComponent(SCANS[i].n); }
  function renderScan(i) {
    var s = SCANS[i], view = $("scan-view"), r = ratings[s.n] || { rating: "", note: "" };
    var q = s.qc || {};
    var li = function (arr) { return arr && arr.length ? arr.map(esc).join("<br>") : "<span class='ok'>none</span>"; };
    var outl = s.ot;
    var rows = [];
    D.keys.forEach(function (k, ki) {
      var v = s.v[ki];
      if (v == null) return;
      var st = D.stats[ki], z = st ? (v - st[1]) / st[6] : null;
      rows.push("<tr><td>" + esc(k[0]) + "</td><td>" + esc(k[1]) + "</td><td>" + esc(k[2]) + "</td><td class='num'>" + fmt(v) +
        "</td><td class='num'>" + (st ? fmt(st[1]) : "") + "</td><td class='num'>" + (z == null ? "" : fmt(z, 1)) + "</td></tr>");
    });
    var opts = ["pass", "fail", "artifact"].map(function (o) {
      return "<label><input type='radio' name='rating' value='" + o + "'" + (r.rating === o ? " checked" : "") + "> " + o + "</label>";
    }).join("") + "<label><input type='radio' name='rating' value=''" + (!r.rating ? " checked" : "") + "> unrated</label>";
    view.innerHTML =
      "<div class='head'><h2 id='scan-title'>" + esc(s.n) + "</h2><button type='button' id='scan-prev'>&larr; previous</button>" +
      "<button type='button' id='scan-next'>next &rarr;</button>" +
      (s.pg ? "<a id='scan-page-link' href='" + esc(s.pg) + "'>open the scan's page</a>" : "") + "<a href='#'>close</a></div>" +
      "<div class='cols'><div class='fig'>" + (s.fig ? "<a href='" + esc(s.fig) + "'><img loading='lazy' alt='" + esc(s.n) +
      " overlay' src='" + esc(s.fig) + "'></a>" : "<div class='nofig'>no figure for this scan</div>") + "</div>" +
      "<div class='side'><div class='rating' id='rating-box'><b>Rating</b><br>" + opts +
      "<textarea id='rating-note' placeholder='note (artifact type, what is wrong, ...)'>" + esc(r.note || "") + "</textarea></div>" +
      "<dl class='qc'><dt>Levels</dt><dd>" + esc(s.lv || "n/a") + "</dd><dt>Naming</dt><dd>" + esc(s.rule || "n/a") +
      " (confidence " + fmt(s.conf, 2) + ")</dd><dt>Flags</dt><dd>" + flagHtml(s) + "</dd><dt>Gaps</dt><dd>" + li(q.gaps) +
      "</dd><dt>Missing discs</dt><dd>" + li(q.missing_discs) + "</dd><dt>Mask disagreement</dt><dd>" +
      fmt((q.inc || 0) * 100, 2) + " %</dd><dt>Unusual sizes</dt><dd>" + li(q.size) + "</dd><dt>Cut by the FOV</dt><dd>" +
      li(q.trunc) + "</dd><dt>Naming warnings</dt><dd>" + li(q.warn) + "</dd><dt>Cohort outliers</dt><dd>" + li(outl) + "</dd></dl>" +
      "<div class='measures'><table><thead><tr><th>level</th><th>structure</th><th>measure</th><th>value</th><th>cohort median</th><th>z</th></tr></thead><tbody>" +
      rows.join("") + "</tbody></table></div></div></div>";
    view.hidden = false;
    Array.prototype.forEach.call(view.querySelectorAll("input[name=rating]"), function (inp) {
      inp.addEventListener("change", function () { setRating(s.n, "rating", inp.value); renderTable(); });
    });
    $("rating-note").addEventListener("change", function () { setRating(s.n, "note", this.value); });
    var pos = state.rows.indexOf(i);
    var step = function (d) {
      var list = state.rows.length ? state.rows : SCANS.map(function (_, k) { return k; });
      var p = list.indexOf(i); if (p < 0) p = 0;
      var n = list[(p + d + list.length) % list.length];
      openScan(n);
    };
    $("scan-prev").addEventListener("click", function () { step(-1); });
    $("scan-next").addEventListener("click", function () { step(1); });
    void pos;
    view.scrollIntoView();
  }
  function route() {
    var h = decodeURIComponent(location.hash || "");
    if (h.indexOf("#scan=") === 0 && h.slice(6) in byName) { renderScan(byName[h.slice(6)]); return; }
    $("scan-view").hidden = true;
  }

  /* ---------------- failed and incomplete scans ---------------- */
  function renderFailed() {
    if (!FAILED.length) { $("failed-list").innerHTML = "<p class='ok'>none: every scan of the participant runs is in the report</p>"; return; }
    var cols = [["bids_name", "Scan"], ["status", "Status"], ["error", "Error"], ["reason", "Reason"], ["log_file", "Log"], ["time", "Time (UTC)"]];
    $("failed-list").innerHTML = "<table id='failed-table'><thead><tr>" + cols.map(function (c) { return "<th>" + esc(c[1]) + "</th>"; }).join("") +
      "</tr></thead><tbody>" + FAILED.map(function (f) {
        return "<tr class='failed-row'>" + cols.map(function (c) {
          var v = f[c[0]] == null ? "n/a" : f[c[0]];
          if (c[0] === "log_file" && v !== "n/a") return "<td><a href='" + esc(v) + "'>" + esc(v) + "</a></td>";
          return "<td>" + (c[0] === "status" ? "<span class='flag'>" + esc(v) + "</span>" : esc(v)) + "</td>";
        }).join("") + "</tr>";
      }).join("") + "</tbody></table>";
  }

  /* ---------------- about / methods ---------------- */
  function renderMethods() {
    var m = D.methods || [];
    if (!m.length) {
      $("methods").innerHTML = "<p class='hint'>No methods text found (participant runs write logs/*_methods.md).</p>";
      return;
    }
    $("methods").innerHTML = m.map(function (e, i) {
      return "<div class='methods'>" + (m.length > 1 ? "<h3>Runs " + esc(e.runs.join(", ")) + "</h3>" : "") + e.html +
        "<details><summary>BibTeX</summary><pre class='bib' id='bib-" + i + "'></pre></details>" +
        "<p class='hint'>From run(s) " + esc(e.runs.join(", ")) + "</p></div>";
    }).join("");
    m.forEach(function (e, i) { $("bib-" + i).textContent = e.bibtex; });
  }

  /* ---------------- wiring ---------------- */
  function init() {
    renderCards();
    renderSelect();
    renderPlot();
    renderTable();
    renderRatingSummary();
    renderMethods();
    renderFailed();
    $("filter").addEventListener("input", function () { state.filter = this.value; state.page = 0; renderTable(); });
    $("flagged-only").addEventListener("change", function () { state.flagged = this.checked; state.page = 0; renderTable(); });
    $("unrated-only").addEventListener("change", function () { state.unrated = this.checked; state.page = 0; renderTable(); });
    $("prev-page").addEventListener("click", function () { state.page--; renderTable(); });
    $("next-page").addEventListener("click", function () { state.page++; renderTable(); });
    $("scan-body").addEventListener("click", function (ev) {
      var tr = ev.target.closest("tr");
      if (tr && ev.target.tagName !== "A") openScan(+tr.getAttribute("data-scan"));
    });
    $("gallery").addEventListener("click", function (ev) {
      var f = ev.target.closest("figure");
      if (f) openScan(+f.getAttribute("data-scan"));
    });
    $("export-json").addEventListener("click", exportJSON);
    $("export-tsv").addEventListener("click", exportTSV);
    $("import-json").addEventListener("change", function () { if (this.files[0]) importJSON(this.files[0]); });
    $("clear-ratings").addEventListener("click", function () {
      if (confirm("Remove every rating and note of this report from this browser?")) { ratings = {}; saveRatings(); renderTable(); route(); }
    });
    window.addEventListener("hashchange", route);
    route();
    document.body.setAttribute("data-ready", "1");
    document.body.setAttribute("data-errors", String(window.__spinepsErrors.length));
  }
  init();
})();
