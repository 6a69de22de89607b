"""`bequest demo --quick` end to end (the README's first command; run once per session by conftest's
`demo_run`), its resume after a stop between stages, its report as a browser renders it, and `bequest
report` on the output of every training verb."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bequest.cli import app
from bequest.lineage import relation
from bequest.report.demo import G1, G1_NEXT, G2, LEARN, SCRATCH, STAGES, UPGRADED, ZOO
from bequest.report.metrics import fmt, percent

from conftest import STOP_AFTER, files_of

# The first test here to ask for conftest.demo_run runs the session's quick demo in its setup; under
# pytest-xdist, every test that asks for it runs on one worker (group "demo"), so the demo runs once.
pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("demo")]


def test_quick_demo_runs_every_stage(demo_run):
    out, said = demo_run["out"], demo_run["second"]
    record = json.loads((out / "demo.json").read_text())
    assert list(record["stages"]) == list(STAGES) and record["settings"] == {"quick": True}
    for k, stage in enumerate(STAGES, 1):  # one result line per stage, the recorded one
        assert f"[{k}/{len(STAGES)}] {stage}: {record['stages'][stage]['line']}" in said
    for folder in (G1, G1_NEXT, G2, SCRATCH, *UPGRADED.values(), *LEARN.values()):
        assert (out / folder / "report.md").is_file(), folder  # every verb wrote its own report
    assert {p.name for p in (out / ZOO).iterdir()} == {"kind-lora", "visibility-ia3", "arity-full"}
    assert (out / "lineage.png").stat().st_size > 0 and (out / "report.html").is_file()
    # G2 descends from G1 through the grown folder, so the zoo was ported along its maps.
    assert relation(out / G1, out / G2).kind == "grown" and relation(out / G1, out / G1_NEXT).kind == "continued"
    paths = {s["path"] for s in json.loads((out / UPGRADED["upgrade"] / "summary.json").read_text())["sources"]}
    assert paths == {"port"}
    assert float(re.search(r"max \|Δ logits\| (\S+);", said)[1]) < 1e-4  # growth kept G1's function


def test_demo_resumes_after_a_stop_between_stages(demo_run):
    out, first, second = demo_run["out"], demo_run["first"], demo_run["second"]
    assert list(demo_run["stopped"]["stages"]) == list(STAGES)[:STOP_AFTER]
    for k, stage in enumerate(STAGES, 1):
        ran_first = f"[{k}/{len(STAGES)}] {stage}: " in first
        skipped = f"[{k}/{len(STAGES)}] {stage}: {demo_run['stopped']['stages'].get(stage, {}).get('line')} " \
                  "(done earlier, skipped)" in second
        assert (ran_first, skipped) == ((True, True) if k <= STOP_AFTER else (False, False)), stage
    for name, files in demo_run["left"].items():  # not one file of a finished stage was written again
        now = files_of(out / name)
        assert {k: now[k] for k in files if not k.startswith("report")} == \
               {k: v for k, v in files.items() if not k.startswith("report")}, name


def _numbers(value) -> list[float]:
    """Every number in a parsed JSON or YAML record."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def _recorded(out: Path) -> list[float]:
    """Every number the run's files hold."""
    found = []
    for path in out.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(out).parts) or not path.is_file():
            continue
        if path.suffix == ".json":
            found += _numbers(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            found += [x for line in path.read_text().splitlines() for x in _numbers(json.loads(line))]
        elif path.name == "recipe.yaml":
            found += _numbers(yaml.safe_load(path.read_text()))
    return found


def _first_crossing(points, target):
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target:
            return x1 if y0 <= target else x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return points[0][0] if points[0][1] <= target else None


def _derived(out: Path) -> list[float]:
    """The figures a report derives (crossings, savings, means, differences), computed here afresh."""
    read = lambda *p: json.loads(out.joinpath(*p).read_text())  # noqa: E731
    rows = [json.loads(x) for x in (out / G2 / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    target, scratch = read(SCRATCH, "eval.json")["eval_loss"], read(SCRATCH, "eval.json")["flops"]
    g2 = read(G2, "eval.json")
    flops = _first_crossing([(r["flops"], r["eval_loss"]) for _, r in sorted(evals.items())], target)
    step = _first_crossing([(s, r["eval_loss"]) for s, r in sorted(evals.items())], target)
    out_ = []
    if flops is not None:
        teacher = g2["teacher_flops"] * min(step, g2["t_ki"]) / g2["t_ki"]
        g1 = read(G1, "eval.json")["flops"]
        out_ += [flops, teacher, 1 - flops / scratch, 1 - (flops + teacher) / scratch,
                 1 - (flops + teacher + g1) / scratch]
    for folder in UPGRADED.values():
        sources = read(folder, "summary.json")["sources"]
        for key in ("acc_step0", "acc_final"):
            out_.append(sum(s[key] for s in sources) / len(sources))
            out_.append(sum(s["fresh"][key] for s in sources) / len(sources))
        for s in sources:
            best = max(a for _, a in s["fresh"]["curve"])
            got = next((st for st, a in s["curve"] if a >= best - 1e-9), None)
            need = next(st for st, a in s["fresh"]["curve"] if a >= best - 1e-9)
            out_ += [best] + ([1 - got / need] if got is not None and need else [])
    migu, seq = (read(LEARN[m], "metrics.json") for m in ("migu", "seq"))
    out_ += [abs(migu["average_accuracy"] - seq["average_accuracy"]), abs(migu["forgetting"] - seq["forgetting"])]
    return out_


def test_every_figure_in_the_report_is_read_from_the_runs_files(demo_run):
    out = demo_run["out"]
    text = re.sub(r"```.*?```", "", (out / "report.md").read_text(), flags=re.S)  # the lineage tree: names
    text = re.sub(r"!\[[^]]*\]\([^)]*\)", "", text)
    pool = _recorded(out) + _derived(out)
    printed = re.findall(r"(?<![\w.])(\d+\.\d+(?:e[+-]\d+)?)(%?)", text)
    assert len(printed) > 30
    for number, is_percent in printed:
        value = float(number) / (100 if is_percent else 1)
        digits = len(number.split("e")[0].split(".")[1])
        scale = 10 ** int(number.split("e")[1]) if "e" in number else 1
        slack = 0.5 * 10 ** -digits * scale / (100 if is_percent else 1) * 1.0001
        assert any(abs(value - q) <= slack for q in pool), f"{number}{is_percent} in report.md comes from no file"
    # The savings table, cell by cell, against the files themselves.
    savings = text.split("## Savings")[1].split("## ")[0]
    scratch = json.loads((out / SCRATCH / "eval.json").read_text())
    assert f"scratch's final validation loss {fmt(scratch['eval_loss'])}" in savings
    assert f"scratch: {fmt(scratch['flops'])}" in savings
    derived = _derived(out)
    if "not reached" not in savings.splitlines()[2]:
        assert f"growth + KI: {fmt(derived[0])}" in savings and percent(derived[2]) in savings
    migu = json.loads((out / LEARN["migu"] / "metrics.json").read_text())
    assert f"MIGU: {fmt(migu['average_accuracy'])} / {fmt(migu['forgetting'])}" in savings


def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_report_html_renders_in_a_browser(demo_run):
    """As a person would see it: a headless Chromium loads report.html with no network; every image decodes
    (the page's own script counts them into the DOM) and the savings table is there."""
    browser = _browser()
    if browser is None:
        message = "no chromium; install it (apt-get install -y chromium) to check report.html in a browser"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    page = demo_run["out"] / "report.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch: the page is the whole report
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images, loaded = re.search(r'data-images="(\d+)" data-loaded="(\d+)"', dom).groups()
    assert int(images) == html.count("<img ") >= 6 and loaded == images, (images, loaded)
    table = re.search(r'<table id="savings">(.*?)</table>', dom, re.S)
    assert table and table[1].count("<tr>") >= 4


# ---------------------------------------------------------------- `bequest report` on every training verb


@pytest.fixture(scope="module")
def verb_outputs(demo_run, tmp_path_factory):
    """An output of every training verb: the demo's, and tiny recycle, lifelong and inherit-chain runs."""
    from bequest.inherit import InheritRecipe, inherit
    from bequest.lifelong import LifelongRecipe, lifelong
    from bequest.recycle import RecycleRecipe, recycle

    out, root = demo_run["out"], tmp_path_factory.mktemp("verbs")
    tiny = dict(steps=2, eval_every=1, save_every=100, warmup=0)
    recycle(RecycleRecipe(old_base=str(out / G1), new_base=str(out / G1_NEXT), data="kind",
                          task_weights=str(out / ZOO / "kind-lora"), out=str(root / "recycled"), max_len=24,
                          train_examples=16, eval_examples=8, batch_size=4, **tiny), progress=False)
    lifelong(LifelongRecipe(out=str(root / "lifelong"), domains="text,data", method="naive", layers=1, hidden=32,
                            heads=2, vocab=500, seq_len=32, batch_size=2, eval_blocks=2, **tiny))
    inherit(InheritRecipe(out=str(root / "chain"), teacher=str(out / G1), generations="2x48", seq_len=32,
                          batch_size=2, eval_blocks=2, **tiny))
    return {"pretrain": out / G1, "continue-pretrain": out / G1_NEXT, "inherit": out / G2,
            "finetune": out / ZOO / "kind-lora", "full finetune": out / ZOO / "arity-full",
            "upgrade": out / UPGRADED["upgrade"], "learn": out / LEARN["migu"], "recycle": root / "recycled",
            "lifelong": root / "lifelong", "inherit chain": root / "chain"}


SECTIONS = {"upgrade": "## Upgrade", "learn": "## Task stream", "lifelong": "## Domain stream",
            "inherit chain": "## Generations"}


@pytest.mark.parametrize("verb", ["pretrain", "continue-pretrain", "inherit", "finetune", "full finetune", "upgrade",
                                  "learn", "recycle", "lifelong", "inherit chain"])
def test_bequest_report_rebuilds_a_training_verbs_report(verb_outputs, verb):
    folder = verb_outputs[verb]
    written = (folder / "report.md").read_text()  # the verb wrote one when it finished
    for name in ("report.md", "report.html"):
        (folder / name).unlink()
    shutil.rmtree(folder / "report-figures", ignore_errors=True)
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    md, html = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    assert md.split("\n", 3)[3] == written.split("\n", 3)[3]  # the same report from the same files (the title
    # and first line name the folder as each was told it)
    assert SECTIONS.get(verb, "## Final figures") in md and "## Recipe" in md
    figures = re.findall(r"!\[[^]]*\]\(([^)]*)\)", md)
    assert figures and all((folder / f).is_file() for f in figures)
    assert html.count('<img src="data:image/') == len(figures) and "<img src=\"http" not in html
    final = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").is_file() else {}
    for key in ("eval_loss", "eval_accuracy"):
        if key in final:
            assert fmt(final[key]) in md


def test_bequest_report_rebuilds_the_demos_report(demo_run, monkeypatch):
    monkeypatch.chdir(demo_run["where"])  # the lineage tree names folders from where the demo ran
    written = (demo_run["out"] / "report.md").read_text()
    result = CliRunner().invoke(app, ["report", "bequest-demo"])
    assert result.exit_code == 0, result.output
    assert (demo_run["out"] / "report.md").read_text() == written


def test_bequest_report_refuses_a_folder_bequest_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "holds nothing bequest writes" in result.output
    assert not (tmp_path / "report.md").exists()


def test_demo_refuses_an_output_of_other_settings(demo_run, tmp_path):
    result = CliRunner().invoke(app, ["demo", str(demo_run["out"])])  # a full demo into the quick one's folder
    assert result.exit_code == 2 and "holds a quick demo" in result.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    result = CliRunner().invoke(app, ["demo", str(tmp_path / "taken"), "--quick"])
    assert result.exit_code == 2 and "holds no demo" in result.output
