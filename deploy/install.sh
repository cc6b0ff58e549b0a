#!/bin/sh
# Install omni-call with the torch build for one kind of machine into a new virtual environment.
# The container images run exactly this (deploy/Dockerfile), and tests/test_deploy.py runs it
# on the CPU variant, so the image's install path is exercised on every CI run.
#
# usage: deploy/install.sh VENV SOURCE
#   VENV     where to create the environment (e.g. /opt/omni)
#   SOURCE   the project directory (or a built wheel)
# environment:
#   OMNI_TORCH        cpu | cuda (default cpu)
#   TORCH_VERSION     the torch release to pin (default 2.13.0)
#   TORCH_CPU_INDEX   extra index with CPU-only torch wheels for the cpu variant (default: the
#                     PyTorch CPU index; empty: whatever pip's own configuration offers)
set -eu

venv=$1
source=$2
variant=${OMNI_TORCH:-cpu}
torch="torch==${TORCH_VERSION:-2.13.0}"
cpu_index=${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}

python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
case "$variant" in
    # PyPI's Linux torch wheels are CUDA builds whose CUDA libraries come as pip packages, so
    # the image needs no CUDA base, only the host's driver (NVIDIA container toolkit)
    cuda) $pip install "$torch" ;;
    # the CPU index holds +cpu builds (about 200 MB instead of several GB); torch==X matches X+cpu
    cpu) $pip install "$torch" ${cpu_index:+--extra-index-url "$cpu_index"} ;;
    *) echo "install.sh: OMNI_TORCH must be cpu or cuda, not '$variant'" >&2; exit 2 ;;
esac
# torch is already satisfied, so the project's own `torch>=...` pulls no other build
$pip install "$source"
# the installed command starts and finds its package data (presets, web page)
"$venv/bin/omni" models list >/dev/null
echo "install.sh: omni-call installed in $venv ($variant torch)"
