"""Which layer and pooling of the UNTUNED LLM carry retrieval signal (issue 25's first sweep axis, no training).

One forward pass (all hidden states) over the VALIDATION queries (a salted-hash share of the training queries,
`data.esci.eval_on=validation`; held-out queries never used) and the catalogue; for every layer, NDCG@10 /
recall@50 / MRR@10 of: `mean` over content tokens (prompt left out by its count in the joined text, EOS left
out) and `last_token` (the appended EOS, as `pooling.mode=last_token`). Writes bench/results/align_llm_layer_probe.json.

    .venv/bin/python bench/align_llm_layer_probe.py [--model smollm2] [--max-seq-length 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-seq-length", type=int, default=32)
    ap.add_argument("--query-prompt", default="Query: ")
    ap.add_argument("--document-prompt", default="Product: ")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="bench/results/align_llm_layer_probe.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoModel, AutoTokenizer

    from recforge.align.align_config import EsciSource
    from recforge.align.evaluate import rank_metrics
    from recforge.align.pairs import build_esci
    from recforge.align.pooling import prompt_tokens_in_joined, resolve_backbone_path

    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    task = build_esci(EsciSource(eval_on="validation")).task
    path = resolve_backbone_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def encode(texts: list[str], prompt: str) -> dict[str, np.ndarray]:
        """{"mean": [layers, n, d], "last_token": [layers, n, d]}"""
        means, lasts = [], []
        for start in range(0, len(texts), args.batch_size):
            batch = texts[start:start + args.batch_size]
            ids, skip = [], []
            for t in batch:
                x = tok(prompt + t, add_special_tokens=True)["input_ids"][: args.max_seq_length - 1] + [tok.eos_token_id]
                ids.append(x)
                skip.append(prompt_tokens_in_joined(tok, prompt, t))
            width = max(map(len, ids))
            input_ids = torch.full((len(ids), width), tok.pad_token_id or 0)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):
                input_ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            with torch.no_grad():
                hs = torch.stack(model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states)
            content = mask.clone()
            for i, x in enumerate(ids):
                content[i, : skip[i]] = 0
                content[i, len(x) - 1] = 0  # the EOS
            content[content.sum(1) == 0, 0] = 1  # never an empty mean
            w = content[None, :, :, None].float()
            means.append(((hs * w).sum(2) / w.sum(2)).numpy())
            last = torch.tensor([len(x) - 1 for x in ids])
            lasts.append(hs[:, torch.arange(len(ids)), last].numpy())
        return {"mean": np.concatenate(means, 1), "last_token": np.concatenate(lasts, 1)}

    q_ids, d_ids = list(task.queries), list(task.corpus)
    q = encode([task.queries[i] for i in q_ids], args.query_prompt)
    d = encode([task.corpus[i] for i in d_ids], args.document_prompt)
    t_enc = time.perf_counter() - t0
    results: dict[str, dict] = {}
    for pooling in ("mean", "last_token"):
        for layer in range(q[pooling].shape[0]):
            a = q[pooling][layer]
            b = d[pooling][layer]
            a = a / np.linalg.norm(a, axis=1, keepdims=True)
            b = b / np.linalg.norm(b, axis=1, keepdims=True)
            top = np.argsort(-(a @ b.T), axis=1, kind="stable")[:, :50]
            m = rank_metrics([[d_ids[j] for j in row] for row in top], [task.qrels[i] for i in q_ids], [10, 50],
                             task.relevant_min_grade)
            results.setdefault(pooling, {})[str(layer)] = {k: round(v, 4) for k, v in m.items() if k in ("ndcg@10", "recall@50", "mrr@10")}
    best = {p: max(r, key=lambda k: r[k]["ndcg@10"]) for p, r in results.items()}
    report = {"benchmark": "align_llm_layer_probe", "model": str(path), "untuned": True,
              "queries": "validation (training-query share, data.esci.eval_on=validation)", "n_queries": len(q_ids),
              "n_documents": len(d_ids), "max_seq_length": args.max_seq_length,
              "prompts": {"query": args.query_prompt, "document": args.document_prompt},
              "layer_0_is": "the embeddings; layer L = output of transformer layer L (the last one after the final norm)",
              "best_layer": {p: {"layer": int(k), **results[p][k]} for p, k in best.items()},
              "results": results, "seconds": {"encode": round(t_enc, 1), "total": round(time.perf_counter() - t0, 1)},
              "torch_threads": args.threads, "load_avg_start": load0, "load_avg_end": os.getloadavg()[0]}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for p in results:
        print(p, " ".join(f"{k}:{v['ndcg@10']:.3f}" for k, v in results[p].items()))
    print(json.dumps(report["best_layer"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
