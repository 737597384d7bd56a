#!/usr/bin/env bash
# Builds the venv `make test-frameworks` runs in: resumekit (editable), LLaMA-Factory and DeepSpeed on the same CPU
# torch as .venv. Usage: setup_venv.sh VENV_DIR (PY and TORCH_PIN from the Makefile).
set -euo pipefail

VENV=${1:-.venv-frameworks}
PY=${PY:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
LLAMAFACTORY_PIN=${LLAMAFACTORY_PIN:-llamafactory==0.9.5}
DEEPSPEED_PIN=${DEEPSPEED_PIN:-deepspeed==0.19.8}

"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch first and pinned in the same resolve: otherwise torchvision's newest release pulls a newer (CUDA) torch.
"$PIP" install -q "$TORCH_PIN"
"$PIP" install -q "$TORCH_PIN" "$LLAMAFACTORY_PIN" "$DEEPSPEED_PIN" -e ".[yaml]"

# LLaMA-Factory 0.9.5 imports torchaudio and transformers imports torchvision whenever they are installed, but a
# text SFT uses neither. Their newest wheels carry compiled extensions built for other torch releases (torchaudio's
# last release, 2.11, against torch 2.11), which fail to load with this torch, and no CPU build of a matching pair is
# on PyPI. So: no torchvision at all, and torchaudio's Python package without its compiled extension (torchaudio
# then imports with the extension marked unavailable, as its own loader allows).
"$PIP" uninstall -q -y torchvision || true
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$SITE"/torchaudio/lib/_torchaudio*.so "$SITE"/torchaudio/lib/libtorchaudio*.so
"$VENV/bin/python" -c 'import llamafactory.train.tuner, deepspeed, resumekit; print("frameworks venv ready:",
    "llamafactory", llamafactory.__version__ if hasattr(llamafactory, "__version__") else "", "deepspeed",
    deepspeed.__version__)'
