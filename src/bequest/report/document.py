"""What a folder's report says: sections picked by the files the folder holds. A verb's output gets its
summary (upgrade, learn, lifelong, an inherit chain, a grow), its final figures and training curves, its
lineage and its recipe; a demo folder gets the demo's story (`demo.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from bequest.errors import BequestError
from bequest.lineage import read_node
from bequest.lineage.folder import describe, growth_text, is_node
from bequest.report import plots
from bequest.report.metrics import fmt, read_json, rows, runs_under

# eval.json's figures worth a line, in this order, with what they mean.
FINAL = {
    "eval_loss": "validation loss", "eval_perplexity": "validation perplexity", "eval_accuracy": "validation accuracy",
    "train_loss": "mean training loss", "tokens": "training tokens", "flops": "training FLOPs",
    "teacher_flops": "the teacher's forward FLOPs", "flops_with_teacher": "FLOPs with the teacher's",
    "t_ki": "steps the teacher taught", "train_runtime": "training seconds",
}


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    id: str | None = None  # an HTML id, for a table a reader (or a test) looks for


@dataclass
class Figure:
    src: str  # path from the report: a figure of the folder's own, or report-figures/NAME.svg
    data: bytes
    caption: str

    @property
    def mime(self) -> str:
        return "image/svg+xml" if self.src.endswith(".svg") else "image/png"


@dataclass
class Code:
    text: str
    lang: str = ""


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph), Table, Figure, Code


@dataclass
class Doc:
    title: str
    intro: str
    sections: list[Section]

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def document(folder: Path, name: str, figures: str) -> Doc:
    if not folder.is_dir():
        raise BequestError(f"{folder}: no such folder; give a bequest output folder")
    from bequest.report import demo

    if (folder / demo.RECORD).is_file():
        return demo.document(folder, name, figures)
    kind = what(folder)
    sections = SUMMARIES[kind](folder, figures) if kind in SUMMARIES else []
    sections += run_sections(folder, figures)
    sections += lineage_section(folder) + recipe_section(folder)
    if not sections:
        raise BequestError(f"{folder} holds nothing bequest writes (no metrics, summaries, recipe or model card); "
                           "give a bequest output folder")
    return Doc(f"{kind}: {name}", f"What `{kind}` wrote into `{name}`, read back from the files there.", sections)


def what(folder: Path) -> str:
    """The operation that wrote the folder, as far as its files tell."""
    summary = read_json(folder / "summary.json")
    if "sources" in summary:
        return "upgrade"
    if "generations" in summary:
        return "inherit chain"
    if (folder / "matrix.json").is_file():
        return "learn"
    if "stages" in read_json(folder / "metrics.json"):
        return "lifelong"
    if is_node(folder):
        return read_node(folder).operation or "model"
    return "output"


# ---------------------------------------------------------------- what one run wrote


def run_sections(folder: Path, figures: str, title: str = "Final figures and training curves") -> list[Section]:
    """eval.json's figures and metrics.jsonl's curves of a folder that trained (empty otherwise)."""
    final, log = read_json(folder / "eval.json"), rows(folder)
    if not final and not log:
        return []
    section = Section(title)
    shown = [[meaning, fmt(final[key])] for key, meaning in FINAL.items() if isinstance(final.get(key), (int, float))]
    if shown:
        section.blocks.append(Table(["figure", "value"], shown))
    section.blocks += charts(figures, plots.curves([("", log)]), "against optimizer steps, from metrics.jsonl")
    return [section]


def charts(figures: str, drawn: list[tuple[str, bytes]], caption: str) -> list[Figure]:
    """`plots.curves`' charts as figures of the report's own."""
    return [Figure(f"{figures}/{name}.svg", svg, f"{name} {caption}") for name, svg in drawn]


def lineage_section(folder: Path) -> list[Section]:
    if not is_node(folder):
        return []
    node = read_node(folder)
    facts = [["kind", node.kind], ["made by", node.operation or "no record"],
             ["parent", node.recorded or "none (trained from scratch)"]]
    if node.source is not None:
        facts.append(["carried from", str(node.source)])
    if node.shape:
        facts.append(["shape", describe(node.shape)])
    if node.growth:
        facts.append(["grown while training", growth_text(node.growth)])
    if node.peft_type:
        facts.append(["PEFT type", node.peft_type])
    return [Section("Lineage", [Table(["lineage", "as recorded"], facts)])]


def recipe_section(folder: Path) -> list[Section]:
    recipe = folder / "recipe.yaml"
    if not recipe.is_file():
        return []
    return [Section("Recipe", ["The resolved settings; `--recipe recipe.yaml` repeats the run.",
                               Code(recipe.read_text(encoding="utf-8"), "yaml")])]


# ---------------------------------------------------------------- summaries by kind


def upgrade_sections(folder: Path, figures: str) -> list[Section]:
    summary = read_json(folder / "summary.json")
    head = ["source", "kind", "path", "status", "on OLD", "NEW, step 0", "NEW, tuned", "fresh, tuned"]
    table = [[Path(s["source"]).name, s.get("kind") or "", s.get("path") or "", s["status"], fmt(s.get("acc_old")),
              fmt(s.get("acc_step0")), fmt(s.get("acc_final")), fmt((s.get("fresh") or {}).get("acc_final"))]
             for s in summary["sources"]]
    section = Section("Upgrade", [f"`{summary['from']}` → `{summary['to']}` ({summary['relation']}); validation "
                                  "accuracy of each source.", Table(head, table)])
    if (folder / "summary.png").is_file():
        section.blocks.append(Figure("summary.png", (folder / "summary.png").read_bytes(),
                                     "accuracy against tuning steps: upgraded, fresh, and on OLD"))
    return [section]


def learn_sections(folder: Path, figures: str) -> list[Section]:
    matrix, metrics = read_json(folder / "matrix.json"), read_json(folder / "metrics.json")
    tasks = matrix["tasks"]
    grid = [[f"after {t}", *map(fmt, row)] for t, row in zip(tasks, matrix["accuracy"])]
    if "initial" in matrix:  # written since forward transfer is measured
        grid.insert(0, ["before training", *map(fmt, matrix["initial"])])
    scores = [[meaning, fmt(metrics.get(k))] for k, meaning in (("average_accuracy", "average accuracy (ACC)"),
                                                               ("last_task_accuracy", "accuracy on the last task"),
                                                               ("bwt", "backward transfer (BWT)"),
                                                               ("fwt", "forward transfer (FWT)"),
                                                               ("forgetting", "forgetting"))
              if k in metrics]
    section = Section("Task stream", [f"`{metrics.get('method')}` through {', '.join(tasks)}: accuracy on every "
                                      "task after each one.", Table(["", *tasks], grid),
                                      Table(["figure", "value"], scores)])
    if (folder / "heatmap.png").is_file():
        section.blocks.append(Figure("heatmap.png", (folder / "heatmap.png").read_bytes(), "the accuracy matrix"))
    section.blocks += charts(figures, plots.curves(runs_under(folder / "tasks"), stream=True),
                             "of each task's training, one after the other")
    return [section]


def lifelong_sections(folder: Path, figures: str) -> list[Section]:
    metrics = read_json(folder / "metrics.json")
    table = [[str(s["stage"]), s["domain"], fmt(s.get("steps")), fmt(s.get("flops")), fmt(s.get("AP")),
              fmt(s.get("AP+"))] for s in metrics["stages"]]
    section = Section("Domain stream", [f"`{metrics.get('method')}` through {', '.join(metrics['domains'])}.",
                                        Table(["stage", "domain", "steps", "FLOPs", "AP", "AP+"], table)])
    for png, caption in (("ap.png", "AP and AP+ per stage"), ("domains.png", "each domain's perplexity per stage")):
        if (folder / png).is_file():
            section.blocks.append(Figure(png, (folder / png).read_bytes(), caption))
    section.blocks += charts(figures, plots.curves(runs_under(folder), stream=True),
                             "of each stage's training, one after the other")
    return [section]


def chain_sections(folder: Path, figures: str) -> list[Section]:
    summary = read_json(folder / "summary.json")
    table = [[str(g["generation"]), Path(g["folder"]).name, f"{g['layers']}x{g['hidden']}", g.get("init") or "",
              fmt(g.get("eval_loss")), fmt(g.get("flops")), fmt(g.get("flops_with_teacher"))]
             for g in summary["generations"]]
    section = Section("Generations", [f"Each student taught by the one before, from `{summary['teacher']}`.",
                                      Table(["generation", "folder", "shape", "start", "validation loss", "FLOPs",
                                             "with the teacher's"], table)])
    section.blocks += charts(figures, plots.curves(runs_under(folder)), "of each generation's training")
    return [section]


def grow_sections(folder: Path, figures: str) -> list[Section]:
    growth = read_json(folder / "growth.json")
    table = [["from", growth.get("from", "")], ["to", growth.get("to", "")],
             ["operators", f"{growth.get('width')} width, {growth.get('depth')} depth"],
             ["max |Δ logits| against the source", fmt(growth.get("max_abs_logit_change"))]]
    return [Section("Growth", [Table(["figure", "value"], table)])]


SUMMARIES = {"upgrade": upgrade_sections, "learn": learn_sections, "lifelong": lifelong_sections,
             "inherit chain": chain_sections, "grow": grow_sections}
