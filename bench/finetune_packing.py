"""CPT batching against the peers a user would pick: recforge `isolated` packing vs HF length-grouped padding,
TRL's BFD packing and TRL's padding-free batching, with random-batch padding as the floor.

    .venv/bin/python bench/finetune_packing.py [--model smollm2] [--steps 6] [--max-length 512] [--rows-per-batch 4]

Same model (SmolLM2-135M-Instruct + LoRA r=16 on every linear layer, bf16 autocast: `make demo`'s CPT setup),
the same documents (the shipped ESCI + goodbooks in-context corpus, each document its own segment), the same
optimizer, and about the same real tokens per step in every arm. Steps of all arms are interleaved in one
process, so a change of machine load hits them alike. Arms:

- `recforge_isolated`: `pack_segments` (best-fit decreasing) into rows of `--max-length`, `PackedCollator`
  (position ids restart per document; transformers derives the block-diagonal mask from them).
- `hf_group_by_length`: `TrainingArguments(train_sampling_strategy="group_by_length")`'s sampler
  (`LengthGroupedSampler`) over single documents, padded to the longest in the micro-batch with an attention
  mask; micro-batches of `--docs-per-micro` documents accumulated to the step's documents.
- `trl_bfd`: `trl.pack_dataset(strategy="bfd")` into rows of `--max-length` and TRL's own collator with
  `padding_free=True`, as `SFTTrainer(packing=True)` batches it: the batch's rows are flattened into one row.
- `trl_bfd_bs1`: the same packed rows, one row per forward (per_device_train_batch_size=1) and the step's
  rows accumulated: what a TRL user on CPU would set to avoid the one long flattened row.
- `trl_padding_free`: TRL's `padding_free=True` without packing: the batch's documents flattened into one row.
- `random_padded`: documents in random order, padded to the longest in the micro-batch (the floor).

Real tokens/s counts non-pad positions over forward+backward time (what the layout changes); the optimizer
step costs the same in every arm and is reported beside it. Before training, every arm's loss on the same 24
documents is compared with the documents run one at a time (`max_abs_loss_diff_vs_alone`), so an arm that lets
documents attend to each other shows here. Writes bench/results/finetune_packing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_packing.json"
ARMS = ("recforge_isolated", "hf_group_by_length", "trl_bfd", "trl_bfd_bs1", "trl_padding_free", "random_padded")


def trl_collator(pad_token_id: int):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)


def trl_packed_rows(segments: list[list[int]], max_length: int) -> list[dict]:
    """TRL's BFD packing of the same segments: rows of {input_ids, seq_lengths}."""
    from datasets import Dataset
    from trl import pack_dataset

    packed = pack_dataset(Dataset.from_dict({"input_ids": segments}), seq_length=max_length, strategy="bfd")
    return [{"input_ids": r["input_ids"], "seq_lengths": r["seq_lengths"]} for r in packed]


def build_batches(arm: str, segments, tok, args, docs_per_batch: int) -> list[list[dict]]:
    """Each step as a list of micro-batches (model inputs) and their real-token counts."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from recforge.finetune.packing import PackedCollator, PaddedCollator, pack_segments

    pad = tok.pad_token_id
    rb = args.rows_per_batch
    if arm == "recforge_isolated":
        rows = pack_segments(segments, args.max_length)
        random.Random(1).shuffle(rows)
        c = PackedCollator(pad)
        return [[(c([{"segments": r} for r in rows[i:i + rb]]), sum(len(s) for r in rows[i:i + rb] for s in r))]
                for i in range(0, len(rows), rb)]
    if arm in ("trl_bfd", "trl_bfd_bs1"):
        rows = trl_packed_rows(segments, args.max_length)
        random.Random(1).shuffle(rows)
        c = trl_collator(pad)
        chunks = [rows[i:i + rb] for i in range(0, len(rows), rb)]
        if arm == "trl_bfd":
            return [[(c(ch), sum(len(r["input_ids"]) for r in ch))] for ch in chunks]
        return [[(c([r]), len(r["input_ids"])) for r in ch] for ch in chunks]
    if arm == "trl_padding_free":
        docs = segments[:]
        random.Random(2).shuffle(docs)
        c = trl_collator(pad)
        return [[(c([{"input_ids": d} for d in docs[i:i + docs_per_batch]]), sum(map(len, docs[i:i + docs_per_batch])))]
                for i in range(0, len(docs), docs_per_batch)]
    # padded arms: micro-batches of `--docs-per-micro` documents, accumulated to the step's documents (one padded
    # batch of ~75 documents up to 305 tokens would need ~20 GB for its 49k-way logits and their gradients)
    c, micro = PaddedCollator(pad), args.docs_per_micro
    if arm == "hf_group_by_length":
        import torch

        sampler = LengthGroupedSampler(micro, lengths=[len(s) for s in segments], generator=torch.Generator().manual_seed(0))
        order = list(sampler)
    else:  # random_padded
        order = list(range(len(segments)))
        random.Random(2).shuffle(order)
    micros = [[segments[j] for j in order[i:i + micro]] for i in range(0, len(order), micro)]
    per_step = max(1, round(docs_per_batch / micro))
    return [[(c([{"input_ids": d} for d in m]), sum(map(len, m))) for m in micros[i:i + per_step]]
            for i in range(0, len(micros), per_step)]


def loss_vs_alone(model, arm, segments, tok, args) -> float:
    """Max |token-weighted loss of the arm's batch layout - the same documents run one at a time|."""
    import torch

    docs = segments[:24]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        alone = []
        for d in docs:
            ids = torch.tensor([d])
            alone.append(float(model(input_ids=ids, labels=ids).loss) * (len(d) - 1))
        want = sum(alone) / sum(len(d) - 1 for d in docs)
        args_one = argparse.Namespace(**{**vars(args), "rows_per_batch": 10**6})
        batches = build_batches(arm, docs, tok, args_one, docs_per_batch=len(docs))
        total, n = 0.0, 0
        for micro in batches:
            for batch, _ in micro:
                k = int((batch["labels"][:, 1:] != -100).sum())
                total += float(model(**batch).loss) * k
                n += k
    return abs(total / n - want)


def row_fill(segments: list[list[int]], lengths=(256, 512, 1024)) -> dict:
    """Rows and real-token fill of recforge's packer vs TRL's BFD on the same segments (no training)."""
    from recforge.finetune.packing import pack_segments, split_long

    out = {}
    tokens = sum(map(len, segments))
    for n in lengths:
        segs = [c for s in segments for c in split_long(s, n)]
        ours, trl = len(pack_segments(segs, n)), len(trl_packed_rows(segs, n))
        out[str(n)] = {"rows_needed_at_100pct": -(-tokens // n), "recforge_rows": ours, "recforge_fill": round(tokens / (ours * n), 4),
                       "trl_bfd_rows": trl, "trl_bfd_fill": round(tokens / (trl * n), 4)}
    return out


def main() -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recforge.finetune.demo import esci_rows, goodbooks_rows
    from recforge.finetune.packing import row_segments
    from recforge.models import resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="a model folder or alias (default: SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per arm")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rows-per-batch", type=int, default=4)
    p.add_argument("--docs-per-micro", type=int, default=16, help="padded arms: documents per forward (accumulated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--fill-only", action="store_true", help="only the packers' row fill (no training), merged into --out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    torch.manual_seed(0)
    model_dir = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    docs = [d for r in esci_rows() + goodbooks_rows(None) for d in r["documents"]]
    segments = [s for d in docs for s in row_segments(tok, [d], "isolated", args.max_length)]
    random.Random(0).shuffle(segments)
    lengths = sorted(len(s) for s in segments)
    if args.fill_only:
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        result["row_fill"] = row_fill(segments)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["row_fill"], indent=2))
        return 0
    # about as many real tokens per step as a packed step (same effective batch size)
    docs_per_batch = max(1, round(args.rows_per_batch * args.max_length * 0.99 / (sum(lengths) / len(lengths))))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.eval()
    isolation = {arm: loss_vs_alone(model, arm, segments, tok, args) for arm in args.arms}
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    batches = {arm: build_batches(arm, segments, tok, args, docs_per_batch) for arm in args.arms}

    def step(micro) -> tuple[float, float]:
        t = time.perf_counter()
        for batch, _ in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(**batch).loss
            (loss / len(micro)).backward()
        t_fb = time.perf_counter() - t
        t = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t_fb, time.perf_counter() - t

    for arm in args.arms:  # warm-up: one step each
        step(batches[arm][0])
    stats = {arm: {"time": 0.0, "opt_time": 0.0, "real": 0, "positions": 0, "rows": 0} for arm in args.arms}
    for i in range(1, args.steps + 1):  # interleaved so load changes hit every arm alike
        for arm in args.arms:
            # steps spread evenly over the epoch: length-grouped batches run from long to short documents
            micro = batches[arm][(i * len(batches[arm])) // (args.steps + 1)]
            fb, opt_s = step(micro)
            s = stats[arm]
            s["time"] += fb
            s["opt_time"] += opt_s
            s["real"] += sum(real for _, real in micro)
            s["positions"] += sum(b["input_ids"].numel() for b, _ in micro)
            s["rows"] += sum(b["input_ids"].shape[0] for b, _ in micro)

    result = {
        "what": "CPT batching, real (non-pad) training tokens/s per arm, steps interleaved in one process",
        "model": f"{args.model} ({model_dir}), LoRA r=16 all-linear, " + ("bf16 autocast" if args.bf16 else "float32"),
        "corpus": {"documents": len(segments), "tokens": sum(lengths), "length_p50": lengths[len(lengths) // 2],
                   "length_p90": lengths[int(len(lengths) * 0.9)], "length_max": lengths[-1]},
        "max_length": args.max_length, "rows_per_batch": args.rows_per_batch, "docs_per_batch_unpacked": docs_per_batch,
        "docs_per_micro_batch_padded": args.docs_per_micro,
        "steps_each": args.steps, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "arms": {},
    }
    for arm, s in stats.items():
        result["arms"][arm] = {
            "real_tokens_per_s": round(s["real"] / s["time"], 1),
            "real_tokens_per_s_with_optimizer": round(s["real"] / (s["time"] + s["opt_time"]), 1),
            "real_token_fraction": round(s["real"] / s["positions"], 4),
            "mean_row_length": round(s["positions"] / s["rows"], 1),
            "real_tokens": s["real"], "forward_backward_s": round(s["time"], 2), "optimizer_s": round(s["opt_time"], 2),
            "max_abs_loss_diff_vs_alone": round(isolation[arm], 5),
        }
    result["row_fill"] = row_fill(segments)
    ours = result["arms"].get("recforge_isolated", {}).get("real_tokens_per_s")
    peers = {a: v["real_tokens_per_s"] for a, v in result["arms"].items() if a not in ("recforge_isolated", "random_padded")}
    if ours and peers:
        best = max(peers, key=peers.get)
        result["best_peer"] = best
        result["ratio_vs_best_peer"] = round(ours / peers[best], 3)
        result["ratio_vs_each"] = {a: round(ours / v["real_tokens_per_s"], 3) for a, v in result["arms"].items()}
        result["goal"] = {"isolated_ge_1.2x_best_peer": ours / peers[best] >= 1.2}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
