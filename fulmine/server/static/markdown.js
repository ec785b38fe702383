// Model output as markdown, safely: markdown-it (vendor/, MIT) with raw HTML off, so any HTML in
// the text is shown as text, then DOMPurify (vendor/, Apache-2.0) over the result as a second line
// of defence. Links open in a new tab without the opener; headings start at h3, since an answer lives
// inside the page.
"use strict";

const Markdown = (() => {
  const md = window.markdownit({ html: false, linkify: false, typographer: false });
  const defaultLink = md.renderer.rules.link_open || ((tokens, i, options, env, self) => self.renderToken(tokens, i, options));
  md.renderer.rules.link_open = (tokens, i, options, env, self) => {
    tokens[i].attrSet("target", "_blank");
    tokens[i].attrSet("rel", "noopener noreferrer nofollow");
    return defaultLink(tokens, i, options, env, self);
  };
  md.core.ruler.push("shift_headings", (state) => {
    for (const token of state.tokens) {
      if (token.type === "heading_open" || token.type === "heading_close") {
        token.tag = `h${Math.min(6, Number(token.tag.slice(1)) + 2)}`;
      }
    }
  });
  function render(text) {
    return window.DOMPurify.sanitize(md.render(text), { ADD_ATTR: ["target"] });
  }

  return { render };
})();
