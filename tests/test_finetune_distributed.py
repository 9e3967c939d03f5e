"""Scale-out: 2 CPU processes (gloo, torchrun) train a few steps on different data and save one model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recforge.finetune.demo import esci_rows, write_corpus

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "finetune" / "accelerate"


def launch_setup(name: str, monkeypatch):
    """What `accelerate launch --config_file <name>` hands the training processes: accelerate's own launch-argument
    validation, the environment it exports, and the plugin accelerate (hence the Trainer) builds from it."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils import launch as L

    path = ACCELERATE_CONFIGS / name
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(load_config_from_file(str(path)).deepspeed_config)
        env = L.prepare_deepspeed_cmd_env(args)[1]
    else:
        env = L.prepare_multi_gpu_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = None
    if args.use_fsdp:
        plugin = FullyShardedDataParallelPlugin()
    elif args.use_deepspeed:
        plugin = DeepSpeedPlugin()
    return args, env, plugin


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero3.yaml", "multi_node.yaml", "cpu_2proc.yaml"])
def test_shipped_accelerate_configs_launch_a_valid_setup(name, monkeypatch):
    args, env, plugin = launch_setup(name, monkeypatch)
    raw = yaml.safe_load((ACCELERATE_CONFIGS / name).read_text())
    assert args.num_processes == raw["num_processes"] and env["ACCELERATE_MIXED_PRECISION"] == raw["mixed_precision"]
    if name == "fsdp.yaml":
        from torch.distributed.fsdp import StateDictType

        assert plugin.fsdp_version == 2
        # the final save (`trainer.save_model` -> model/) must be a whole state dict a plain from_pretrained loads
        assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
        # every boolean key of the config reaches the plugin (an FSDP1-only key such as use_orig_params is dropped
        # under FSDP2: it would only mislead)
        for key, value in raw["fsdp_config"].items():
            attr = key.removeprefix("fsdp_")
            if isinstance(value, bool) and hasattr(plugin, attr):
                assert getattr(plugin, attr) == value, key
        assert "fsdp_use_orig_params" not in raw["fsdp_config"]
    elif name == "deepspeed_zero3.yaml":
        assert plugin.zero_stage == 3 and plugin.zero3_init_flag is True
        zero = plugin.deepspeed_config["zero_optimization"]
        assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
        # left to the Trainer ("auto"): the recipe's batch size, accumulation and clipping fill them in
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    elif name == "multi_node.yaml":
        assert args.num_machines == 2 and args.main_process_ip == raw["main_process_ip"] and args.nnodes == "2"
    elif name == "cpu_2proc.yaml":
        assert args.use_cpu and args.num_processes == 2


def test_training_arguments_exist_before_the_model_loads(monkeypatch, tmp_path):
    """ZeRO-3's zero3_init_flag acts only if TrainingArguments (which registers the DeepSpeed config) is built
    before from_pretrained: cpt and sft build them first."""
    from recforge.config import load_recipe
    from recforge.finetune import cpt
    from recforge.finetune.cpt_config import CPTConfig
    from recforge.finetune.sft import run_sft
    from recforge.finetune.sft_config import SFTConfig

    order: list[str] = []

    class Stop(Exception):
        pass

    def load_model(cfg):
        order.append("model")
        raise Stop

    real_args = cpt.training_arguments
    monkeypatch.setattr(cpt, "load_model_and_tokenizer", load_model)
    monkeypatch.setattr(cpt, "training_arguments", lambda *a: order.append("args") or real_args(*a))
    recipes = Path(__file__).resolve().parents[1] / "finetune" / "recipes"
    with pytest.raises(Stop):
        cpt.make_trainer(load_recipe(CPTConfig, recipes / "cpt_esci_tiny.yaml", [f"out_dir={tmp_path}"]), tmp_path)
    assert order == ["args", "model"]

    import trl

    real_sft_config = trl.SFTConfig
    monkeypatch.setattr(trl, "SFTConfig", lambda **kw: order.append("sft args") or real_sft_config(**kw))
    with pytest.raises(Stop):
        run_sft(load_recipe(SFTConfig, recipes / "sft_esci_relevance_tiny.yaml", [f"out_dir={tmp_path / 'sft'}"]))
    assert order[2:] == ["sft args", "model"]


@pytest.mark.slow
def test_two_gloo_processes_shard_data_and_save_one_model(tiny_model_dir, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun (installed with torch) not found"
    corpus = write_corpus(esci_rows()[:200], tmp_path / "esci.parquet")
    out = tmp_path / "run"
    recipe = {
        "model": {"path": str(tiny_model_dir)},
        "mode": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": {"esci": {"path": str(corpus), "split": None}}},
        "max_length": 64,
        "training": {"max_steps": 3, "per_device_train_batch_size": 2, "logging_steps": 1, "trace_batches": True},
        "out_dir": str(out),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "recforge", "cpt", str(tmp_path / "r.yaml")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    seen = []
    for rank in (0, 1):
        lines = [json.loads(x) for x in (out / f"batches.rank{rank}.jsonl").read_text().splitlines()]
        assert len(lines) >= 3  # 3 optimizer steps (the loader may fetch ahead)
        seen.append({e for line in lines for e in line["examples"]})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])  # each rank trained on different rows

    assert sorted(p.name for p in (out / "model").glob("*.safetensors")) == ["adapter_model.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["steps"] == 3
