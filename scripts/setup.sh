#!/usr/bin/env bash
# Sets DPA edge up on a fresh Debian/Ubuntu machine: system packages, a virtual environment in .venv,
# PyTorch (the pinned CPU build where no NVIDIA GPU is present), and the project itself.
# Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${DPA_VENV:-.venv}
TORCH_VERSION=${DPA_TORCH_VERSION:-2.13.0}
# cmake + pkg-config build the plugin library. GStreamer video I/O (dpa.runtime.video): the tools and plugin
# sets (x264enc is in -ugly, intervideo/mpegts in -bad, avdec_h264 in -libav), the introspection data that
# PyGObject loads (Gst and its base libraries; GstRtspServer for rtsp:// outputs), and the headers PyGObject and
# pycairo build against when pip compiles them.
APT_PACKAGES=(
    cmake pkg-config gcc python3-dev
    gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
    gstreamer1.0-plugins-ugly gstreamer1.0-libav
    gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0
    libgirepository1.0-dev libcairo2-dev
)

say() { printf '[setup] %s\n' "$*"; }

missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ! "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing system packages: ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        say "NVIDIA GPU found: installing torch==$TORCH_VERSION with CUDA"
        "${pip[@]}" "torch==$TORCH_VERSION"
    else
        # A CPU-only machine: install the CPU build first so nothing later pulls the CUDA wheels.
        # DPA_TORCH_INDEX may name a CPU wheel index (for example PyTorch's own /whl/cpu index).
        say "no NVIDIA GPU: installing the CPU build of torch==$TORCH_VERSION"
        if [ -n "${DPA_TORCH_INDEX:-}" ]; then
            "${pip[@]}" "torch==$TORCH_VERSION" --index-url "$DPA_TORCH_INDEX"
        else
            "${pip[@]}" "torch==$TORCH_VERSION"
        fi
    fi
fi

say "installing dpa-edge (editable) with the training, test, gstreamer (PyGObject) and triton (client) extras"
"${pip[@]}" -e ".[train,test,gstreamer,triton]"

# Triton Inference Server for `dpa serve` (and its tests): PyPI's nvidia-pytriton wheel carries a tritonserver
# with the Python backend; it needs numpy < 2, so it gets an environment of its own, with the torch-free part of
# dpa-edge that the model code imports. DPA_TRITON=0 skips it.
TRITON_VENV=${DPA_TRITON_VENV:-.venv-triton}
if [ "${DPA_TRITON:-1}" != 0 ]; then
    if [ ! -x "$TRITON_VENV/bin/python" ]; then
        say "creating $TRITON_VENV (Triton Inference Server from the nvidia-pytriton wheel)"
        "$PYTHON" -m venv "$TRITON_VENV"
    fi
    if ! "$TRITON_VENV/bin/python" -c "import pytriton, onnxruntime, cv2, dpa.runtime.triton" >/dev/null 2>&1; then
        say "installing nvidia-pytriton, numpy<2, onnxruntime and dpa-edge (no extras) into $TRITON_VENV"
        "$TRITON_VENV/bin/python" -m pip install -q "nvidia-pytriton==0.7.0" "numpy<2" "onnxruntime>=1.18,<1.21" \
            "opencv-python-headless>=4.8,<4.11" "tqdm>=4.60"
        "$TRITON_VENV/bin/python" -m pip install -q --no-deps -e .
    fi
fi
say "ready: $VENV/bin/dpa --help"
