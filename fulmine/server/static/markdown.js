// A small, safe markdown renderer: model output is escaped first, then only a fixed set of
// constructs becomes markup. Raw HTML in the text is always shown as text, never injected.
"use strict";

const Markdown = (() => {
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  // Inline constructs on already-escaped text.
  function inline(escaped) {
    const codes = [];
    let s = escaped.replace(/`([^`\n]+)`/g, (_, code) => { codes.push(code); return `\u0000${codes.length - 1}\u0000`; });
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
         .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
         .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)"<>]+)\)/g,
                  '<a href="$2" target="_blank" rel="noopener noreferrer nofollow">$1</a>');
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
  }

  function blocks(text) {
    const out = [];
    let list = null;
    const closeList = () => { if (list) { out.push(`</${list}>`); list = null; } };
    for (const raw of text.split("\n")) {
      const line = escapeHtml(raw);
      let m;
      if ((m = raw.match(/^(#{1,4})\s+(.*)$/))) {
        closeList();
        const level = m[1].length + 2;  // h3..h6: answers live inside the page, not above it
        out.push(`<h${level}>${inline(escapeHtml(m[2]))}</h${level}>`);
      } else if ((m = raw.match(/^\s*[-*]\s+(.*)$/))) {
        if (list !== "ul") { closeList(); out.push("<ul>"); list = "ul"; }
        out.push(`<li>${inline(escapeHtml(m[1]))}</li>`);
      } else if ((m = raw.match(/^\s*\d+[.)]\s+(.*)$/))) {
        if (list !== "ol") { closeList(); out.push("<ol>"); list = "ol"; }
        out.push(`<li>${inline(escapeHtml(m[1]))}</li>`);
      } else if (raw.trim() === "") {
        closeList();
        out.push("");
      } else {
        closeList();
        out.push(`<p>${inline(line)}</p>`);
      }
    }
    closeList();
    return out.join("\n");
  }

  // Fenced code blocks first (their content is escaped and nothing else), then the rest.
  function render(text) {
    const parts = text.split(/^```/m);
    let html = "";
    parts.forEach((part, i) => {
      if (i % 2 === 1) {
        const newline = part.indexOf("\n");
        const lang = newline === -1 ? "" : part.slice(0, newline).trim();
        const code = newline === -1 ? "" : part.slice(newline + 1);
        const cls = /^[\w+-]+$/.test(lang) ? ` class="language-${lang}"` : "";
        html += `<pre><code${cls}>${escapeHtml(code.replace(/\n$/, ""))}</code></pre>`;
      } else {
        html += blocks(part);
      }
    });
    return html;
  }

  return { render, escapeHtml };
})();
