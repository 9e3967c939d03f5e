"""NoteLLM's joint loss: (InfoNCE + α·generation)/(1+α) on a causal LM, generation targets from item tags."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from recforge.align.align_config import AlignConfig, BackboneConfig, GenerationLossConfig, PoolingConfig
from recforge.config import RecforgeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
BOOK_TAGS = REPO / "data_recipes/samples/goodbooks_10k_book_tags/books_tags.jsonl.gz"
SHELF_NOISE = ["to-read", "currently-reading", "favorites", "owned", "books-i-own", "default"]


def book_tag_pairs(n_books: int, n_eval: int = 0) -> list[dict]:
    """item_tag pairs (book -> one of its top shelf tags), the shape data_recipes' goodbooks pairs have."""
    rows = []
    with gzip.open(BOOK_TAGS, "rt") as f:
        for i, line in enumerate(f):
            if i >= n_books + n_eval:
                break
            book = json.loads(line)
            tags = [t["tag_name"] for t in book["tags"] if t["tag_name"] not in SHELF_NOISE][:4]
            for tag in tags[:2]:
                rows.append({"pair_id": f"it:{book['book_id']}:{tag}", "kind": "item_tag", "anchor_id": str(book["book_id"]),
                             "anchor": f"{book['title']} by {', '.join(book['authors'])}", "positive_id": tag,
                             "positive": tag, "weight": 1.0, "negative_id": None, "negative": None,
                             "anchor_positive_ids": tags, "split": "train" if i < n_books else "eval"})
    return rows


def test_targets_from_pairs_and_file_and_the_task_mix(tmp_path):
    from recforge.align.generation_loss import generation_examples, targets_from_file, targets_from_pairs

    pairs = book_tag_pairs(60)
    targets = targets_from_pairs(pairs, max_hashtags=3)
    first = pairs[0]
    assert targets[first["anchor_id"]] == {"hashtags": first["anchor_positive_ids"][:3], "category": None}
    assert not targets_from_pairs([dict(p, kind="item_item") for p in pairs], 3)  # only item_tag rows give tags

    # A catalogue with both fields: about hashtag_share of rows do hashtags, the rest category.
    cat = tmp_path / "catalogue.jsonl"
    cat.write_text("".join(json.dumps({"item_id": f"b{i}", "tags": [{"tag_name": "to-read"}, {"tag_name": f"t{i}"}],
                                       "category": "fiction" if i % 2 else "poetry"}) + "\n" for i in range(400)))
    gen = GenerationLossConfig(targets_path=str(cat), exclude_tags=["to-read"], hashtag_share=0.4)
    file_targets = targets_from_file(gen)
    assert file_targets["b3"] == {"hashtags": ["t3"], "category": "fiction"}
    rows = [{"pair_id": f"p{i}", "anchor_id": f"u{i}", "anchor": "user", "positive_id": f"b{i}", "positive": f"Book {i}"}
            for i in range(400)]
    examples = generation_examples(rows, file_targets, gen, "Query: ", "Product: ")
    share = sum(e["task"] == "hashtags" for e in examples) / len(examples)
    assert 0.33 < share < 0.47
    assert examples[3]["text"] == "Product: Book 3" and examples[3]["target"] in ("t3", "fiction")
    # An item without a category falls back to hashtags; a row whose items have no targets gets none.
    only_tags = generation_examples(rows[:50] + [dict(rows[0], positive_id="zz", anchor_id="yy")],
                                    {f"b{i}": {"hashtags": ["x"], "category": None} for i in range(50)}, gen, None, None)
    assert {e["task"] for e in only_tags[:50]} == {"hashtags"} and only_tags[50] is None
    # A user -> tag row whose user id happens to equal a book id gets no target (the anchor is a user, not an item).
    user_tag = {"pair_id": "ut", "kind": "user_tag", "anchor_id": "b1", "anchor": "History: ...", "positive_id": "poetry",
                "positive": "poetry"}
    item_tag = dict(user_tag, kind="item_tag", anchor="Book 1")
    assert generation_examples([user_tag, item_tag], file_targets, gen, None, None)[0] is None
    assert generation_examples([user_tag, item_tag], file_targets, gen, None, None)[1]["text"] == "Book 1"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"book_id": 1, "tags": ["a"]}) + "\n")
    with pytest.raises(RecforgeError, match="bad.jsonl.*line 1.*item_id"):
        targets_from_file(GenerationLossConfig(targets_path=str(bad)))


def test_joint_loss_is_the_weighted_mix_and_alpha_zero_is_plain_infonce(tiny_model_dir):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import AutoModelForCausalLM

    from recforge.align.generation_loss import NoteLLMJointLoss, generation_examples, load_lm_head, targets_from_pairs
    from recforge.align.pooling import build_embedding_model

    torch.manual_seed(0)
    model, _ = build_embedding_model(BackboneConfig(path=str(tiny_model_dir), max_seq_length=32),
                                     PoolingConfig(mode="compression"))
    pairs = book_tag_pairs(8)
    gen = GenerationLossConfig()
    examples = generation_examples(pairs, targets_from_pairs(pairs, 3), gen, None, None)
    contrastive = MultipleNegativesRankingLoss(model, scale=20.0)
    head = load_lm_head(tiny_model_dir, model)
    features = [model.preprocess([p["anchor"] for p in pairs]), model.preprocess([p["positive"] for p in pairs])]
    labels = torch.arange(len(pairs))

    plain = contrastive(features, labels)
    off = NoteLLMJointLoss(model, contrastive, head, examples, alpha=0.0)(features, labels)
    assert torch.equal(off, plain)  # α = 0: exactly the InfoNCE path

    joint = NoteLLMJointLoss(model, contrastive, head, examples, alpha=0.25)
    parts = joint(features, labels)
    g = joint.generation_loss(labels.tolist())
    assert set(parts) == {"contrastive", "generation"}
    assert (parts["contrastive"] + parts["generation"]).item() == pytest.approx((plain.item() + 0.25 * g.item()) / 1.25, rel=1e-5)

    # The generation term is the causal LM's own next-token loss on the target tokens only.
    batch = joint.batch_inputs(labels.tolist())
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        reference = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert g.item() == pytest.approx(reference.item(), rel=1e-4)
    tok = model[0].tokenizer
    first_target = tok.decode([t for t in batch["labels"][0].tolist() if t != -100])
    assert first_target.strip().startswith(examples[0]["target"]) and first_target.endswith("</s>")


def test_generation_needs_a_causal_lm_and_targets(tmp_path, minilm_dir):
    from recforge.align.trainer import run_align
    from recforge.align.pairs import pairs_table
    from recforge.io import write_parquet_atomic

    write_parquet_atomic(pairs_table(book_tag_pairs(20, n_eval=4)), tmp_path / "pairs.parquet")
    cfg = load_recipe(AlignConfig, REPO / "align/recipes/goodbooks_notellm.yaml",
                      [f"backbone.path={minilm_dir}", f"out_dir={tmp_path / 'run'}", f"data.pairs_path={tmp_path / 'pairs.parquet'}",
                       "data.kinds=[item_tag]", "loss.generation.targets_path=null"])
    with pytest.raises(RecforgeError, match="causal-LM backbone"):
        run_align(cfg)
    with pytest.raises(RecforgeError, match=r"pairs.parquet: data.kinds=\['item_item'\] but the file has kinds \['item_tag'\]"):
        run_align(cfg.model_copy(update={"data": cfg.data.model_copy(update={"kinds": ["item_item"]})}))


@pytest.mark.slow
def test_notellm_recipe_learns_to_generate_tags_and_exports_plain_st(tiny_model_dir, tmp_path):
    from test_align_train import plain_st_check

    from recforge.align.pairs import pairs_table
    from recforge.align.trainer import run_align
    from recforge.io import write_parquet_atomic

    write_parquet_atomic(pairs_table(book_tag_pairs(80, n_eval=10)), tmp_path / "pairs.parquet")
    cfg = load_recipe(AlignConfig, REPO / "align/recipes/goodbooks_notellm.yaml",
                      [f"backbone.path={tiny_model_dir}", f"out_dir={tmp_path / 'run'}", f"data.pairs_path={tmp_path / 'pairs.parquet'}",
                       "loss.generation_weight=0.5", "train.num_train_epochs=3", "eval.compare_base=false", "data.kinds=[item_tag]",
                       "loss.generation.targets_path=null", "backbone.max_seq_length=32", "train.per_device_train_batch_size=16"])
    out = run_align(cfg)
    train = out["train"]
    assert train["generation_rows_with_targets"] == train["train_rows"]  # every item_tag row has its book's tags
    assert train["generation_loss_after"] < 0.7 * train["generation_loss_before"], train
    check = plain_st_check(tmp_path / "run")
    assert check["recforge_imported"] is False and check["right"] >= 0.9999 and check["left"] >= 0.9999
    modules = json.loads((tmp_path / "run" / "model" / "modules.json").read_text())
    assert len(modules) == 4  # Transformer, Pooling, Dense, Normalize: no LM head in the embedding export
