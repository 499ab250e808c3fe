#!/usr/bin/env bash
# Set up .venv with everything the project needs, Horovod 0.28.1 included.
#
# Horovod is built from source with Gloo (CPU). Its 0.28.1 sdist does not build
# against TensorFlow >= 2.16 as published: build isolation hides TensorFlow from
# its CMake, and one source file (xla_mpi_ops.cc, used only for GPU XLA
# custom calls) includes XLA headers at paths TF 2.21 no longer ships. We build
# without isolation and drop that file. The wheel is cached, keyed by the
# Horovod, TensorFlow and Python versions and the machine, so later set-ups
# install it in seconds.
#
# Safe to rerun: when setup.cfg, pyproject.toml and this script are unchanged
# since the last successful run, it returns at once.
#
# Environment:
#   PYTHON               interpreter for the venv        (default: python3.11)
#   VENV                 where the venv goes             (default: .venv)
#   HOROVOD_WHEEL_CACHE  where built wheels are kept     (default: ~/.cache/keras-horovod-lm/wheels)
#   SKIP_HOROVOD=1       set up without Horovod (everything runs as one process)
#   EXTRAS               setup.cfg extras to install     (default: dev,horovod; the tests
#                        add bench, the PyTorch reference of the benchmarks)
#   HOROVOD_GPU_OPERATIONS=NCCL etc. are passed to Horovod's build unchanged.
set -euo pipefail

cd "$(dirname "$0")/.."
HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
CACHE=${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keras-horovod-lm/wheels}
SKIP_HOROVOD=${SKIP_HOROVOD:-0}
EXTRAS=${EXTRAS:-dev,horovod}

log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  log "error: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11"
  exit 2
fi

stamp_now=$( (cat setup.cfg pyproject.toml "$0"; echo "skip_horovod=$SKIP_HOROVOD") | sha256sum | cut -c1-16)
stamp_file="$VENV/.setup-stamp"
# The stamp holds the hash and the extras installed with it: a set-up asking for
# fewer extras than are installed has nothing to do.
installed_extras=""
if [ -f "$stamp_file" ] && [ "$(head -n1 "$stamp_file")" = "$stamp_now" ]; then
  installed_extras=$(sed -n 2p "$stamp_file")
  missing=0
  for extra in ${EXTRAS//,/ }; do
    case ",$installed_extras," in *",$extra,"*) ;; *) missing=1 ;; esac
  done
  if [ "$missing" = 0 ]; then
    log "up to date ($VENV)"
    exit 0
  fi
fi
all_extras=$(printf '%s\n' ${EXTRAS//,/ } ${installed_extras//,/ } | sort -u | paste -sd, -)

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

log "installing the project and its dependencies (TensorFlow, keras-hub, ...)"
"${PIP[@]}" install -q --upgrade pip setuptools wheel
"${PIP[@]}" install -q ".[$all_extras]"  # dependencies (the code runs from the checkout)

if [ "$SKIP_HOROVOD" = 1 ]; then
  log "SKIP_HOROVOD=1: Horovod not installed; main.py runs as one process"
  "${PIP[@]}" uninstall -q -y horovod 2>/dev/null || true
else
  tf_version=$("$PY" -c "from importlib.metadata import version; print(version('tensorflow'))")
  py_tag=$("$PY" -c "import sys; print(f'cp{sys.version_info.major}{sys.version_info.minor}')")
  key="horovod-$HOROVOD_VERSION-tf$tf_version-$py_tag-$(uname -m)"
  wheel_dir="$CACHE/$key"
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "building Horovod $HOROVOD_VERSION against TensorFlow $tf_version (Gloo, CPU; about 7 minutes on 2 cores)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "${PIP[@]}" download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    # The one source file that includes pre-2.16 XLA header paths (GPU-only XLA ops).
    sed -i '/xla_mpi_ops.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=${HOROVOD_WITHOUT_MPI:-1} \
      MAKEFLAGS="-j$(nproc)" \
      "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$work/wheels" "$src" >"$work/build.log" 2>&1 \
      || { tail -n 40 "$work/build.log" >&2; log "error: the Horovod build failed (log above)"; exit 1; }
    mkdir -p "$CACHE"
    # Move into place atomically so a concurrent or interrupted set-up never sees half a wheel.
    mkdir -p "$work/staged/$key" && cp "$work"/wheels/horovod-*.whl "$work/staged/$key/"
    mv -T "$work/staged/$key" "$wheel_dir" 2>/dev/null || true
    log "cached $(ls "$wheel_dir")"
  else
    log "using cached $(basename "$(ls "$wheel_dir"/horovod-*.whl)")"
  fi
  "${PIP[@]}" install -q --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
  # Loading the TensorFlow op library proves the build has TensorFlow support. (Piping
  # `horovodrun --check-build` into `grep -q` raced under pipefail: grep exits at the first
  # match and horovodrun dies of the closed pipe.)
  "$PY" -c "import horovod.tensorflow.mpi_ops" >/dev/null 2>&1 \
    || { log "error: Horovod was installed without TensorFlow support"; exit 1; }
fi

printf '%s\n%s\n' "$stamp_now" "$all_extras" >"$stamp_file"
log "done in $(($(date +%s) - start)) s; activate with: . $VENV/bin/activate"
