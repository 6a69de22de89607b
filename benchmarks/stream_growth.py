"""Sharded depth growth of a checkpoint (tensor by tensor) vs copying its bytes vs mergekit, side by side.

Synthetic Llama checkpoints (random bf16 weights, several shards; written shard by shard with
safetensors, never held whole) of three sizes are grown 1.25x deeper: 1.7 GB (16 layers, 6 shards of
350 MB), 3.1 GB (a 1.5B shape, 700 MB shards) and 13.5 GB (Llama-2-7B's shape, 2 GB shards); --sizes
picks some of them. Each job runs in its own process under /usr/bin/time -v (psutil polling where that
is missing) for wall time and peak RSS:
  copy      shutil.copytree of the same folder: the physical limit of this disk
  bequest   `bequest grow --layers 1.25L --no-probe` with identity blocks (the CLI, imports and all)
  bequest (probe)  the same with the logit probe on (its default): both models run module by module
            from their shards on the probe batch
  bequest (interleave)  the CLI with full copies: the very job mergekit's passthrough does
  mergekit  mergekit-yaml passthrough slices that duplicate the same layers, in its own venv
Jobs alternate round by round so drifting machine load hits all alike; the median is reported. Before
each job the source is evicted from the page cache, so every job reads it from disk (--warm: cached).
bequest's fixed cost (start-up, imports, planning) is measured apart by growing a tiny checkpoint, and
its start-up alone (the CLI's imports for `bequest grow`, and whether they pull in torch).
Goals: bequest <= 1.5x copy time; peak RSS <= 2 x largest shard + 300 MB; faster and leaner than mergekit.

    python benchmarks/stream_growth.py [--quick] [--sizes 1.7GB,3.1GB,13.5GB] [--rounds 2]
                                       [--mergekit-venv /tmp/bequest-mk-venv]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FULL = {"1.7GB": dict(hidden=2048, heads=16, kv_heads=4, ffn=5632, layers=16, vocab=32000, shard=350 * 10**6),
        "3.1GB": dict(hidden=2048, heads=16, kv_heads=4, ffn=5632, layers=32, vocab=32000, shard=700 * 10**6),
        "13.5GB": dict(hidden=4096, heads=32, kv_heads=32, ffn=11008, layers=32, vocab=32000, shard=2 * 10**9)}
QUICK = [dict(hidden=64, heads=4, kv_heads=2, ffn=160, layers=4, vocab=1000, shard=200 * 10**3)]
GROW = 1.25
# What `bequest grow` imports before it does anything; prints the heavy libraries among them.
STARTUP = ("import sys; from bequest.cli import build; build(['grow']); "
           "print(*[m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])")


def checkpoint(folder: Path, hidden, heads, kv_heads, ffn, layers, vocab, shard) -> dict:
    """A random bf16 Llama folder, shard by shard: at most one shard is ever in memory."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    hd = hidden // heads
    block = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * hd, hidden),
        "self_attn.k_proj.weight": (kv_heads * hd, hidden),
        "self_attn.v_proj.weight": (kv_heads * hd, hidden),
        "self_attn.o_proj.weight": (hidden, heads * hd),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in block.items()})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})

    groups, size = [[]], 0
    for name, s in shapes.items():
        n = 2 * s[0] * (s[1] if len(s) > 1 else 1)
        if groups[-1] and size + n > shard:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    gen = torch.Generator().manual_seed(0)
    weight_map, files = {}, [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, names in zip(files, groups):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = (1 + 0.1 * torch.randn(shapes[name], generator=gen)).bfloat16()
            else:
                tensors[name] = (0.02 * torch.randn(shapes[name], generator=gen)).bfloat16()
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del tensors
    total = sum((folder / f).stat().st_size for f in files)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    sizes = [(folder / f).stat().st_size for f in files]
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    return {"bytes": total, "params": n_params, "shards": len(files), "largest_shard": max(sizes), "dtype": "bf16",
            "shape": dict(hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn, layers=layers, vocab=vocab)}


def passthrough_yaml(src: Path, layers: int, target: int) -> str:
    """Slices that repeat the layers bequest's 'even' placement picks, each right after itself."""
    from bequest.grow.depth import after_each

    extra = after_each(layers, target - layers, "even")
    cuts, start = [], 0
    for i, n in enumerate(extra):
        for _ in range(n):  # layer i again right after itself: end a slice after i, start the next at i
            cuts.append((start, i + 1))
            start = i
    cuts.append((start, layers))
    slices = "\n".join(f"  - sources:\n      - model: {src}\n        layer_range: [{a}, {b}]" for a, b in cuts)
    return f"slices:\n{slices}\nmerge_method: passthrough\ndtype: bfloat16\n"


def measure(cmd: list[str], timer: bool) -> dict:
    """Wall seconds and peak RSS (MB) of one job in its own process, then a sync's seconds."""
    t0 = time.perf_counter()
    if timer:
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    else:  # psutil: poll the job and its children
        import psutil

        proc, rss_kb = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 0
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss_kb = max(rss_kb, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]) // 1024)
            except psutil.Error:
                pass
            time.sleep(0.05)
        out, err = proc.communicate()
        r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed:\n{r.stderr[-3000:]}")
    t1 = time.perf_counter()
    os.sync()  # dirty pages of the output reach the disk outside the timed job, but are measured
    return {"wall_s": wall, "sync_s": time.perf_counter() - t1, "peak_rss_mb": rss_kb / 1024}


def warm(folder: Path) -> None:
    """Read every byte once so the job starts with the source in the page cache."""
    for f in sorted(folder.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def evict(folder: Path) -> None:
    """Drop the source's pages from the page cache so the job reads it from disk. Unlike
    /proc/sys/vm/drop_caches this needs no root, spares the tools' own code (and other users' caches
    on a shared machine) and leaves nothing else cold."""
    os.sync()
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(folder: Path) -> int | None:
    """How much of the folder is in the page cache (util-linux fincore), to check `evict`."""
    if not shutil.which("fincore"):
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, folder.iterdir())],
                       capture_output=True, text=True)
    return sum(int(x) for x in r.stdout.split()) if r.returncode == 0 else None


def mergekit_venv(venv: Path) -> tuple[Path | None, str]:
    """mergekit in a venv of its own (CPU torch first, else pip pulls CUDA builds): (mergekit-yaml, note)."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe, f"mergekit from {venv}"
    import torch

    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, capture_output=True, text=True)
        subprocess.run([*pip, "mergekit"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        return None, f"mergekit could not be installed in {venv}: {(e.stderr or '').strip().splitlines()[-1:]}"
    return exe, f"mergekit installed into {venv}"


def read_tensor(folder: Path, name: str):
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(f"{folder}: no tensor {name}")


Q, DOWN, NORM = ("model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.mlp.down_proj.weight",
                 "model.layers.{}.input_layernorm.weight")


def spot_check(name: str, out: Path, src: Path, work: Path, layers: int) -> dict:
    """What a finished job's folder should hold, checked before it is deleted (the disk holds only a
    few grown copies of the biggest checkpoint): bequest's identity growth copies old layers bit for bit
    and zeroes the new blocks' writers; mergekit's passthrough equals bequest's interleave tensor for
    tensor on sampled layers (the interleave folder is kept until mergekit has run)."""
    import torch

    if name == "bequest":
        return {"identity_copies_layer_0": torch.equal(read_tensor(out, Q.format(0)), read_tensor(src, Q.format(0))),
                "identity_block_writer_is_zero": bool((read_tensor(out, DOWN.format(4)) == 0).all())}
    if name == "bequest (probe)":  # identity growth keeps the function: the probe should read ~0
        return {"probe_max_abs_logit_change": json.loads((out / "growth.json").read_text())["max_abs_logit_change"]}
    if name == "mergekit":
        return {"interleave_equals_mergekit": all(
            torch.equal(read_tensor(work / "interleave", n.format(j)), read_tensor(out, n.format(j)))
            for j in (0, 4, 5, layers - 1) for n in (Q, DOWN, NORM))}
    return {}


def figure(results: dict):
    """Per size: wall time (bequest's own writing hatched) and peak RSS per job, against the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    sizes = results["sizes"]
    fig, grid = plt.subplots(len(sizes), 2, figsize=(11, 3.6 * len(sizes)), squeeze=False)
    for axes, size in zip(grid, sizes):
        med, ck, fixed = size["jobs"], size["checkpoint"], results["bequest_fixed_cost"]
        names = list(med)
        colors = ["#888888", "#2a7ab9", "#1b4f7a", "#6fa8dc", "#d9822b"][: len(names)]
        axes[0].bar(names, [med[n]["wall_s"] for n in names], color=colors)
        axes[0].bar(names, [med[n]["sync_s"] for n in names], bottom=[med[n]["wall_s"] for n in names],
                    color=colors, alpha=0.35)
        axes[0].bar(names, [med[n].get("write_s", 0) for n in names], fill=False, hatch="//", edgecolor="white")
        lines = [axes[0].axhline(1.5 * med["copy"]["wall_s"], ls="--", color="k", lw=1, label="goal: 1.5x copy"),
                 axes[0].axhline(fixed["wall_s"], ls=":", color="k", lw=1, label="bequest grow of a tiny model")]
        axes[0].legend(handles=[*lines, Patch(color="#2a7ab9", alpha=0.35, label="then sync"),
                                Patch(facecolor="#2a7ab9", hatch="//", edgecolor="white", label="bequest writing")],
                       fontsize=8)
        axes[0].set_ylabel("wall time (s)")
        axes[1].bar(names, [med[n]["peak_rss_mb"] for n in names], color=colors)
        axes[1].axhline(size["rss_goal_mb"], ls="--", color="k", lw=1, label="goal: 2x largest shard + 300 MB")
        axes[1].set_ylabel("peak RSS (MB)")
        axes[1].legend(fontsize=8)
        gb = f"{ck['bytes'] / 1e9:.2f} GB" if ck["bytes"] > 1e8 else f"{ck['bytes'] / 1e6:.1f} MB"
        axes[0].set_title(f"{gb} bf16 Llama, {ck['shards']} shards, layers {ck['layers']}", fontsize=9)
        for ax in axes:
            ax.tick_params(axis="x", labelsize=8, labelrotation=10)
    cache = "cached" if results["page_cache"].startswith("warm") else "read from disk"
    fig.suptitle(f"Sharded depth growth vs copy vs mergekit (source {cache})"
                 f"{' [quick]' if results['quick'] else ''}")
    fig.tight_layout()
    return fig


def median(values):
    return None if None in values else statistics.median(values)


def one_size(work: Path, shape: dict, quick: bool, rounds: int, warm_start: bool, mk_exe: Path | None,
             timer: bool) -> dict:
    """All jobs on one generated checkpoint, alternating for `rounds`; medians, ratios, goals, checks."""
    target = round(shape["layers"] * GROW)
    src = work / "src"
    t0 = time.perf_counter()
    ck = checkpoint(src, **shape)
    ck["generate_s"] = time.perf_counter() - t0
    bequest = [sys.executable, "-m", "bequest", "grow", str(src)]
    flags = ["--layers", str(target), "--no-probe", "--shard-size", "2GB"]
    jobs = {
        "copy": lambda out: [sys.executable, "-c", "import shutil,sys; shutil.copytree(sys.argv[1], sys.argv[2])",
                             str(src), str(out)],
        "bequest": lambda out: [*bequest, str(out), *flags],
        "bequest (probe)": lambda out: [*bequest, str(out), *[f for f in flags if f != "--no-probe"]],
    }
    if not quick:
        jobs["bequest (interleave)"] = lambda out: [*bequest, str(out), *flags, "--depth", "interleave"]
    if mk_exe is not None:
        (work / "mk.yml").write_text(passthrough_yaml(src, shape["layers"], target))
        # mergekit counts its shard size as numel x element size, i.e. bytes: 2B = bequest's 2GB.
        jobs["mergekit"] = lambda out: [str(mk_exe), str(work / "mk.yml"), str(out), "--lazy-unpickle",
                                        "--out-shard-size", "2B", "--no-copy-tokenizer", "--quiet"]
    runs, checks = {name: [] for name in jobs}, {}
    for r in range(rounds):
        last = r == rounds - 1
        for name, cmd in jobs.items():
            out = work / name.replace("bequest (", "").strip(")").replace(" ", "-")
            warm(src) if warm_start else evict(src)
            left = cached_bytes(src)
            runs[name].append(measure(cmd(out), timer))
            runs[name][-1]["source_cached_at_start_mb"] = None if left is None else left / 2**20
            if (out / "growth.json").exists():  # bequest's own clock: what the job spent planning and writing
                runs[name][-1].update({f"{k}_s": v for k, v in json.loads((out / "growth.json").read_text())
                                       ["seconds"].items()})
            print(f"{ck['bytes'] / 1e9:.1f} GB, round {r + 1} {name}: {runs[name][-1]}", flush=True)
            if last:
                checks.update(spot_check(name, out, src, work, target))
            if not (last and name == "bequest (interleave)" and "mergekit" in jobs):
                shutil.rmtree(out)
    shutil.rmtree(work / "interleave", ignore_errors=True)

    med = {n: {k: median([x[k] for x in v]) for k in v[0]} for n, v in runs.items()}
    copy = med["copy"]
    rss_goal = 2 * ck["largest_shard"] / 2**20 + 300
    ratios = {n: {"time_vs_copy": m["wall_s"] / copy["wall_s"],
                  "time_with_sync_vs_copy": (m["wall_s"] + m["sync_s"]) / (copy["wall_s"] + copy["sync_s"])}
              for n, m in med.items()}
    for n, m in med.items():
        if "write_s" in m:  # the data path alone, against the copy's
            ratios[n]["write_vs_copy"] = m["write_s"] / copy["wall_s"]
    goals = {
        "bequest_time_le_1.5x_copy": ratios["bequest"]["time_vs_copy"] <= 1.5,
        "bequest_rss_le_2x_largest_shard_plus_300MB": med["bequest"]["peak_rss_mb"] <= rss_goal,
        "bequest_with_probe_time_le_1.5x_copy": ratios["bequest (probe)"]["time_vs_copy"] <= 1.5,
        "bequest_with_probe_rss_le_2x_largest_shard_plus_300MB": med["bequest (probe)"]["peak_rss_mb"] <= rss_goal,
    }
    if "mergekit" in med:
        for n in [n for n in med if n.startswith("bequest")]:
            ratios[n]["time_vs_mergekit"] = med[n]["wall_s"] / med["mergekit"]["wall_s"]
            ratios[n]["rss_vs_mergekit"] = med[n]["peak_rss_mb"] / med["mergekit"]["peak_rss_mb"]
        goals["bequest_faster_and_leaner_than_mergekit"] = (
            med["bequest"]["wall_s"] < med["mergekit"]["wall_s"]
            and med["bequest"]["peak_rss_mb"] < med["mergekit"]["peak_rss_mb"]
        )
    shutil.rmtree(src)
    return {"checkpoint": {**ck, "layers": f"{shape['layers']} -> {target}"}, "jobs": med, "runs": runs,
            "ratios": ratios, "rss_goal_mb": rss_goal, "goals": goals, "checks": checks}


def main() -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--rounds", type=int, default=2)
    extra.add_argument("--mergekit-venv", type=Path, default=Path(tempfile.gettempdir()) / "bequest-mk-venv")
    extra.add_argument("--warm", action="store_true", help="start every job with the source cached, not on disk")
    extra.add_argument("--sizes", default=",".join(FULL), help=f"comma-separated, of {', '.join(FULL)}")
    mine, rest = extra.parse_known_args()
    unknown = set(mine.sizes.split(",")) - set(FULL)
    if unknown:
        extra.error(f"--sizes: no size {sorted(unknown)[0]}; pick from {', '.join(FULL)}")
    sys.argv = [sys.argv[0], *rest]
    args = common.parse(__doc__.splitlines()[0])
    timer = Path("/usr/bin/time").exists()
    load = {"start": os.getloadavg()}  # other users' work on the machine slows every job
    mk_exe, mk_note = (None, "skipped in --quick") if args.quick else mergekit_venv(mine.mergekit_venv)
    work = Path(tempfile.mkdtemp(prefix="bequest-sharded-bench-"))
    try:
        # What bequest costs before and around the bytes (start-up, imports, plan, card), from a tiny job.
        checkpoint(work / "tiny", **QUICK[0])
        fixed = measure([sys.executable, "-m", "bequest", "grow", str(work / "tiny"), str(work / "tiny-grown"),
                         "--layers", "5", "--no-probe"], timer)
        startup = measure([sys.executable, "-c", STARTUP], timer)
        startup["imports"] = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True,
                                            check=True).stdout.split()
        if mk_exe is not None:  # the tools' own code is read once before timing, so no job pays for it alone
            subprocess.run([str(mk_exe.parent / "python"), "-c", "import mergekit.merge"], check=True,
                           capture_output=True)
        shapes = QUICK if args.quick else [FULL[name] for name in mine.sizes.split(",")]
        sizes = [one_size(work, shape, args.quick, 1 if args.quick else mine.rounds, mine.warm, mk_exe, timer)
                 for shape in shapes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load["end"] = os.getloadavg()

    results = {
        "quick": args.quick,
        "rounds": 1 if args.quick else mine.rounds,
        "measured_with": "/usr/bin/time -v" if timer else "psutil polling (job and children)",
        "load_average": load,
        "page_cache": ("warm: every job starts after a full read of the source, so all find it cached" if mine.warm
                       else "cold: before every job the source is evicted from the page cache (posix_fadvise "
                       "DONTNEED, checked with fincore: source_cached_at_start_mb), so each reads it from disk; "
                       "the tools' own code stays cached. /proc/sys/vm/drop_caches also works here (root) but "
                       "would empty every user's cache on this shared machine, the tools' code included"),
        "mergekit": mk_note,
        "bequest_fixed_cost": fixed,
        "bequest_startup": startup,
        "sizes": sizes,
        "goals": {f"{s['checkpoint']['bytes'] / 1e9:.1f}GB": s["goals"] for s in sizes},
        "note": "wall_s is the job alone; sync_s is the os.sync() right after it (its output reaching the disk), "
                "reported apart. bequest's identity blocks write zeros for the new blocks' o_proj/down_proj where "
                "mergekit's passthrough copies whole layers; 'bequest (interleave)' is the identical job. "
                "bequest_fixed_cost is a whole `bequest grow` of a 1 MB checkpoint: start-up, planning, config and card; "
                "bequest_startup is the CLI's imports for `bequest grow` alone, and which heavy libraries they load. "
                "plan_s, write_s and probe_s are bequest's own clock (growth.json); the rest of wall_s is start-up.",
    }
    fig = figure(results)
    print(common.write("stream_growth", args.out_dir, results, fig))
    print(json.dumps({f"{s['checkpoint']['bytes'] / 1e9:.1f}GB": {"jobs": s["jobs"], "ratios": s["ratios"],
                                                                 "goals": s["goals"]} for s in sizes}, indent=1))


if __name__ == "__main__":
    main()
