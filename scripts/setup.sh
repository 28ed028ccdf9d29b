#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): dev requirements, the package in editable mode
# (building its native extension where a compiler exists), and the data the training runs read.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q -r requirements-dev.txt
# Checkpoint tools the tests save with (tests/test_user_tensors.py), without their dependencies:
# nothing they pull in may move torch, and the save paths need none of it.
$PY -m pip install -q --no-deps safetensors accelerate psutil
# The trainers users drive SNGM from (tests/test_lightning.py, tests/test_hf_trainer.py), pinned,
# the same way: nothing they pull in may move torch. requests' and huggingface_hub's own imports
# are listed by hand (--no-deps installs none of them).
$PY -m pip install -q --no-deps lightning==2.6.6 lightning-utilities==0.15.3 torchmetrics==1.9.0 \
  transformers==5.18.0 tokenizers==0.23.3 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 \
  h11==0.16.0 truststore==0.10.5 regex requests certifi idna urllib3 charset_normalizer tqdm pyyaml \
  fsspec
# DeepSpeed for the ZeRO-1/2 runs of tests/test_distributed.py (DS_ACCELERATOR=cpu, gloo), the
# same way, with the modules it imports that the lines above do not install (pydantic and its
# core are a matched pair). Its sdist builds against the torch installed here and compiles no op.
$PY -m pip install -q --no-deps hjson==3.1.0 msgpack==1.2.4 einops==0.8.2 py-cpuinfo==9.0.0 \
  packaging pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  typing-extensions
DS_ACCELERATOR=cpu DS_BUILD_OPS=0 $PY -m pip install -q --no-deps --no-build-isolation deepspeed==0.19.8
# --no-build-isolation: build against the torch just installed, not a fresh multi-GB CUDA one.
$PY -m pip install -q --no-build-isolation -e .
# Headers and libraries of a CUDA build of torch for the CUDA compile/link check
# (tests/test_cuda_compile.py): unpacked, never imported (550 MB wheel; on these machines it lies
# on local disk). Only where nvcc exists; the check is skipped elsewhere, except in CI.
TREE=${SNGM_TORCH_CUDA_TREE:-$HOME/.cache/sngm_ext/torch-2.14.1-cuda}
if { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; } && [ ! -f "$TREE/torch/include/ATen/ATen.h" ]; then
  $PY -m pip install -q --no-deps --target "$TREE" torch==2.14.1
fi
# Real data for the large-batch training runs (large_batch_study/train_large_batch.py), from Debian's
# packages: Fashion-MNIST (30 MB) and fortunes (2.5 MB of quotes, the text task; "computers" is one of
# its files, the file "fortunes" is fortunes-min's). Needs root and apt; elsewhere see
# docs/large_batch_study.md.
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
[ -f /usr/share/games/fortunes/computers ] || missing+=(fortunes)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
      || echo "setup.sh: could not install ${missing[*]} (the training runs need them)" >&2
  else
    echo "setup.sh: not root: install ${missing[*]} by hand for the training runs" >&2
  fi
fi
