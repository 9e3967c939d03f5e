"""BAHE vs full-token LLM-CTR: train-step time and peak memory at 10 / 20 / 50 behaviours, and AUC on a shared subsample.

Per dataset (MovieLens-100K from ../shared/data/movielens_100k when present, never committed; the shipped
goodbooks ratings):

1. Cache build: the LLM's first k layers encode every distinct behaviour text once (timed on an empty
   cache: it is paid once, not per step).
2. Steps: for each history length n, the same fixed batches of training samples whose history holds n
   behaviours (the longest available where fewer users are that long; the mean is reported) go through
   `--steps` AdamW steps (after `--warmup`) of BAHE and of LLM-CTR, each in its own subprocess, so peak
   memory is the process's own: peak RSS (VmHWM, reset just before the steps) and its growth over the
   resident weights. Both use the same model, LoRA setting and DIN head.
3. AUC: BAHE, LLM-CTR and IDs-only trained on the same subsample (`--auc-train` samples, history
   `--auc-history`, `--auc-epochs`, batch `--auc-batch`) and tested on the same `--auc-test` samples, with a
   paired bootstrap of the BAHE - LLM-CTR difference. Full-token LLM-CTR cannot train on all the data on 2 cores.
4. `--full-auc`: BAHE's full-data run from the recipe (ctr_<dataset>_bahe.yaml) beside IDs-only, with the
   MiniLM text variants of bench/results/ctr_<dataset>.json where they exist.

Writes bench/results/ctr_bahe.json (`--quick`: runs/bench/results/ctr_bahe_quick.json: the tiny model, goodbooks,
10 and 50 behaviours, 2 steps, a 64-sample AUC subsample; a smoke run of every path, not a measurement).

    .venv/bin/python bench/ctr_bahe.py                      # SmolLM2-135M, both datasets
    .venv/bin/python bench/ctr_bahe.py --quick              # smoke run: tiny model, 2 steps, small subsample
    .venv/bin/python bench/ctr_bahe.py --datasets goodbooks --lengths 10 20 --full-auc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from peak_memory import reset_hwm, status_bytes  # bench/peak_memory.py (scripts run from bench/)
from results_dir import results_dir  # bench/results_dir.py: MovieLens results stay under runs/

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RECIPES = {"movielens": REPO / "align/recipes/ctr_ml100k_bahe.yaml", "goodbooks": REPO / "align/recipes/ctr_goodbooks_bahe.yaml"}
MINILM_REPORTS = {"movielens": REPO / "runs/results/movielens/ctr_ml100k.json", "goodbooks": RESULTS / "ctr_goodbooks.json"}


# ------------------------------------------------------------------------------------------- child


def child(spec_path: str) -> dict:
    """One method's steps in a fresh process: load, build, drop what training does not need, then measure."""
    import ctypes
    import gc

    import peft  # noqa: F401  (imported before the baseline is read: libraries are not the method's memory)
    import torch
    import transformers  # noqa: F401

    from recforge.align.ctr.bahe import LLMSetup, build_model, load_backbone, optimizer, sink_state, split_backbone, tokenize_texts
    from recforge.align.ctr.config import ModelConfig, TrainConfig

    libraries = status_bytes("VmRSS")
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    work = Path(spec["work"])
    batches = np.load(work / "batches.npz")
    texts = json.loads((work / "texts.json").read_text())
    cfg = ModelConfig.model_validate(spec["model_cfg"])
    tokenizer, base = load_backbone(spec["model_dir"], cfg.llm.dtype)
    kind = spec["kind"]
    tokens = tokenize_texts(tokenizer, texts, cfg.llm.max_behaviour_tokens) if kind == "llm_ctr" else []
    sink = sink_state(split_backbone(base, spec["k"], check=False)[0], tokenizer)
    setup = LLMSetup(Path(spec["model_dir"]), tokenizer, base, spec["k"], np.load(work / "vectors.npy"), sink, tokens,
                     tokenizer(cfg.llm.history_separator, add_special_tokens=False)["input_ids"], {})
    model = build_model(kind, setup, cfg, len(texts), "mlp", fresh_base=False)
    # Weights load memory-mapped from the safetensors file: one mapping for all layers, so dropping BAHE's lower
    # layers would free nothing. Each method's tensors get their own memory first; then the mapping goes.
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.data = tensor.data.clone()
    del setup, base  # BAHE keeps only layers k+1..L: the lower layers and token embeddings are freed here
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    opt = optimizer(model, TrainConfig(), cfg.llm.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    target, history, rating, label = (torch.from_numpy(batches[k]) for k in ("target", "history", "rating", "label"))
    n_steps, bs = spec["warmup"] + spec["steps"], spec["batch"]
    resident = status_bytes("VmRSS")
    hwm = reset_hwm()
    times = []
    model.train()
    for step in range(n_steps):
        sl = slice(step * bs, (step + 1) * bs)
        started = time.perf_counter()
        loss = loss_fn(model(target[sl], history[sl], rating[sl]), label[sl])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - started)
    peak = status_bytes("VmHWM") if hwm else 0
    measured = times[spec["warmup"]:]
    tokens_per_sample = None
    if kind == "llm_ctr":
        seqs = model.history_text_tokens(history[: n_steps * bs])
        tokens_per_sample = float(np.mean([len(s) for s in seqs]))
    return {"kind": kind, "step_seconds_median": statistics.median(measured), "step_seconds_mean": statistics.mean(measured),
            "step_seconds": [round(t, 4) for t in measured], "libraries_rss_bytes": libraries,
            "resident_bytes_before_steps": resident, "peak_rss_bytes": peak or None,
            # the analogue of GPU memory: weights kept + activations + gradients + optimizer state, without the
            # ~0.8 GB that python, torch and transformers take in any process
            "model_and_training_bytes": (peak - libraries) if peak else None,
            "peak_growth_bytes": (peak - resident) if peak else None,
            "memory_measure": "VmHWM reset before the steps" if hwm else "unavailable (no /proc/self/clear_refs)",
            "history_tokens_per_sample": tokens_per_sample,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "resident_params": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------------------ parent


def load_recipe(dataset: str, args, out_dir: Path):
    from recforge.align.ctr.config import CTRRecipe
    from recforge.config import load_recipe as load

    overrides = [f"out_dir={out_dir}", f"model.llm.model={args.model_dir}", f"train.num_threads={args.threads}"]
    if dataset == "movielens":
        root = Path(args.movielens)
        overrides += [f"inputs.interactions.path={root / 'interactions.jsonl.gz'}", f"inputs.items.path={root / 'items.jsonl.gz'}"]
    return load(CTRRecipe, RECIPES[dataset], overrides)


def timing_batches(data, n_rows: int, seed: int) -> tuple[dict, dict]:
    """`n_rows` training samples with the most behaviours (full windows first), in a fixed random order."""
    train = data.splits["train"]
    counts = (train.history > 0).sum(1)
    full = np.flatnonzero(counts == train.history.shape[1])
    pool = full if len(full) >= n_rows else np.argsort(-counts, kind="stable")[: max(n_rows, 1)]
    rows = np.random.default_rng(seed).choice(pool, size=n_rows, replace=len(pool) < n_rows)
    batches = {"target": train.target[rows], "history": train.history[rows], "rating": train.history_rating[rows],
               "label": train.label[rows]}
    return batches, {"samples_with_full_history": int(len(full)), "pool": int(len(pool)),
                     "mean_behaviours": float(counts[rows].mean())}


def measure_length(dataset: str, n: int, args, events, items, setup, work: Path) -> dict:
    from recforge.align.ctr.bahe import behaviour_texts
    from recforge.align.ctr.run import ctr_data

    cfg = load_recipe(dataset, args, work / "run")
    cfg.model.history_length = n
    data = ctr_data(cfg, events, items)
    batches, info = timing_batches(data, args.batch * (args.warmup + args.steps), seed=n)
    np.savez(work / "batches.npz", **batches)
    np.save(work / "vectors.npy", setup.vectors)
    (work / "texts.json").write_text(json.dumps(behaviour_texts(data.item_ids, {i.item_id: i for i in items},
                                                                cfg.model.llm.behaviour_template)))
    runs = {}
    for kind in ("bahe", "llm_ctr"):
        spec = {"kind": kind, "model_dir": str(setup.model_dir), "k": setup.k, "work": str(work), "threads": args.threads,
                "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "model_cfg": cfg.model.model_dump()}
        (work / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, __file__, "--child", str(work / "spec.json")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{kind} child failed:\n{proc.stderr[-3000:]}")
        runs[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[{dataset}] n={n} {kind}: {runs[kind]['step_seconds_median']:.3f} s/step, model + training memory "
              f"{(runs[kind]['model_and_training_bytes'] or 0) / 2**20:.0f} MiB")
    b, l = runs["bahe"], runs["llm_ctr"]
    ratio = lambda key: (l[key] / b[key]) if b.get(key) and l.get(key) else None  # noqa: E731
    return {"history_length": n, **info, "batch": args.batch, "steps": args.steps, "warmup": args.warmup, **runs,
            "llm_ctr_over_bahe": {"step_time": ratio("step_seconds_median"), "memory": ratio("model_and_training_bytes"),
                                  "peak_rss": ratio("peak_rss_bytes"), "peak_growth": ratio("peak_growth_bytes")}}


def paired_bootstrap(labels, p_a, p_b, n: int = 200, seed: int = 0) -> dict:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() == labels[idx].max():
            continue
        diffs.append(roc_auc_score(labels[idx], p_a[idx]) - roc_auc_score(labels[idx], p_b[idx]))
    return {"delta_sd": float(np.std(diffs)), "delta_ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]}


def subsample_auc(dataset: str, args, events, items, setup, work: Path) -> dict:
    """BAHE, LLM-CTR and IDs-only on one shared subsample (same samples, seed, steps), and the spread of the difference."""
    from recforge.align.ctr.bahe import behaviour_texts, predict_llm, tokenize_texts, train_llm_ctr_model
    from recforge.align.ctr.data import subsample
    from recforge.align.ctr.run import ctr_data
    from recforge.align.ctr.train import train_ctr_model

    cfg = load_recipe(dataset, args, work / "auc")
    cfg.model.history_length = args.auc_history
    cfg.train.max_train_samples, cfg.train.max_eval_samples = args.auc_train, args.auc_test
    cfg.train.num_train_epochs, cfg.train.per_device_train_batch_size, cfg.train.early_stopping_patience = args.auc_epochs, args.auc_batch, args.auc_epochs
    data = ctr_data(cfg, events, items)
    data.splits["valid"] = subsample(data.splits["valid"], args.auc_valid, seed=1)
    data.stats["samples"]["valid"] = len(data.splits["valid"])
    llm = cfg.model.llm
    setup.item_tokens = tokenize_texts(setup.tokenizer, behaviour_texts(data.item_ids, {i.item_id: i for i in items},
                                                                        llm.behaviour_template), llm.max_behaviour_tokens)
    test = data.splits["test"]
    out = {"samples": data.stats["samples"], "history_length": args.auc_history, "epochs": args.auc_epochs,
           "batch": args.auc_batch, "steps": args.auc_epochs * -(-len(data.splits["train"]) // args.auc_batch),
           "mean_behaviours_test": float((test.history > 0).sum(1).mean())}
    probs = {}
    for kind in ("bahe", "llm_ctr"):
        started = time.time()
        model, res = train_llm_ctr_model(kind, setup, data.splits, len(data.item_ids), cfg.model, cfg.train, seed=0)
        probs[kind] = predict_llm(model, test, llm.eval_batch_size)
        out[kind] = {k: res[k] for k in ("test_auc", "test_logloss", "valid_auc", "train_seconds", "trainable_params")}
        out[kind]["wall_seconds"] = round(time.time() - started, 1)
        del model
        print(f"[{dataset}] subsample AUC {kind}: {res['test_auc']:.4f} ({out[kind]['wall_seconds']} s)")
    _, ids = train_ctr_model(data.splits, len(data.item_ids), [], cfg.model, cfg.train, None, 0)
    out["ids_only"] = {k: ids[k] for k in ("test_auc", "test_logloss", "valid_auc")}
    out["bahe_minus_llm_ctr"] = {"auc": out["bahe"]["test_auc"] - out["llm_ctr"]["test_auc"],
                                 # on a test set this size, the bootstrap spread says whether 0.002 is resolvable at all
                                 **paired_bootstrap(test.label, probs["bahe"], probs["llm_ctr"])}
    return out


def full_auc(dataset: str, args, work: Path) -> dict:
    from recforge.align.ctr.run import run_ctr

    cfg = load_recipe(dataset, args, Path(args.full_out or REPO / "runs/bench/ctr_bahe/full") / dataset)
    cfg.model.llm.cache_dir = str(work / f"cache_{dataset}")
    report = run_ctr(cfg)
    out = {"summary": report.get("summary"), "status": report["status"], "samples": report.get("data", {}).get("samples")}
    minilm = MINILM_REPORTS[dataset]
    if minilm.is_file():
        out["minilm_variants"] = json.loads(minilm.read_text())["summary"]
    return out


def bench_dataset(dataset: str, args, work: Path) -> dict:
    from recforge.align.ctr.bahe import prepare_llm
    from recforge.align.ctr.run import ctr_data, read_inputs

    cfg = load_recipe(dataset, args, work / "run")
    missing = [s.path for s in (cfg.inputs.interactions, cfg.inputs.items) if not Path(s.path).is_file() and "://" not in s.path]
    if missing:
        print(f"[{dataset}] skipped: input files absent: {', '.join(missing)}")
        return {"status": "skipped", "reason": f"input files absent: {', '.join(missing)}"}
    events, items, _ = read_inputs(cfg, None)
    data = ctr_data(cfg, events, items)
    cache = work / f"cache_{dataset}"
    shutil.rmtree(cache, ignore_errors=True)  # an empty cache: the build is timed in full
    started = time.time()
    setup = prepare_llm(cfg.model.llm, data, {i.item_id: i for i in items}, cache, need_tokens=False)
    result = {"status": "done", "cache": {**setup.cache, "build_wall_seconds": round(time.time() - started, 2)},
              "llm": {"model": str(setup.model_dir), "layers": setup.base.config.num_hidden_layers, "lower_layers": setup.k,
                      "hidden_size": setup.base.config.hidden_size, "upper": cfg.model.llm.upper, "lora_r": cfg.model.llm.lora_r}}
    print(f"[{dataset}] cache: {setup.cache['distinct_texts']} behaviours in {setup.cache['encode_seconds']} s")
    result["steps"] = [measure_length(dataset, n, args, events, items, setup, work) for n in args.lengths]
    if not args.no_auc:
        result["subsample_auc"] = subsample_auc(dataset, args, events, items, setup, work)
    if args.full_auc:
        result["full_auc"] = full_auc(dataset, args, work)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 steps, a small subsample")
    p.add_argument("--model", default=None, help="LLM alias or folder (default smollm2; tiny with --quick)")
    p.add_argument("--datasets", nargs="+", default=["movielens", "goodbooks"], choices=["movielens", "goodbooks"])
    p.add_argument("--movielens", default=str(REPO.parent / "shared/data/movielens_100k"))
    p.add_argument("--lengths", nargs="+", type=int, default=[10, 20, 50])
    # LLM-CTR at 50 behaviours holds ~3 GB of activations per sample (~1,100 tokens x 30 layers): batch 4 fits 23 GB
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--auc-train", type=int, default=2000)
    p.add_argument("--auc-valid", type=int, default=200, help="validation samples (one epoch: only reported)")
    p.add_argument("--auc-test", type=int, default=1000)
    p.add_argument("--auc-history", type=int, default=10)
    p.add_argument("--auc-epochs", type=int, default=1)
    p.add_argument("--auc-batch", type=int, default=16)
    p.add_argument("--no-auc", action="store_true")
    p.add_argument("--full-auc", action="store_true", help="also BAHE's full-data run from the recipe (hours on 2 cores)")
    p.add_argument("--full-out", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    if args.quick:  # a smoke run of every code path, not a measurement
        args.steps, args.warmup, args.batch = 2, 2, 4
        args.auc_train, args.auc_valid, args.auc_test, args.auc_batch, args.auc_history = 64, 32, 64, 16, 5
        if args.lengths == [10, 20, 50]:
            args.lengths = [10, 50]
        if args.datasets == ["movielens", "goodbooks"]:
            args.datasets = ["goodbooks"]
    args.model = args.model or ("tiny" if args.quick else "smollm2")
    args.model_dir = resolve(args.model)
    import torch

    torch.set_num_threads(args.threads)
    # a smoke run is not a measurement: it stays out of bench/results
    out_path = Path(args.out) if args.out else (REPO / "runs/bench/results/ctr_bahe_quick.json" if args.quick else results_dir("movielens") / "ctr_bahe.json")
    load_before = os.getloadavg()
    started = time.time()
    work = REPO / "runs" / "bench" / "ctr_bahe"
    work.mkdir(parents=True, exist_ok=True)
    result = {"what": "BAHE vs full-token LLM-CTR: train-step time and peak memory at the same steps; AUC on a shared subsample",
              "quick": args.quick, "model": args.model,
              "settings": {k: getattr(args, k) for k in ("lengths", "batch", "steps", "warmup", "threads", "auc_train",
                                                            "auc_valid", "auc_test", "auc_history", "auc_epochs", "auc_batch")},
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__, "load_average_before": load_before},
              "datasets": {}}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for dataset in args.datasets:
            result["datasets"][dataset] = bench_dataset(dataset, args, Path(tmp))
    result["machine"]["load_average_after"] = os.getloadavg()
    result["wall_seconds"] = round(time.time() - started, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary(result), indent=2))
    print(f"wrote {out_path}")
    return 0


def resolve(model: str) -> str:
    if model == "tiny":
        from recforge.tiny_model import TinyModelConfig, build_tiny_model

        out = REPO / "runs" / "tiny-model"
        if not (out / "config.json").is_file():
            build_tiny_model(TinyModelConfig(), out)
        return str(out)
    from recforge.models import resolve_model

    return resolve_model(model)


def summary(result: dict) -> dict:
    """The numbers the issue's goals are about, per dataset and history length."""
    out = {}
    for name, ds in result["datasets"].items():
        if ds.get("status") != "done":
            out[name] = ds.get("reason")
            continue
        out[name] = {"cache_build_s": ds["cache"]["build_wall_seconds"],
                     "steps": {s["history_length"]: {"bahe_s": round(s["bahe"]["step_seconds_median"], 4),
                                                     "llm_ctr_s": round(s["llm_ctr"]["step_seconds_median"], 4),
                                                     **{k: round(v, 2) if v else v for k, v in s["llm_ctr_over_bahe"].items()}}
                               for s in ds["steps"]}}
        if "subsample_auc" in ds:
            a = ds["subsample_auc"]
            out[name]["subsample_auc"] = {k: round(a[k]["test_auc"], 4) for k in ("bahe", "llm_ctr", "ids_only")}
    return out


if __name__ == "__main__":
    sys.exit(main())
