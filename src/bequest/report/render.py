"""A report as Markdown (figures by relative path) and as one self-contained HTML page (figures as
data: URIs, no script or style from the network)."""

from __future__ import annotations

import base64
import html as escape

from bequest.report.document import Code, Doc, Figure, Table

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.7em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; } th { background: #f3f5f7; }
td:not(:first-child) { font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
#savings th { background: #e3f2dc; }
"""
# After load, the page records how many of its images decoded: a headless browser dumping the DOM (the
# report test) reads it back, as a person would see a broken image.
CHECK = """
addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
});
"""


def markdown(doc: Doc) -> str:
    out = [f"# {doc.title}", "", doc.intro, ""]
    for section in doc.sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                out += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                out.append(f"![{block.caption}]({block.src})")
            elif isinstance(block, Code):
                out += [f"```{block.lang}", block.text.rstrip("\n"), "```"]
            else:
                out.append(block)
            out.append("")
    return "\n".join(out)


def html(doc: Doc) -> str:
    body = [f"<h1>{_inline(doc.title)}</h1>", f"<p>{_inline(doc.intro)}</p>"]
    for section in doc.sections:
        body.append(f"<h2>{_inline(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                ident = f' id="{block.id}"' if block.id else ""
                head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
                body.append(f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(block, Figure):
                data = base64.b64encode(block.data).decode("ascii")
                body.append(f'<figure><img src="data:{block.mime};base64,{data}" alt="{escape.escape(block.caption)}">'
                            f"<figcaption>{_inline(block.caption)}</figcaption></figure>")
            elif isinstance(block, Code):
                body.append(f"<pre><code>{escape.escape(block.text)}</code></pre>")
            else:
                body.append(f"<p>{_inline(block)}</p>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape.escape(doc.title)}</title>'
            f"<style>{STYLE}</style><script>{CHECK}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` and **bold** spans as HTML."""
    parts = escape.escape(text).split("`")
    out = []
    for k, part in enumerate(parts):
        if k % 2:
            out.append(f"<code>{part}</code>")
        else:
            bold = part.split("**")
            out.append("".join(f"<b>{b}</b>" if j % 2 else b for j, b in enumerate(bold)))
    return "".join(out)
