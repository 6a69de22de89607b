"""What every benchmark shares: argument parsing, thread settings, and writing NAME.json + NAME.png."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a tiny run that only proves the benchmark works")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where NAME.json and NAME.png go")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick, where tiny matrices gain nothing, else 2)")
    p.add_argument("--workers", type=int, default=1,
                   help="independent runs go to this many processes, 1 torch thread each (where a benchmark has them)")
    args = p.parse_args()
    import torch

    args.threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return args


def write(name: str, out_dir: Path, results: dict, fig) -> Path:
    """Results JSON (with the machine it ran on) and the figure, side by side."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available()},
        **results,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=1))
    fig.savefig(out_dir / f"{name}.png", dpi=120, bbox_inches="tight")
    return path


def pool_map(fn, jobs: list, workers: int) -> list:
    """fn over jobs, in `workers` spawned processes of one torch thread each when more than one (fn and jobs
    must pickle); in this process, with the threads `parse` set, otherwise."""
    if workers <= 1:
        return [fn(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        return list(pool.map(fn, jobs))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # a spawned worker starts with torch's default: every core, for each worker
