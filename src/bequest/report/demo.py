"""A `bequest demo` folder's report: its seven stages, read back from the folders they wrote.

The folder names live here (the demo writes where its report reads), and so does each stage's one-line
result: the demo prints the line this module makes from the files a stage has just written, so what the
terminal shows, what demo.json records and what the report says are the same figures.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import yaml

from bequest.lineage import read_node, scan
from bequest.lineage.folder import describe
from bequest.report import plots
from bequest.report.document import Code, Doc, Figure, Section, Table, charts
from bequest.report.metrics import first_step, fmt, percent, read_json, reach, rows, series

RECORD = "demo.json"  # settings, and every finished stage: seconds, result line, figures
G1, G1_NEXT, G2_BORN, G2, SCRATCH, ZOO = "g1", "g1-next", "g2-born", "g2", "scratch", "zoo"
UPGRADED = {"continue": "upgrade-g1-next", "upgrade": "upgrade-g2"}
LEARN = {"migu": "learn-migu", "seq": "learn-seq"}
LINEAGE = "lineage.png"
STAGES = {
    "pretrain": "pre-train the ancestor G1",
    "zoo": "tune adapters and a full fine-tune of G1 on different tasks",
    "continue": "continue G1 on a new domain (G1'), upgrade the zoo onto G1' against fresh tuning",
    "grow": "grow G1 into G2, train G2 with G1 as its teacher against a same-size model from scratch",
    "upgrade": "upgrade the zoo onto G2 along the growth maps against fresh tuning",
    "learn": "learn a task stream on G2: MIGU against sequential fine-tuning",
    "lineage": "draw the family tree",
}


# ---------------------------------------------------------------- each stage's figures


def facts(stage: str, out: Path) -> dict:
    """The figures of a finished stage, read from the folders it wrote."""
    return FACTS[stage](Path(out))


def line(stage: str, f: dict) -> str:
    """A stage's result in one line."""
    return LINES[stage](f)


def _pretrain(out: Path) -> dict:
    final, recipe = read_json(out / G1 / "eval.json"), _recipe(out / G1)
    return {"shape": describe(read_node(out / G1).shape), "steps": recipe["steps"], "domain": recipe["domain"],
            "eval_loss": final["eval_loss"], "flops": final["flops"]}


def _zoo(out: Path) -> dict:
    sources = []
    for folder in sorted(p for p in (out / ZOO).iterdir() if p.is_dir() and not p.name.startswith(".")):
        recipe = _recipe(folder)
        sources.append({"name": folder.name, "kind": recipe.get("peft") or "full", "data": recipe["data"],
                        "steps": recipe["steps"], "accuracy": read_json(folder / "eval.json")["eval_accuracy"]})
    return {"sources": sources}


def _upgraded(folder: Path) -> dict:
    """Per source: accuracy on OLD, on NEW at step 0 and tuned, beside fresh tuning; and the steps each
    takes to reach fresh tuning's best accuracy."""
    summary, sources = read_json(folder / "summary.json"), []
    for s in summary["sources"]:
        fresh = s.get("fresh") or {}
        best = max((a for _, a in fresh.get("curve", [])), default=None)
        sources.append({
            "name": Path(s["source"]).name, "kind": s.get("kind"), "path": s.get("path"), "status": s["status"],
            "steps": s.get("steps"), "acc_old": s.get("acc_old"), "acc_step0": s.get("acc_step0"),
            "acc_final": s.get("acc_final"), "fresh_step0": fresh.get("acc_step0"),
            "fresh_final": fresh.get("acc_final"), "fresh_best": best,
            "steps_to_best": None if best is None else first_step(s.get("curve", []), best),
            "fresh_steps_to_best": None if best is None else first_step(fresh["curve"], best),
        })
    means = {k: _mean([s[k] for s in sources]) for k in ("acc_step0", "acc_final", "fresh_step0", "fresh_final")}
    return {"relation": summary["relation"], "sources": sources, "mean": means}


def _continue(out: Path) -> dict:
    recipe = _recipe(out / G1_NEXT)
    return {"domain": recipe["domain"], "steps": recipe["steps"],
            "eval_loss": read_json(out / G1_NEXT / "eval.json")["eval_loss"], **_upgraded(out / UPGRADED["continue"])}


def _grow(out: Path) -> dict:
    growth, g2, scratch = (read_json(out / name / file) for name, file in
                           ((G2_BORN, "growth.json"), (G2, "eval.json"), (SCRATCH, "eval.json")))
    target, log = scratch["eval_loss"], rows(out / G2)
    flops = reach(series(log, "eval_loss", "flops"), target)
    step = reach(series(log, "eval_loss", "step"), target)
    # The teacher reads every batch of the first t_ki steps, the same number of tokens each step.
    teacher = None if step is None else g2["teacher_flops"] * min(step, g2["t_ki"]) / max(1, g2["t_ki"])
    g1 = read_json(out / G1 / "eval.json")["flops"]
    f = {"from": growth["from"], "to": growth["to"], "max_abs_logit_change": growth["max_abs_logit_change"],
         "steps": _recipe(out / G2)["steps"], "target": target, "scratch_flops": scratch["flops"],
         "g2_loss": g2["eval_loss"], "g2_flops": g2["flops"], "flops_to_target": flops, "teacher_flops": teacher,
         "g1_flops": g1, "saved": None, "saved_with_teacher": None, "saved_with_g1": None}
    if flops is not None:
        f.update(saved=1 - flops / scratch["flops"], saved_with_teacher=1 - (flops + teacher) / scratch["flops"],
                 saved_with_g1=1 - (flops + teacher + g1) / scratch["flops"])
    return f


def _learn(out: Path) -> dict:
    found = {}
    for method, name in LEARN.items():
        m = read_json(out / name / "metrics.json")
        found[method] = {k: m[k] for k in ("average_accuracy", "bwt", "forgetting", "tasks")}
    return found


def _lineage(out: Path) -> dict:
    graph = scan([out])
    kinds = [n.kind for n in graph.nodes.values()]
    return {"folders": len(graph.nodes), "models": kinds.count("model"), "fine-tunes": kinds.count("fine-tune"),
            "adapters": kinds.count("adapter"), "generations": max(g or 0 for g in graph.generations.values()),
            "text": graph.text()}


FACTS = {"pretrain": _pretrain, "zoo": _zoo, "continue": _continue, "grow": _grow,
         "upgrade": lambda out: _upgraded(out / UPGRADED["upgrade"]), "learn": _learn, "lineage": _lineage}


def _moved(f: dict) -> str:
    m, steps = f["mean"], f["sources"][0]["steps"]
    return (f"mean accuracy {fmt(m['acc_step0'])} right after the move (fresh {fmt(m['fresh_step0'])}), "
            f"{fmt(m['acc_final'])} after {steps} steps (fresh {fmt(m['fresh_final'])})")


def _grew(f: dict) -> str:
    head = f"{f['from']} → {f['to']}, max |Δ logits| {fmt(f['max_abs_logit_change'])}; "
    if f["flops_to_target"] is None:
        return head + (f"growth + KI did not reach scratch's final loss {fmt(f['target'])} in {f['steps']} steps "
                       f"(it ended at {fmt(f['g2_loss'])})")
    return head + (f"growth + KI reaches scratch's final loss {fmt(f['target'])} with {fmt(f['flops_to_target'])} "
                   f"FLOPs against {fmt(f['scratch_flops'])}: {percent(f['saved'])} saved, "
                   f"{percent(f['saved_with_g1'])} counting the teacher's forward passes and G1's own pre-training")


LINES = {
    "pretrain": lambda f: (f"G1 {f['shape']}: validation loss {fmt(f['eval_loss'])} after {f['steps']} steps on "
                           f"`{f['domain']}` ({fmt(f['flops'])} FLOPs)"),
    "zoo": lambda f: "validation accuracy " + ", ".join(f"{s['name']} {fmt(s['accuracy'])}" for s in f["sources"]),
    "continue": lambda f: f"G1' validation loss {fmt(f['eval_loss'])} on `{f['domain']}`; zoo reused: " + _moved(f),
    "grow": _grew,
    "upgrade": lambda f: f"zoo ported along the growth maps: {_moved(f)}",
    "learn": lambda f: (f"average accuracy {fmt(f['migu']['average_accuracy'])} with MIGU, "
                        f"{fmt(f['seq']['average_accuracy'])} sequential; forgetting "
                        f"{fmt(f['migu']['forgetting'])} against {fmt(f['seq']['forgetting'])}"),
    "lineage": lambda f: (f"{f['folders']} folders ({f['models']} models, {f['fine-tunes']} fine-tunes, "
                          f"{f['adapters']} adapters) over {f['generations']} generations → {LINEAGE}"),
}


# ---------------------------------------------------------------- the report


def document(out: Path, name: str, figures: str) -> Doc:
    record = read_json(out / RECORD)
    done = [s for s in STAGES if s in record.get("stages", {})]
    found = {s: facts(s, out) for s in done}
    size = "quick" if record.get("settings", {}).get("quick") else "full"
    intro = (f"`bequest demo` ({size} run): a small model G1, everything tuned on it, and its successors, with "
             f"every trained weight passed on. {len(done)} of {len(STAGES)} stages done; every figure below was "
             "measured in this run and is read from the files in this folder.")
    stages = Table(["stage", "what", "result", "seconds"],
                   [[f"{k}. {s}", what, line(s, found[s]) if s in found else "not run yet",
                     fmt(record["stages"][s]["seconds"]) if s in found else "—"]
                    for k, (s, what) in enumerate(STAGES.items(), 1)])
    savings = [_savings(found), *([_growth_chart(out, found["grow"], figures)] if "grow" in found else [])]
    sections = [Section("Savings", savings), Section("Stages", [stages])]
    for k, s in enumerate(STAGES, 1):
        if s in found:
            sections.append(Section(f"{k}. {STAGES[s]}", [line(s, found[s]), *DETAILS[s](out, found[s], figures)]))
    return Doc(f"bequest demo: {name}", intro, sections)


def _savings(found: dict) -> Table:
    rows_ = []
    if "grow" in found:
        f = found["grow"]
        saved = "not reached" if f["saved"] is None else (
            f"{percent(f['saved'])} ({percent(f['saved_with_teacher'])} with the teacher's forward passes, "
            f"{percent(f['saved_with_g1'])} also counting G1's pre-training)")
        rows_.append([f"G2's pre-training FLOPs to reach scratch's final validation loss {fmt(f['target'])}",
                      f"growth + KI: {fmt(f['flops_to_target'])}", f"scratch: {fmt(f['scratch_flops'])}", saved])
    for stage, onto in (("continue", "G1'"), ("upgrade", "G2")):
        for s in found.get(stage, {}).get("sources", []):
            if s["fresh_best"] is None:
                continue
            got, need = s["steps_to_best"], s["fresh_steps_to_best"]
            saved = "not reached" if got is None else "—" if not need else percent(1 - got / need)
            rows_.append([f"{s['name']} onto {onto}: tuning steps to fresh tuning's best accuracy "
                          f"{fmt(s['fresh_best'])}", f"{s['path']}: {fmt(got) if got is not None else 'not reached'}",
                          f"fresh: {fmt(need)}", saved])
    if "learn" in found:
        m, q = found["learn"]["migu"], found["learn"]["seq"]
        delta = (f"{_signed(m['average_accuracy'] - q['average_accuracy'])} accuracy, "
                 f"{_signed(None if m['forgetting'] is None else m['forgetting'] - q['forgetting'])} forgetting")
        rows_.append(["task stream on G2: average accuracy / forgetting",
                      f"MIGU: {fmt(m['average_accuracy'])} / {fmt(m['forgetting'])}",
                      f"sequential: {fmt(q['average_accuracy'])} / {fmt(q['forgetting'])}", delta])
    return Table(["what", "bequest", "baseline", "saved"], rows_, id="savings")


def _signed(v) -> str:
    return "—" if v is None else ("+" if v >= 0 else "−") + fmt(abs(v))


# ---------------------------------------------------------------- each stage's details


def _pretrain_details(out: Path, f: dict, figures: str) -> list:
    return charts(figures, plots.curves([("G1", rows(out / G1))]), "of G1's training against optimizer steps")


def _zoo_details(out: Path, f: dict, figures: str) -> list:
    return [Table(["folder", "kind", "task", "steps", "validation accuracy"],
                  [[s["name"], s["kind"], s["data"], fmt(s["steps"]), fmt(s["accuracy"])] for s in f["sources"]])]


def _upgrade_details(folder: Path, f: dict) -> list:
    head = ["source", "path", "on G1", "step 0", "tuned", "fresh step 0", "fresh tuned", "steps to fresh's best",
            "fresh's steps to it"]
    table = [[s["name"], s["path"] or s["status"], *map(fmt, (s["acc_old"], s["acc_step0"], s["acc_final"],
              s["fresh_step0"], s["fresh_final"], s["steps_to_best"], s["fresh_steps_to_best"]))]
             for s in f["sources"]]
    blocks = ["Validation accuracy of each source; 'steps to fresh's best': the first evaluated tuning step at "
              "which the upgraded source reaches the best accuracy fresh tuning reached.", Table(head, table)]
    if (folder / "summary.png").is_file():
        blocks.append(Figure(f"{folder.name}/summary.png", (folder / "summary.png").read_bytes(),
                             "accuracy against tuning steps: upgraded against fresh; dashed: on G1"))
    return blocks


def _growth_chart(out: Path, f: dict, figures: str) -> Figure:
    """The headline saving as a picture: G2 (grown from G1, taught by it) against scratch, loss per FLOP."""
    lines = [plots.Line("growth + KI (G2)", series(rows(out / G2), "eval_loss", "flops"), plots.COLORS[0]),
             plots.Line("scratch", series(rows(out / SCRATCH), "eval_loss", "flops"), plots.COLORS[1])]
    marks = [] if f["flops_to_target"] is None else [("G2 reaches it", f["flops_to_target"])]
    drawn = plots.chart("validation loss against training compute", "training FLOPs", "validation loss", lines,
                        [("scratch's final loss", f["target"])], marks)
    return Figure(f"{figures}/growth.svg", drawn,
                  "validation loss against training FLOPs: G2 grown from G1 and taught by it, against scratch")


def _grow_details(out: Path, f: dict, figures: str) -> list:
    table = [["max |Δ logits|, G2 as grown against G1", fmt(f["max_abs_logit_change"])],
             ["scratch's final validation loss (the target)", fmt(f["target"])],
             ["scratch's training FLOPs", fmt(f["scratch_flops"])],
             ["growth + KI's FLOPs to reach the target", fmt(f["flops_to_target"])],
             ["the teacher's forward FLOPs until then", fmt(f["teacher_flops"])],
             ["G1's own pre-training FLOPs", fmt(f["g1_flops"])],
             [f"G2's final validation loss after {f['steps']} steps", fmt(f["g2_loss"])]]
    return [Table(["figure", "value"], table), "Their loss against compute is the chart under Savings."]


def _learn_details(out: Path, f: dict, figures: str) -> list:
    table = [[name, fmt(m["average_accuracy"]), fmt(m["bwt"]), fmt(m["forgetting"])]
             for name, m in (("MIGU", f["migu"]), ("sequential", f["seq"]))]
    blocks = [f"Tasks in order: {', '.join(f['migu']['tasks'])}.",
              Table(["method", "average accuracy", "backward transfer", "forgetting"], table)]
    for method, name in LEARN.items():
        if (out / name / "heatmap.png").is_file():
            blocks.append(Figure(f"{name}/heatmap.png", (out / name / "heatmap.png").read_bytes(),
                                 f"accuracy matrix, {'MIGU' if method == 'migu' else 'sequential'}"))
    return blocks


def _lineage_details(out: Path, f: dict, figures: str) -> list:
    blocks = []
    if (out / LINEAGE).is_file():
        blocks.append(Figure(LINEAGE, (out / LINEAGE).read_bytes(), "the family tree, drawn from the folders' records"))
    return blocks + [Code(f["text"])]


DETAILS = {
    "pretrain": _pretrain_details, "zoo": _zoo_details,
    "continue": lambda out, f, figures: _upgrade_details(out / UPGRADED["continue"], f),
    "grow": _grow_details,
    "upgrade": lambda out, f, figures: _upgrade_details(out / UPGRADED["upgrade"], f),
    "learn": _learn_details, "lineage": _lineage_details,
}


def _recipe(folder: Path) -> dict:
    return yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8")) or {}


def _mean(values: list):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None
