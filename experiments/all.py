"""Every experiment (E1-E8) into one run folder, then one page with every figure.

    python -m experiments.all --config organism [--out RUN] [--smoke] [--only e1,e2,e8]
    persona-lens report RUN                        # the page again, from what RUN holds

E1 runs first (E2 monitors at the layer E1 chose), then E2, E8 and the finetuning experiments
(E3, E4 and E6 share their finetuning runs in ``RUN/datasets`` and write their results into
``RUN/datasets/e3_finetune_traits`` etc.; E5; E7 on the organism only). ``--smoke`` is the CI
size, every script at its smallest (``experiments.common.SMOKE``,
``experiments.e7_screening.SMOKE``). A failing experiment is recorded in ``RUN/all.json`` and the others still run; the exit status says whether all passed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from experiments.common import ALIASES, CONFIGS, load_config
from persona_lens.pipeline_io import write_json

#: id -> (module, folder in the run); the order they run in.
EXPERIMENTS = {
    "e1": ("e1_steering", "e1_steering"),
    "e2": ("e2_monitoring", "e2_monitoring"),
    "e8": ("e8_traits", "e8_traits"),
    "e3": ("e3_finetune_traits", "datasets"),
    "e4": ("e4_shift", "datasets"),
    "e6": ("e6_dataset_dp", "datasets"),
    "e5": ("e5_mitigation", "e5_mitigation"),
    "e7": ("e7_screening", "e7_screening"),
}


def arguments(exp: str, config: str, out: Path, smoke: bool) -> list[str]:
    if exp == "e7":  # its own command line: organism only, seeds
        return ["--config", config, "--out", str(out), "--quiet"] + (["--seeds", "0", "--smoke"] if smoke else [])
    return ["--config", config, "--out", str(out)] + (["--smoke"] if smoke else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.all", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="organism", choices=sorted(CONFIGS) + sorted(ALIASES))
    ap.add_argument("--out", default=None, help="run folder (default experiment_runs/all/CONFIG[-smoke])")
    ap.add_argument("--smoke", action="store_true", help="the CI size")
    ap.add_argument("--only", default=None, help="comma-separated ids, e.g. e1,e2,e8 (default: all)")
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    run = Path(a.out or f"experiment_runs/all/{cfg.name}{'-smoke' if a.smoke else ''}")
    only = [x.strip().lower() for x in a.only.split(",")] if a.only else list(EXPERIMENTS)
    unknown = sorted(set(only) - set(EXPERIMENTS))
    if unknown:
        ap.error(f"unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}")
    record: dict = {"config": cfg.name, "smoke": a.smoke, "experiments": {}}
    for exp in [e for e in EXPERIMENTS if e in only]:
        module, folder = EXPERIMENTS[exp]
        if exp == "e7" and not cfg.is_organism:
            record["experiments"][exp] = {"status": "skipped", "why": "E7 plants its ground truth in the organism world"}
            continue
        t0 = time.perf_counter()
        print(f"== {exp.upper()} ({module}) ==", flush=True)
        try:
            importlib.import_module(f"experiments.{module}").main(arguments(exp, cfg.name, run / folder, a.smoke))
            status = {"status": "ok"}
        except Exception as e:  # one experiment's failure must not hide the others' results
            traceback.print_exc()
            status = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        record["experiments"][exp] = {**status, "folder": folder, "seconds": round(time.perf_counter() - t0, 1)}
        write_json(run / "all.json", record)
    from persona_lens.report import run_report

    page = run_report(run)
    print(f"wrote {page}")
    return 0 if all(r["status"] != "failed" for r in record["experiments"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
