#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the suite with its smoke/test extras.
#
#   bash scripts/install.sh             torch 2.13.0 as pip resolves it (see below)
#   bash scripts/install.sh --cpu       torch 2.13.0, CPU-only build, from PyTorch's CPU wheel index
#   bash scripts/install.sh --browser   also Chromium and its driver (Debian packages) for the
#                                       test that opens the HTML report in a browser
#
# torch: pip takes torch==2.13.0 from PyPI, where the Linux x86_64 wheel is the CUDA build: it
# brings 19 more CUDA / triton packages (nvidia-*, cuda-*, triton; several GB). --cpu installs the
# CPU-only build from https://download.pytorch.org/whl/cpu first (the documented way to get it);
# the rest of the install then keeps it. A pip configured with a local CPU wheel needs neither.
# Java: E2E's METEOR scorer is a Java program. Where no java is on PATH and apt-get can be used
# (as root), Debian's default-jre-headless is installed; otherwise METEOR cells say n/a (no Java).
set -euo pipefail
cd "$(dirname "$0")/.."
CPU=0
BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    --browser) BROWSER=1 ;;
    *) echo "install.sh: unknown option $arg (known: --cpu, --browser)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
quiet() {  # pip's output less the notes of this machine's pip configuration
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
"${PIP[@]}" install --quiet --upgrade pip >/dev/null 2>&1 || true

# System packages, only where missing and where apt-get can be used (root).
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; }
}
if ! command -v java >/dev/null 2>&1; then
  if can_apt && apt_install default-jre-headless; then
    echo "installed a Java runtime (Debian's default-jre-headless) for E2E's METEOR scorer"
  else
    echo "no Java runtime (install one, e.g. default-jre-headless): E2E's METEOR cells will say n/a (no Java)"
  fi
fi
if [ "$BROWSER" = 1 ] && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  if can_apt && apt_install chromium chromium-driver; then
    echo "installed Chromium and chromedriver (Debian packages) for the report's browser test"
  else
    echo "no Chromium / chromedriver: the report's browser test will be skipped"
  fi
fi

if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  if [ "$CPU" = 1 ]; then
    echo "installing torch 2.13.0, CPU-only build, from PyTorch's CPU wheel index"
    quiet "${PIP[@]}" install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  else
    echo "installing torch 2.13.0 as pip resolves it: on Linux x86_64 from PyPI that is the CUDA build" \
      "with 19 CUDA / triton packages (several GB); 'bash scripts/install.sh --cpu' gets the CPU-only build"
  fi
fi
# An editable install; setuptools' notice about it ("Editable installation. Please be careful with
# folders ... named as your package") is informational and filtered out.
PYTHONWARNINGS="ignore:Editable installation" quiet "${PIP[@]}" install --quiet -e '.[test]'
.venv/bin/python -c '
import torch, lamda_repro, transformers, peft, snakemake
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
print(f"installed lamda-repro with torch {torch.__version__} ({build})")'
