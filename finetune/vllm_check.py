"""`python -m recforge.finetune.vllm_check --model BASE [--adapter DIR] --texts-json FILE`: does vLLM load it?

`recforge publish` runs this in a subprocess where vLLM is installed: vLLM starts its engine core with
spawn and keeps process-wide state, so a check inside the publishing process could neither be cleaned up
nor run twice. It loads the model (the base with the adapter through `LoRARequest`, or a merged folder),
decodes each text greedily for a few tokens and prints one JSON line: the token ids per text, or the error.
Publish compares those ids with the transformers model it has already checked.
"""

from __future__ import annotations

import argparse
import json
import sys


def check(model: str, adapter: str | None, texts: list[str], max_tokens: int, rank: int | None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from recforge.vllm_settings import lora_rank_slot, memory_kwargs

    # a short check: eager (no compile) with a 1 GiB KV cache on any device
    kwargs = dict(model=model, dtype="float32", max_model_len=512, seed=0, enforce_eager=True,
                  **memory_kwargs(cpu=True, kv_cache_gib=1.0))
    if adapter:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(rank), tokenizer=adapter)
    llm = LLM(**kwargs)
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tokenizer(t)["input_ids"]} for t in texts]
    lora = LoRARequest("published", 1, adapter) if adapter else None
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), lora_request=lora, use_tqdm=False)
    return {"ok": True, "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--texts-json", required=True)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    with open(args.texts_json, encoding="utf-8") as f:
        texts = json.load(f)
    try:
        result = check(args.model, args.adapter, texts, args.max_tokens, args.rank)
    except Exception as err:  # noqa: BLE001 - any load failure is the answer, reported as one line
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    print("RECFORGE_VLLM_CHECK " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
