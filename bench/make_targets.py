"""Wall-clock time of the demo make targets in a fresh clone, as a newcomer runs them.

Clones this checkout (committed state) into a temporary folder, runs `make install` (creates .venv) and then
each target in order, timing each; writes bench/results/make_targets.json with the machine's load average
before and after every step (other jobs on the machine inflate wall time; the figures are only as good as
the machine was idle). Targets: `make cpt` (≤ 10 min asked), `make generate-tags`, `make align` (≤ 15 min),
`make demo` (the SmolLM2 pipeline, ≤ 30 min asked: `--targets demo`).

    python3 bench/make_targets.py [--targets cpt generate-tags align] [--keep]
    python3 bench/make_targets.py --targets demo --out bench/results/make_targets_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "make_targets.json"


def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.call(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    return {"command": " ".join(cmd), "returncode": rc, "seconds": round(time.perf_counter() - start, 1),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}, "log": str(log)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", nargs="+", default=["cpt", "generate-tags", "align"])
    p.add_argument("--keep", action="store_true", help="keep the clone (its runs/ folder) for inspection")
    p.add_argument("--out", default=str(RESULTS), help="result JSON (make demo: bench/results/make_targets_demo.json)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="recforge-make-"))
    clone = work / "recforge"
    subprocess.check_call(["git", "clone", "--quiet", str(REPO), str(clone)])
    commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=clone, text=True).strip()
    steps = {"install": timed(["make", "install"], clone, work / "install.log")}
    for target in args.targets:
        steps[target] = timed(["make", target], clone, work / f"{target}.log")
        print(f"make {target}: {steps[target]['seconds']} s (rc {steps[target]['returncode']})", flush=True)
    result = {
        "what": "wall-clock seconds of `make <target>` in a fresh clone (install timed separately, run first)",
        "commit": commit, "cpus": os.cpu_count(), "machine": platform.machine(), "steps": steps,
        "targets": {name: steps[target]["seconds"] <= limit
                    for target, name, limit in (("cpt", "cpt_le_600s", 600), ("align", "align_le_900s", 900),
                                                ("demo", "demo_le_1800s", 1800)) if target in steps},
    }
    summary = clone / "runs" / "demo" / "summary.json"
    if summary.is_file():  # `make demo`'s numbers from this very run
        result["demo_summary"] = json.loads(summary.read_text())["rows"]
    tag_eval = clone / "runs" / "generate" / "goodbooks_tags" / "tag_eval.json"
    if tag_eval.is_file():  # what the demo tagger scored in this very run
        result["generate_tags_eval"] = json.loads(tag_eval.read_text())
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        for step in steps.values():  # the logs went with the clone
            step.pop("log")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["seconds"] for k, v in steps.items()}, indent=2))
    return 0 if all(s["returncode"] == 0 for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
