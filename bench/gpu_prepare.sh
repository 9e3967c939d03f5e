#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on the GPU machine into .whl/ (git-ignored), and report their size.
#
#   bash bench/gpu_prepare.sh                      # cp312 manylinux wheels into .whl/ (what the GPU machine runs)
#   PYVER=3.11 DEST=/tmp/whl311 bash bench/gpu_prepare.sh   # the same set for this machine's Python (local check)
#
# The GPU machine reaches no registry; its image already holds torch, transformers, peft, accelerate,
# sentence-transformers, pyarrow, pandas, numpy, jinja2, pyyaml, tqdm, safetensors, tokenizers, xxhash, psutil
# (/work/.library/device/KINDS.md). recforge's code path for the check also needs these, missing there:
#   pydantic (+ pydantic-core, annotated-types, typing-inspection; typing-extensions >= 4.16 for pydantic 2.14)
#       recforge.config / manifest / every *_config.py
#   datasets (+ dill, multiprocess)   sentence-transformers' trainer (align) and trl.pack_dataset (packing bench)
#   trl                               the TRL arms of bench/finetune_packing.py
# Versions are the ones this project's .venv runs (pyproject ranges). All are pure Python except pydantic-core.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
WHEELS=(
  pydantic==2.14.4
  pydantic_core==2.50.5
  annotated_types==0.8.0
  typing_inspection==0.4.5
  typing_extensions==4.16.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  trl==1.16.0
)
mkdir -p "$DEST"
# one version of each: a stale wheel of another version would make the --target install fail
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; ver=${spec##*==}
  for f in "$DEST"/"$name"-*.whl; do
    [ -e "$f" ] || continue
    case "$(basename "$f")" in "$name-$ver-"*) ;; *) echo "removing stale $f"; rm -f "$f";; esac
  done
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
# Model configs + tokenizers (no weights: they cannot travel; gpu_check.py builds random-weight models from the
# configs, which is all throughput, memory and FLOPs depend on), from `recforge model fetch`'s converted folders.
if [ "$DEST" = .whl ]; then
  for alias in smollm2 qwen2.5-0.5b; do
    src=runs/models/$alias
    [ -f "$src/config.json" ] || .venv/bin/recforge model fetch "$alias" --out "$src"
    mkdir -p "$DEST/gpu_models/$alias"
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja LICENSE recforge_source.json; do
      [ -f "$src/$f" ] && cp "$src/$f" "$DEST/gpu_models/$alias/"
    done
  done
  du -sh "$DEST/gpu_models"
fi
ls -l "$DEST"/*.whl
total=$(cat "$DEST"/*.whl | wc -c)
echo "wheels: $(ls "$DEST"/*.whl | wc -l) files, $total bytes ($((total / 1024)) KiB) in $DEST"
if [ "$DEST" = .whl ]; then
  # what travels to the GPU machine: tracked + untracked-not-ignored files + the carried .whl/ (limit 64 MiB)
  tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) \
         | python3 -c 'import os,sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if p and os.path.isfile(p)))')
  echo "working tree that travels: $tree bytes + wheels $total = $(( (tree + total) / 1048576 )) MiB of 64 MiB"
fi
