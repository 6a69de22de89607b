"""Reports: `report.md` and a self-contained `report.html` for any bequest output folder, built from what
the folder holds (metrics.jsonl curves, eval.json and the other final figures, recipe.yaml, the lineage
card, the summaries of upgrade, learn, lifelong, inherit chains and the demo). Nothing is measured here:
every figure is read from those files or computed from them.

- `write`: `write_report(folder)`, the one call every training verb makes when it finishes.
- `document`: what a folder's report says, picked by the files it holds; `demo`: a demo folder's.
- `metrics`: reading the files, and the figures derived from them (FLOPs to reach a loss, ...).
- `plots`: the figures, drawn with matplotlib; `render`: Markdown and HTML.
- `command`: the `bequest report DIR` verb.
"""

from bequest.report.write import FIGURES, write_report

__all__ = ["FIGURES", "write_report"]
