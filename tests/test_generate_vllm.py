"""The vLLM engine against a fake `vllm` module at the boundary (no vLLM/GPU here), plus a GPU parity test.

The fake stands in only for what cannot run on this machine: `vllm.LLM`. It records what the engine
submits (the request translation is what we test) and answers deterministically.
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


def test_engine_construction_and_request_translation(engine):
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["tensor_parallel_size"] == 2 and llm.kwargs["enable_prefix_caching"] is True
    assert llm.kwargs["max_model_len"] == 128 and "enable_lora" not in llm.kwargs
    reqs = [
        GenerationRequest("a", "hello there", Sampling(max_tokens=40, temperature=0.7, top_p=0.9, n=2, seed=5, stop=("\n\n",))),
        GenerationRequest("b", "tags?", Sampling(max_tokens=20), Constraint("json", {"type": "object", "properties": {"tags": {"type": "array"}}})),
        GenerationRequest("c", "genre?", Sampling(max_tokens=5), Constraint("choice", ("fantasy", "romance"))),
        GenerationRequest("d", "year?", Sampling(max_tokens=5), Constraint("regex", "[0-9]{4}")),
    ]
    res = engine.generate(reqs)
    call = llm.calls[-1]
    sp = call["params"]
    from recforge.generate.transformers_engine import encode_prompt

    assert [p["prompt_token_ids"] for p in call["prompts"]] == [encode_prompt(engine.tokenizer, r.prompt) for r in reqs]
    assert (sp[0].n, sp[0].temperature, sp[0].top_p, sp[0].max_tokens, sp[0].seed, sp[0].stop) == (2, 0.7, 0.9, 40, 5, ["\n\n"])
    assert all(p.max_tokens is not None for p in sp)
    assert sp[0].structured_outputs is None
    assert json.loads(sp[1].structured_outputs.json)["properties"] == {"tags": {"type": "array"}}
    assert sp[1].structured_outputs.disable_any_whitespace is True
    assert sp[2].structured_outputs.choice == ["fantasy", "romance"]
    assert sp[3].structured_outputs.regex == "[0-9]{4}"
    assert [r.request_id for r in res] == ["a", "b", "c", "d"]
    assert len(res[0].completions) == 2 and res[2].completions[0].text == "romance"
    assert res[0].prompt_tokens == len(call["prompts"][0]["prompt_token_ids"])


def test_over_long_prompt_never_reaches_vllm(engine):
    llm = FakeLLM.instances[-1]
    reqs = [
        GenerationRequest("ok", "short", Sampling(max_tokens=8)),
        GenerationRequest("long", "word " * 200, Sampling(max_tokens=8)),
        GenerationRequest("edge", "short", Sampling(max_tokens=128)),  # prompt + max_tokens over 128
    ]
    res = engine.generate(reqs)
    assert res[0].ok and "prompt_too_long" in res[1].error and "prompt_too_long" in res[2].error
    assert len(llm.calls[-1]["prompts"]) == 1


def test_a_crashing_row_fails_alone(engine):
    reqs = [GenerationRequest(f"r{i}", "fine" if i != 2 else "CRASH here", Sampling(max_tokens=8)) for i in range(4)]
    res = engine.generate(reqs)
    assert [r.ok for r in res] == [True, True, False, True]
    assert "engine crashed" in res[2].error
    assert [r.request_id for r in res] == ["r0", "r1", "r2", "r3"]
    assert res[3].completions[0].text.startswith("echo")


def test_finish_reason_and_token_counts(engine):
    res = engine.generate([GenerationRequest("x", "hi", Sampling(max_tokens=2))])[0]
    assert res.completions[0].finish_reason == "length" and res.completions[0].num_tokens == 2


def test_lora_adapter_gets_one_stable_id(monkeypatch, tiny_model_dir, tmp_path):
    install_fake_vllm(monkeypatch)
    from recforge.generate.vllm_engine import VLLMEngine, stable_adapter_id

    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-1")
    e1 = VLLMEngine(str(tiny_model_dir), adapter=str(adapter), max_model_len=128)
    e2 = VLLMEngine(str(tiny_model_dir), adapter=str(adapter), max_model_len=128)
    assert FakeLLM.instances[-1].kwargs["enable_lora"] is True
    assert e1.lora_request.lora_int_id == e2.lora_request.lora_int_id == stable_adapter_id(str(adapter)) > 0
    e1.generate([GenerationRequest("a", "hi", Sampling(max_tokens=4))])
    assert FakeLLM.instances[-2].calls[-1]["lora"] is e1.lora_request
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes(b"weights-2")
    assert stable_adapter_id(str(other)) != stable_adapter_id(str(adapter))


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


@pytest.mark.gpu
def test_vllm_matches_transformers_under_greedy(tiny_model_dir):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from recforge.generate.transformers_engine import TransformersEngine
    from recforge.generate.vllm_engine import VLLMEngine

    hf = TransformersEngine(str(tiny_model_dir), dtype="float32")
    prompts = [hf.render_chat([{"role": "user", "content": f"tags for book {i}"}]) for i in range(8)]
    reqs = [GenerationRequest(str(i), p, Sampling(max_tokens=16)) for i, p in enumerate(prompts)]
    reqs.append(GenerationRequest("c", prompts[0], Sampling(max_tokens=8), Constraint("choice", ("fantasy", "romance"))))
    expected = [r.completions[0].text for r in hf.generate(reqs)]
    del hf
    vl = VLLMEngine(str(tiny_model_dir), dtype="float32", max_model_len=2048, gpu_memory_utilization=0.3)
    got = [r.completions[0].text for r in vl.generate(reqs)]
    assert got == expected
