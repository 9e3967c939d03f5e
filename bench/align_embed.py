"""Catalogue embedding throughput: recforge embed's batching vs `SentenceTransformer.encode` (the peer) in float32
and in bfloat16 (`compute_dtype: bfloat16` vs the same model `.bfloat16()` in plain sentence-transformers), and vs
unsorted fixed batches, on the same model and the same goodbooks texts, measured side by side in one process.
Every method's minimum cosine to float32 `SentenceTransformer.encode` is reported; int8 dynamic quantisation
(torch's `quantize_dynamic` of the Linear layers) is measured for its cosine only, as the reason it is not offered.

    .venv/bin/python bench/align_embed.py [--model PATH] [--limit 4000] [--rounds 2]
    .venv/bin/python bench/align_embed.py --model PATH --limit 500 --profile-out bench/results/align_embed_smollm2_profile.json

Writes bench/results/align_embed.json. Rounds alternate the order of the methods so that load from other
processes hits them alike; the best round of each method is reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def int8_dynamic_vectors(model, texts: list[str], batch_size: int) -> np.ndarray:
    """torch's dynamic int8 quantisation of every nn.Linear (deprecated torch.ao API; measured, not offered)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    return q.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "align_embed.json"))
    ap.add_argument("--profile-out", default=None,
                    help="only a torch.profiler table of one recforge bf16 pass (where the time goes), to this JSON")
    args = ap.parse_args()

    import torch

    from recforge.align.align_config import CatalogueSource
    from recforge.align.embed import embed_batches, encode_sorted, load_model, read_catalogue, token_lengths
    from recforge.io import atomic_write_json

    load_before = os.getloadavg()
    ids, texts, _ = read_catalogue(CatalogueSource(), limit=args.limit)
    model = load_model(args.model)
    model_bf16 = load_model(args.model, compute_dtype="bfloat16")
    bs = args.batch_size

    def st_encode(m=model):
        return m.encode(texts, batch_size=bs, convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def recforge_sorted(m=model):
        order, batches = embed_batches(token_lengths(m, texts, None), bs)  # what `recforge embed` does
        vecs = encode_sorted(m, [texts[i] for i in order], batches, None)
        out = np.empty_like(vecs)
        out[np.array(order)] = vecs
        return out

    def unsorted_fixed():
        batches = [(i, min(i + bs, len(texts))) for i in range(0, len(texts), bs)]
        return encode_sorted(model, texts, batches, None)

    methods = {"st_encode": st_encode, "recforge_sorted": recforge_sorted, "unsorted_fixed": unsorted_fixed,
               "st_encode_bf16": lambda: st_encode(model_bf16), "recforge_sorted_bf16": lambda: recforge_sorted(model_bf16)}
    best = {name: float("inf") for name in methods}
    if args.profile_out:
        from torch.profiler import ProfilerActivity, profile

        recforge_sorted(model_bf16)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            recforge_sorted(model_bf16)
        lengths = token_lengths(model_bf16, texts, None)
        atomic_write_json(args.profile_out, {
            "what": "torch.profiler, one recforge bf16 embedding pass, ops by self CPU time", "model": args.model,
            "items": len(texts), "token_length": {"median": int(np.median(lengths)), "max": max(lengths)},
            "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
            "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12).splitlines()})
        print(f"wrote {args.profile_out}")
        return

    vectors = {}
    recforge_sorted()  # warm-up (allocator, kernels)
    recforge_sorted(model_bf16)
    for r in range(args.rounds):
        names = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in names:
            t = time.perf_counter()
            vectors[name] = methods[name]()
            best[name] = min(best[name], time.perf_counter() - t)

    def min_cos(a, b):
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())

    ips = {name: len(texts) / s for name, s in best.items()}
    result = {
        "benchmark": "align_embed",
        "model": args.model,
        "items": len(texts),
        "batch_size": bs,
        "rounds": args.rounds,
        "seconds_best": best,
        "items_per_s": ips,
        "speedup_vs_st_encode": ips["recforge_sorted"] / ips["st_encode"],
        "speedup_vs_unsorted_fixed": ips["recforge_sorted"] / ips["unsorted_fixed"],
        "bf16_speedup_vs_st_encode_bf16": ips["recforge_sorted_bf16"] / ips["st_encode_bf16"],
        "bf16_speedup_vs_st_encode_fp32": ips["recforge_sorted_bf16"] / ips["st_encode"],
        "goal": "recforge bf16 >= 1.5x sentence-transformers bf16 at min cosine >= 0.999 to float32",
        "min_cosine_vs_st_encode": {name: min_cos(v, vectors["st_encode"]) for name, v in vectors.items()},
        "int8_dynamic_min_cosine_vs_st_encode": min_cos(int8_dynamic_vectors(model, texts[:256], bs),
                                                        vectors["st_encode"][:256]),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "note": "2 shared CPU cores; ratios are measured side by side in one process",
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
