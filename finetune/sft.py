"""`recforge sft`: chat-formatted supervised fine-tuning with trl's SFTTrainer, loss on completions only.

trl (not the bare Trainer) because it already does what SFT needs: chat templating of
prompt-completion examples, the completion-only loss mask, and peft wiring. Examples are built
here per task (see `sft_config.py`), split by the project rule (`recforge.splits`: the same held-out
queries as data_recipes and align, the same held-out books as generate), so they are never trained on; after training the model generates for the held-out examples and the task
metrics (accuracy + macro-F1 for relevance, tag precision/recall/F1 for tags) go to `metrics.json`.

Outputs in `out_dir`: `model/` (adapter or full model + tokenizer), `merged/` when `merge: true`
(plain `from_pretrained` / vLLM-loadable, after a logit-parity check), `metrics.json`,
`eval_ids.json` (the held-out ids), `rejects.jsonl` (malformed input rows), `resolved_config.yaml`, `manifest.json`.

Under `accelerate launch` / `torchrun` every rank trains on its shard of the examples (the Trainer's sampler)
and takes part in `trainer.evaluate()` and `save_model`; everything else (generation metrics, merge, files) is
the main process's (`recforge.distributed`), and every rank returns rank 0's metrics once it is done.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path

from recforge.config import RecforgeError
from recforge.distributed import from_main
from recforge.io import atomic_write_json, resolve_path
from recforge.manifest import RunRecorder
from recforge.runstate import output_lock, require_complete
from recforge.coerce import as_text
from recforge.esci import read_esci
from recforge.features_table import read_features_table
from recforge.readers import FileKey, RejectLog, SourceConfig, read_items, read_records
from recforge.splits import describe, entity_key, entity_leakage, is_eval

from .sft_config import SFTConfig

RELEVANCE_INSTRUCTION = "Grade how relevant the product is to the search query. Answer with one word: {labels}."
DISTILL_INSTRUCTION = {"tags": "List tags for this item, comma-separated.", "summary": "Summarise this item.",
                       "knowledge": "Describe what a shopper should know about this item.",
                       "pseudo_queries": "Write search queries that should find this item, one per line."}


def _example(key: str, user: str, answer: str, target, entity: str, entity_id: str) -> dict:
    """A chat example; `group` (`query:<id>`, `book:<id>`, `item:<id>`) is the unit the split holds out."""
    return {"id": key, "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": answer}], "target": json.dumps(target),
            "entity": entity, "entity_id": entity_id, "group": entity_key(entity, entity_id)}


def relevance_examples(cfg: SFTConfig, rejects: RejectLog | None = None) -> list[dict]:
    d = cfg.relevance
    queries, items, judgments = read_esci((d.queries, d.items, d.judgments),
                                          ("relevance.queries", "relevance.items", "relevance.judgments"),
                                          rejects if rejects is not None else RejectLog())
    instruction = RELEVANCE_INSTRUCTION.format(labels=", ".join(d.labels[k] for k in sorted(d.labels, reverse=True)))
    out = []
    for j in judgments:
        if j.query_id not in queries or j.item_id not in items:
            continue
        label = d.labels.get(int(j.grade))
        if label is None:
            raise RecforgeError(f"relevance.judgments: {d.judgments}: grade {j.grade:g} of query {j.query_id} has no "
                                f"label in relevance.labels ({sorted(d.labels)})")
        user = f"{instruction}\nQuery: {queries[j.query_id]}\nProduct: {items[j.item_id]}"
        # split by query: a held-out query is never seen in training
        out.append(_example(f"{j.query_id}|{j.item_id}", user, label, label, "query", j.query_id))
    return out


@functools.lru_cache(maxsize=1)
def _shelf_tags_prompt():
    from recforge.prompts import load_prompt

    return load_prompt("shelf_tags")


def tags_prompt(book_id: str, b: dict, n: int) -> str:
    """The one tags prompt (prompts/shelf_tags.j2): the SFT'd tagger learns what `recforge generate` will ask it."""
    record = {"title": b["title"], "authors": b.get("authors") or [], "year": b.get("original_publication_year")}
    return _shelf_tags_prompt().render_user(record, f"book:{book_id}", {"k": n})


BOOK_KINDS = {"title": "text", "authors": "list", "tags": "tags"}


def tags_examples(cfg: SFTConfig, rejects: RejectLog | None = None) -> list[dict]:
    d, rejects = cfg.tags, rejects if rejects is not None else RejectLog()
    skip = {t.lower() for t in d.skip_tags}
    books = []
    for book_id, b in read_records(SourceConfig(path=d.books, id="book_id"), rejects, FileKey("tags.books"), BOOK_KINDS):
        tags = [t for t in book_target_tags(b.get("tags") or [], d.reader_shelf_rule) if t.lower() not in skip]
        if tags:
            books.append((book_id, b, tags[: d.from_top or d.n_tags]))
    if d.order == "frequency":
        # one global order: tags most common among the training books first (held-out books not counted)
        freq = Counter(t for bid, _, tags in books if not is_eval("book", bid, cfg.split) for t in tags)
        books = [(bid, b, sorted(tags, key=lambda t: (-freq[t], t))) for bid, b, tags in books]
    return [_example(f"book:{bid}", tags_prompt(bid, b, d.n_tags),
                     ", ".join(tags[: d.n_tags]), tags[: d.n_tags], "book", bid) for bid, b, tags in books]


def book_target_tags(tags: list[dict], reader_shelf_rule: bool) -> list[str]:
    """A book's shelves, most used first. With `reader_shelf_rule`: normalised and filtered by generate's
    documented reader-shelf rule, i.e. exactly the shelves `recforge eval tags` scores a tagger against
    (reused, not copied, so training targets and the metric can never drift apart)."""
    if reader_shelf_rule:
        from recforge.shelf_tags import book_shelf_tags

        return book_shelf_tags(tags, top=len(tags))
    return [t["tag_name"] for t in sorted(tags, key=lambda t: -t.get("count", 1))]


def distill_examples(cfg: SFTConfig, rejects: RejectLog | None = None) -> list[dict]:
    d, rejects = cfg.distill, rejects if rejects is not None else RejectLog()
    if d is None:
        raise RecforgeError("task: distill needs a `distill:` section (features, items)")
    feats = read_features_table(d.features, "distill.features")
    src = SourceConfig(path=d.items, id=d.item_id_field, fields={f: f for f in d.text_fields})
    items = {it.item_id: " | ".join(as_text(it.fields[f]) for f in d.text_fields if it.fields.get(f))
             for it in read_items(src, rejects, FileKey("distill.items"))}
    out = []
    for f in feats:
        eid = str(f["entity_id"])
        if f.get("entity_type", "item") != "item" or eid not in items:
            continue
        value = f.get(d.target)
        if not value:
            continue
        answer = ", ".join(value) if d.target == "tags" else ("\n".join(value) if isinstance(value, list) else value)
        out.append(_example(f"item:{eid}", f"{DISTILL_INSTRUCTION[d.target]}\nItem: {items[eid]}", answer,
                            value if d.target == "tags" else answer, d.entity, eid))
    if not out:
        raise RecforgeError(f"{d.features}: no item rows with a {d.target!r} value matched an item in {d.items}")
    return out


BUILDERS = {"relevance": relevance_examples, "tags": tags_examples, "distill": distill_examples}


def entity_of(cfg: SFTConfig) -> str:
    """What the task's split holds out: queries, books, or the distilled items (book ids for goodbooks)."""
    return {"relevance": "query", "tags": "book"}.get(cfg.task) or (cfg.distill.entity if cfg.distill else "item")


def split_report(cfg: SFTConfig, examples: list[dict], train: list[dict]) -> dict:
    """The manifest's leakage report: every held-out entity vs the entities trained on (0 = no leakage).

    Eval ids are all held-out entities of the task, not only the `max_eval_examples` scored."""
    entity = entity_of(cfg)
    held = {e["entity_id"] for e in examples if is_eval(entity, e["entity_id"], cfg.split)}
    return entity_leakage([e["entity_id"] for e in train], held, entity, cfg.split)


def split_examples(cfg: SFTConfig, examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """Held out by the project rule on each example's entity (query / book / item): the other stages' eval set."""
    held = [is_eval(e["entity"], e["entity_id"], cfg.split) for e in examples]
    train = [e for e, h in zip(examples, held) if not h]
    evals = [e for e, h in zip(examples, held) if h]
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_eval_examples:
        evals = evals[: cfg.max_eval_examples]
    if not train:
        raise RecforgeError(f"task {cfg.task}: no training examples")
    return train, evals


def fit_to_length(tokenizer, examples: list[dict], max_length: int) -> int:
    """Shorten the item text at the end of over-long prompts so every answer fits in `max_length`.

    trl truncates a tokenised example from the right, which for a long product title cuts off the answer,
    the only tokens the loss counts: such an example would train on nothing. The end of the user message
    (the item text) is trimmed instead, identically for training and evaluation prompts. Returns how many
    examples were trimmed (reported in metrics.json); an answer that cannot fit even so is an error.
    """
    trimmed = 0
    for ex in examples:
        over = _chat_length(tokenizer, ex) - max_length
        if over <= 0:
            continue
        content = ex["prompt"][-1]["content"]
        ids = tokenizer(content, add_special_tokens=False)["input_ids"]
        keep = len(ids) - over - 1  # one token of room for the ellipsis
        if keep < len(ids) // 2:
            raise RecforgeError(f"example {ex['id']}: the answer does not fit in max_length={max_length} "
                                f"even with half its prompt cut; raise max_length")
        ex["prompt"] = ex["prompt"][:-1] + [{**ex["prompt"][-1], "content": tokenizer.decode(ids[:keep]).rstrip() + "…"}]
        while _chat_length(tokenizer, ex) > max_length:  # re-tokenising at the cut may merge differently
            text = ex["prompt"][-1]["content"][:-2].rstrip()
            if not text:
                raise RecforgeError(f"example {ex['id']}: the answer does not fit in max_length={max_length}")
            ex["prompt"] = ex["prompt"][:-1] + [{**ex["prompt"][-1], "content": text + "…"}]
        trimmed += 1
    return trimmed


def check_answer_budget(tokenizer, labels: list[str], max_new_tokens: int) -> None:
    """Fail before training when `max_new_tokens` cannot hold the longest label and the end-of-turn token
    (a cut label, e.g. "irrelev", parses as no answer and scores 0)."""
    need = max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels) + 1
    if max_new_tokens < need:
        raise RecforgeError(f"max_new_tokens={max_new_tokens} cannot hold the longest label plus the end of turn "
                            f"({need} tokens for this tokenizer); set max_new_tokens={need} or more")


def _chat_length(tokenizer, ex: dict) -> int:
    return len(tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True, return_dict=True)["input_ids"])


# ---------------------------------------------------------------------------- metrics


def parse_tags(text: str) -> list[str]:
    return [t.strip().lower() for t in re.split(r"[,\n]", text) if t.strip()]


def relevance_metrics(preds: list[str], targets: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    def first_label(text: str) -> str:
        words = re.findall(r"[a-z]+", text.lower())
        return next((w for w in words if w in labels), "none")

    got = [first_label(p) for p in preds]
    return {"accuracy": accuracy_score(targets, got),
            "macro_f1": f1_score(targets, got, labels=labels, average="macro", zero_division=0),
            "parsed": sum(g != "none" for g in got) / max(len(got), 1)}


def tag_metrics(preds: list[str], targets: list[list[str]], k: int = 5) -> dict:
    """P@k / R@k as `recforge eval tags` computes them (recforge.shelf_tags): one metric for the tagger."""
    from recforge.shelf_tags import precision_recall_at_k

    pred = {str(i): parse_tags(p) for i, p in enumerate(preds)}
    truth = {str(i): [t.lower() for t in gold] for i, gold in enumerate(targets) if gold}
    scores = precision_recall_at_k(pred, truth, k)
    return {f"precision@{k}": scores[f"precision@{k}"], f"recall@{k}": scores[f"recall@{k}"]}


def majority_baseline(cfg: SFTConfig, train: list[dict], evals: list[dict]) -> dict:
    """The score of always answering the most common training grade: what a relevance model must beat."""
    majority = Counter(json.loads(e["target"]) for e in train).most_common(1)[0][0]
    targets = [json.loads(e["target"]) for e in evals]
    return {"label": majority, **relevance_metrics([majority] * len(evals), targets, list(cfg.relevance.labels.values()))}


def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers, tokenised exactly as trl tokenised the training prompts (the chat template)."""
    import torch

    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer.apply_chat_template(prompts[i : i + batch_size], add_generation_prompt=True, tokenize=True,
                                                return_dict=True, padding=True, return_tensors="pt")
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in out]


def task_metrics(cfg: SFTConfig, model, tokenizer, evals: list[dict]) -> dict:
    if not evals:
        return {}
    preds = generate_answers(model, tokenizer, [e["prompt"] for e in evals], cfg.max_new_tokens)
    targets = [json.loads(e["target"]) for e in evals]
    if cfg.task == "relevance":
        metrics = relevance_metrics(preds, targets, list(cfg.relevance.labels.values()))
    elif cfg.task == "tags" or (cfg.distill and cfg.distill.target == "tags"):
        metrics = tag_metrics(preds, targets, cfg.tags.n_tags if cfg.task == "tags" else 5)
    else:
        metrics = {"exact_match": sum(p.strip() == t.strip() for p, t in zip(preds, targets)) / len(preds)}
    metrics["n_eval"] = len(evals)
    metrics["examples"] = [{"id": e["id"], "target": t, "prediction": p} for e, t, p in list(zip(evals, targets, preds))[:5]]
    return metrics


# ---------------------------------------------------------------------------- training


def run_sft(cfg: SFTConfig, resume: bool = False, allow_partial: bool = False) -> dict:
    """Build the task's examples, train, score the held-out ones, save. Holds the writer lock of `out_dir` for the
    whole run; the recorder (the `running` manifest) comes after the checks, so a refused run changes nothing."""
    from .cpt import resume_checkpoint

    out_dir = Path(cfg.out_dir)
    with output_lock(out_dir, "sft"):
        checkpoint = resume_checkpoint(out_dir, resume)
        partial = check_inputs(cfg, allow_partial)
        run = RunRecorder(out_dir, "sft", cfg, cfg.seed)
        if partial:
            run.extra["allow_partial"] = partial
        return _train(cfg, out_dir, checkpoint, run)


def check_inputs(cfg: SFTConfig, allow_partial: bool) -> list[str]:
    """Refuse an input a recforge run wrote (generate's features table, a data run's files) that did not finish;
    returns the `--allow-partial` notes of those read anyway."""
    notes = [require_complete(resolve_path(src), f"{cfg.task} input", allow_partial) for src in _inputs(cfg)]
    return [n for n in notes if n]


def _train(cfg: SFTConfig, out_dir: Path, checkpoint: str | None, run: RunRecorder) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    from .cpt import cpu_only, load_model_and_tokenizer

    set_seed(cfg.seed)
    main = run.main  # rank 0 of a multi-process launch (or the only process): the one that writes files
    if main:
        (out_dir / "rejects.jsonl").unlink(missing_ok=True)  # a re-run reports its own rejects only
    with RejectLog(out_dir / "rejects.jsonl" if main else None) as rejects:  # other ranks count, never write
        examples = BUILDERS[cfg.task](cfg, rejects)
    run.rejects.update(rejects.counts)
    train, evals = split_examples(cfg, examples)
    run.extra["leakage"] = split_report(cfg, examples, train)
    for src in _inputs(cfg):
        run.add_input(src, name=cfg.task)

    peft_config = None
    if cfg.mode in ("lora", "qlora"):
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    t = cfg.training
    args = TrlSFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        completion_only_loss=True,  # the loss mask: prompt tokens never count
        max_length=cfg.max_length,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps,
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, bf16=t.bf16,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        report_to=t.report_to or "none", seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=True,
        dataset_num_proc=None,
        use_cpu=cpu_only(),
    )
    # after the training arguments: under DeepSpeed ZeRO-3 they register the config that makes from_pretrained
    # partition the weights while loading (zero3_init_flag); loaded before, the flag could not act
    model, tokenizer = load_model_and_tokenizer(cfg)  # same loading rules as cpt (dtype, 4-bit check, safetensors)
    prompts_trimmed = fit_to_length(tokenizer, train + evals, cfg.max_length)
    if cfg.task == "relevance":
        check_answer_budget(tokenizer, list(cfg.relevance.labels.values()), cfg.max_new_tokens)
    cols = ["prompt", "completion"]
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=datasets.Dataset.from_list([{k: e[k] for k in cols} for e in train]),
        eval_dataset=datasets.Dataset.from_list([{k: e[k] for k in cols} for e in evals]) if evals else None,
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
               "n_train": len(train), "n_eval": len(evals), "prompts_trimmed": prompts_trimmed}
    if evals:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]  # every rank: the eval loop shards and gathers
    # generation metrics: rank 0 alone, unless the weights are sharded (FSDP / DeepSpeed), where every forward
    # pass gathers parameters from all ranks (generate then syncs the ranks itself)
    if main or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        metrics.update(task_metrics(cfg, trainer.model, tokenizer, evals))

    model_dir = out_dir / "model"
    trainer.save_model(str(model_dir))  # every rank (a sharded model is gathered), rank 0 writes
    if not main:
        return from_main(None)  # wait for rank 0's merge and files; return its metrics
    if cfg.task == "relevance" and evals:
        metrics["baseline_majority_label"] = majority_baseline(cfg, train, evals)
    (model_dir / "training_args.bin").unlink(missing_ok=True)  # keep the model folder pickle-free
    tokenizer.save_pretrained(str(model_dir))
    entity = entity_of(cfg)
    atomic_write_json(out_dir / "eval_ids.json", {"task": cfg.task, "held_out_percent": getattr(cfg.split.eval_percent, entity),
                                                  "split": describe(entity, cfg.split), "eval_ids": [e["id"] for e in evals]})
    if cfg.merge and cfg.mode != "full":
        from .publish import merge_with_parity

        metrics["merge_max_logit_diff"] = merge_with_parity(cfg.model_dump(), model_dir, tokenizer, out_dir, 1e-3, [])
    elif cfg.merge:
        # full fine-tuning: nothing to merge, but `merged/` is the path consumers (generate, vLLM) load;
        # written beside and renamed into place, so a killed run never leaves a half-written merged/
        import shutil

        merged, tmp = out_dir / "merged", out_dir / ".merged.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        shutil.rmtree(merged, ignore_errors=True)
        tmp.rename(merged)
    atomic_write_json(out_dir / "metrics.json", metrics)
    run.add_output("model", model_dir, mode=cfg.mode)
    run.extra.update({"eval": metrics, "train": {"steps": trainer.state.global_step, "resumed_from": checkpoint,
                                                 "world_size": trainer.args.world_size,
                                                 "global_batch_size": t.per_device_train_batch_size
                                                 * t.gradient_accumulation_steps * trainer.args.world_size}})
    run.finish()
    return from_main(metrics)


def _inputs(cfg: SFTConfig) -> list[str]:
    if cfg.task == "relevance":
        return [cfg.relevance.queries, cfg.relevance.items, cfg.relevance.judgments]
    if cfg.task == "tags":
        return [cfg.tags.books]
    return [cfg.distill.features, cfg.distill.items] if cfg.distill else []
