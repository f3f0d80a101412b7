// Markdown → DOM nodes, for model answers. Safe by construction: every piece of text becomes a Text
// node (nothing is ever parsed as HTML, so "<img onerror=…>" shows as those characters), links are
// made only for http(s) and mailto URLs, and images are not loaded (their syntax shows as text).
//
// Covered: paragraphs (single newlines kept as line breaks), ATX headings, fenced code blocks (an
// unclosed fence runs to the end, as while streaming), indented-marker lists (nested, ordered with a
// start), block quotes, horizontal rules, pipe tables; inline code, **strong**, *em* / _em_, ~~del~~,
// [links](https://…) and backslash escapes.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^([ \t]*)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const TABLE_RULE = /^[ \t]*\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
const SAFE_URL = /^(https?:\/\/|mailto:)/i;
const PUNCTUATION = /[!-/:-@[-`{-~]/;

export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  fragment.append(...blocks(text.replace(/\r\n?/g, "\n").split("\n")));
  return fragment;
}

function el(tag, ...children) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}

// ---- blocks ----------------------------------------------------------------------------------

function blocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    if (!lines[i].trim()) {
      i += 1;
      continue;
    }
    const [node, next] = block(lines, i);
    out.push(node);
    i = next;
  }
  return out;
}

// The block starting at lines[i] (not blank) and the index after it.
function block(lines, i) {
  const line = lines[i];
  let match;
  if ((match = FENCE.exec(line))) return fenced(lines, i, match);
  if ((match = HEADING.exec(line))) return [el(`h${match[1].length}`, ...inline(match[2])), i + 1];
  if (RULE.test(line)) return [el("hr"), i + 1];
  if (QUOTE.test(line)) return quote(lines, i);
  if (ITEM.test(line)) return list(lines, i);
  if (isTable(lines, i)) return table(lines, i);
  return paragraph(lines, i);
}

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line) ||
    isTable(lines, i);
}

function paragraph(lines, i) {
  const p = el("p");
  let first = true;
  do {
    if (!first) p.append(el("br"));
    p.append(...inline(lines[i].trim()));
    first = false;
    i += 1;
  } while (i < lines.length && lines[i].trim() && !startsBlock(lines, i));
  return [p, i];
}

function fenced(lines, i, match) {
  const fence = match[1];
  const body = [];
  i += 1;
  while (i < lines.length && !isClosingFence(lines[i], fence)) body.push(lines[i++]);
  return [codeBlock(body.join("\n"), match[2]), i + 1];
}

function isClosingFence(line, fence) {
  const trimmed = line.trim();
  return trimmed.length >= fence.length && trimmed === fence[0].repeat(trimmed.length);
}

function codeBlock(code, language) {
  const wrap = el("div");
  wrap.className = "code";
  const head = el("div");
  head.className = "code-head";
  head.append(el("span", language || "code"));
  const copy = el("button", "Copy");
  copy.type = "button";
  copy.className = "copy";
  copy.addEventListener("click", () => {
    navigator.clipboard?.writeText(code).then(
      () => flash(copy, "Copied"),
      () => flash(copy, "Copy failed"),
    );
  });
  head.append(copy);
  const codeNode = el("code", code);
  if (/^[\w+#.-]+$/.test(language)) codeNode.className = `language-${language}`;
  wrap.append(head, el("pre", codeNode));
  return wrap;
}

function flash(button, text) {
  button.textContent = text;
  setTimeout(() => (button.textContent = "Copy"), 1200);
}

function quote(lines, i) {
  const body = [];
  let match;
  while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
    body.push(match[1]);
    i += 1;
  }
  return [el("blockquote", ...blocks(body)), i];
}

function list(lines, start) {
  const first = ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const match = ITEM.exec(lines[i]);
    if (!match || match[1].length !== indent || /\d/.test(match[2]) !== ordered) break;
    const width = match[1].length + match[2].length + 1;
    const body = [match[3]];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      const lead = line.length - line.trimStart().length;
      if (!line.trim()) {
        const next = nextNonBlank(lines, i);
        if (next < 0 || (lines[next].length - lines[next].trimStart().length) <= indent) break;
        body.push("");
      } else if (lead > indent) {
        body.push(line.slice(Math.min(lead, width)));
      } else if (!startsBlock(lines, i) && body[body.length - 1].trim()) {
        body.push(line.trim()); // a lazy continuation of the item's paragraph
      } else {
        break;
      }
      i += 1;
    }
    const parts = blocks(body);
    const item = el("li");
    if (parts.length >= 1 && parts[0].tagName === "P") item.append(...parts.shift().childNodes);
    item.append(...parts);
    node.append(item);
    const next = nextNonBlank(lines, i);
    if (next > i) {
      const after = ITEM.exec(lines[next]);
      if (!after || after[1].length !== indent || /\d/.test(after[2]) !== ordered) break;
      i = next;
    }
  }
  return [node, i];
}

function nextNonBlank(lines, i) {
  for (let j = i; j < lines.length; j += 1) if (lines[j].trim()) return j;
  return -1;
}

function isTable(lines, i) {
  return lines[i].includes("|") && i + 1 < lines.length && lines[i + 1].includes("-") &&
    lines[i + 1].includes("|") && TABLE_RULE.test(lines[i + 1]);
}

function table(lines, i) {
  const aligns = cells(lines[i + 1]).map((cell) => {
    const left = cell.startsWith(":");
    const right = cell.endsWith(":");
    return left && right ? "center" : right ? "right" : left ? "left" : "";
  });
  const row = (text, tag) => {
    const tr = el("tr");
    cells(text).forEach((cell, column) => {
      const td = el(tag, ...inline(cell));
      if (aligns[column]) td.style.textAlign = aligns[column];
      tr.append(td);
    });
    return tr;
  };
  const head = el("thead", row(lines[i], "th"));
  const body = el("tbody");
  i += 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) body.append(row(lines[i++], "td"));
  const wrap = el("div", el("table", head, body));
  wrap.className = "table-wrap";
  return [wrap, i];
}

function cells(line) {
  let text = line.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  return text.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

// ---- inline ----------------------------------------------------------------------------------

const LINK = /^\[([^\]\n]*)\]\(\s*([^()\s]+)(?:\s+"[^"\n]*")?\s*\)/;

export function inline(text) {
  const out = [];
  let plain = "";
  const flush = () => {
    if (plain) out.push(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && PUNCTUATION.test(text[i + 1])) {
      plain += text[i + 1];
      i += 2;
    } else if (c === "`") {
      const run = /^`+/.exec(text.slice(i))[0];
      const close = text.indexOf(run, i + run.length);
      if (close < 0) {
        plain += run;
        i += run.length;
        continue;
      }
      flush();
      let code = text.slice(i + run.length, close);
      if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ")) code = code.slice(1, -1);
      out.push(el("code", code));
      i = close + run.length;
    } else if (c === "!" && text[i + 1] === "[") {
      plain += "![";  // an image: shown as text, never loaded
      i += 2;
    } else if (c === "[" && LINK.test(text.slice(i))) {
      const match = LINK.exec(text.slice(i));
      if (SAFE_URL.test(match[2])) {
        flush();
        const link = el("a", ...inline(match[1]));
        link.href = match[2];
        link.target = "_blank";
        link.rel = "noopener noreferrer";
        out.push(link);
      } else {
        plain += match[0];
      }
      i += match[0].length;
    } else if (c === "*" || c === "_" || c === "~") {
      const size = text[i + 1] === c ? 2 : 1;
      const end = emphasisEnd(text, i, c, size);
      if (end < 0 || (c === "~" && size === 1)) {
        plain += c.repeat(size);
        i += size;
        continue;
      }
      flush();
      const tag = c === "~" ? "del" : size === 2 ? "strong" : "em";
      out.push(el(tag, ...inline(text.slice(i + size, end))));
      i = end + size;
    } else {
      plain += c;
      i += 1;
    }
  }
  flush();
  return out;
}

// Where the emphasis opened at text[i] (size delimiters c) closes, or -1.
function emphasisEnd(text, i, c, size) {
  const after = text[i + size];
  const before = text[i - 1];
  if (!after || /\s/.test(after) || (c === "_" && before && /\w/.test(before))) return -1;
  const delimiter = c.repeat(size);
  for (let j = i + size + 1; j <= text.length - size; j += 1) {
    if (text[j] === "`") {
      const run = /^`+/.exec(text.slice(j))[0];
      const close = text.indexOf(run, j + run.length);
      if (close > 0) j = close + run.length - 1;
      continue;
    }
    if (!text.startsWith(delimiter, j) || /\s/.test(text[j - 1])) continue;
    if (size === 1 && (text[j + 1] === c || text[j - 1] === c)) continue;
    if (c === "_" && text[j + size] && /\w/.test(text[j + size])) continue;
    return j;
  }
  return -1;
}
