#!/usr/bin/env bash
# Installs everything hvd_largebatch needs, idempotently, on a fresh machine:
#   1. OpenMPI from Debian (when mpicxx is missing and apt can be used), plus the C++ build tools;
#   2. a virtual environment .venv with the pinned packages of requirements.txt;
#   3. Horovod 0.28.1 built from its PyPI sdist with scripts/horovod-0.28.1.patch
#      (Gloo + MPI, and NCCL when a CUDA toolkit, NCCL and a CUDA torch are present),
#      the wheel cached outside the repo so later runs take seconds;
#   4. hvd_largebatch itself, editable, with its [dev] extras;
#   5. a check that `horovodrun --check-build` lists TensorFlow, PyTorch, Gloo and MPI.
# Environment: PYTHON (interpreter for the venv, default python3.11 or python3),
# HVD_LB_CACHE (wheel cache, default ~/.cache/hvd_largebatch), HVD_LB_BUILD_JOBS (default nproc).
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
HOROVOD_VERSION=0.28.1
PATCH="$ROOT/scripts/horovod-$HOROVOD_VERSION.patch"
CACHE="${HVD_LB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_largebatch}"

step() { printf '==> %s\n' "$*"; }
fail() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

apt_install() {
  command -v apt-get >/dev/null || return 1
  step "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- 1. system packages --------------------------------------------------------------------
missing=()
command -v mpicxx >/dev/null || missing+=(libopenmpi-dev openmpi-bin)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v patch >/dev/null || missing+=(patch)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}" || fail "cannot install ${missing[*]} (need apt-get and root): install them by hand"
else
  step "OpenMPI and C++ tools present ($(mpicxx --showme:version 2>/dev/null | head -1 || echo mpicxx))"
fi

# --- 2. virtual environment ------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  step "creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
  fail "$VENV uses $("$PY" --version); Python 3.11 is required (the torch 2.13.0 CPU wheel is cp311)"

req_stamp="$VENV/.hvd_lb_requirements.sha256"
req_hash="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
  step "installing pinned packages (requirements.txt)"
  "${PIP[@]}" install -r "$ROOT/requirements.txt" 2>&1 | grep -v '^WARNING: Location' || true
  "$PY" -c 'import torch, tensorflow, keras, numpy, mnist1d, matplotlib' 2>/dev/null ||
    fail "pinned packages did not install (see the pip output above)"
  echo "$req_hash" >"$req_stamp"
else
  step "pinned packages already installed"
fi

# --- 3. Horovod ----------------------------------------------------------------------------------
# Versions from package metadata: importing TensorFlow and torch just to read them costs seconds.
versions="$("$PY" - <<'PYEOF'
import sys
from importlib.metadata import version
torch = version("torch").split("+")[0]
print(f"torch{torch}-tf{version('tensorflow-cpu')}-cp{sys.version_info[0]}{sys.version_info[1]}")
PYEOF
)"
cuda_torch=""
"$PY" -c 'from importlib.metadata import version; assert "+cpu" in version("torch")' 2>/dev/null ||
  cuda_torch="$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"
gpu_ops=""
if command -v nvcc >/dev/null && [ -n "$cuda_torch" ] && { [ -n "${NCCL_HOME:-}" ] || ls /usr/include/nccl.h /usr/local/cuda/include/nccl.h >/dev/null 2>&1; }; then
  gpu_ops="NCCL"
fi
flavour="gloo"
command -v mpicxx >/dev/null && flavour="$flavour-mpi"
[ -n "$gpu_ops" ] && flavour="$flavour-nccl"
patch_hash="$(sha256sum "$PATCH" | cut -c1-8)"
key="horovod-$HOROVOD_VERSION-$versions-$flavour-patch$patch_hash"
wheel_dir="$CACHE/wheels/$key"
installed_stamp="$VENV/.hvd_lb_horovod"

if [ "$(cat "$installed_stamp" 2>/dev/null)" = "$key" ] && "$PY" -c 'import importlib.metadata as m; assert m.version("horovod") == "'"$HOROVOD_VERSION"'"' 2>/dev/null; then
  step "Horovod $HOROVOD_VERSION already installed ($key)"
else
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    step "building Horovod $HOROVOD_VERSION ($flavour) from its sdist: a few minutes, once"
    command -v cmake >/dev/null || { step "installing CMake from PyPI"; "${PIP[@]}" install "cmake==3.31.6"; }
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work" 2>&1 |
      grep -v '^WARNING: Location' || true
    tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    patch -d "$src" -p1 --quiet <"$PATCH" || fail "scripts/horovod-$HOROVOD_VERSION.patch does not apply"
    log="$CACHE/build-$key.log"
    mkdir -p "$CACHE" "$work/wheel"
    build_env=(
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1
      CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j${HVD_LB_BUILD_JOBS:-$(nproc)}"
      PATH="$VENV/bin:$PATH"
    )
    case "$flavour" in *mpi*) build_env+=(HOROVOD_WITH_MPI=1) ;; *) build_env+=(HOROVOD_WITHOUT_MPI=1) ;; esac
    [ -n "$gpu_ops" ] && build_env+=(HOROVOD_GPU_OPERATIONS="$gpu_ops")
    step "compiling (log: $log)"
    if ! (cd "$src" && env "${build_env[@]}" "$PY" -m pip wheel --no-build-isolation --no-deps -v . -w "$work/wheel") >"$log" 2>&1; then
      tail -n 60 "$log" >&2
      fail "Horovod build failed; the last lines of $log are above"
    fi
    mkdir -p "$wheel_dir"
    mv "$work/wheel"/horovod-*.whl "$wheel_dir/"
    step "cached $(basename "$wheel_dir"/horovod-*.whl) in $wheel_dir"
  else
    step "using the cached Horovod wheel ($key)"
  fi
  "${PIP[@]}" install --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
  echo "$key" >"$installed_stamp"
fi

# --- 4. the package itself -------------------------------------------------------------------------
pkg_stamp="$VENV/.hvd_lb_package.sha256"
pkg_hash="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$pkg_stamp" 2>/dev/null)" != "$pkg_hash" ] || ! (cd / && "$PY" -c '
import importlib.util as u
assert all(u.find_spec(n) for n in ("hvd_largebatch.tf", "hvd_largebatch.torch_impl"))') 2>/dev/null; then
  step "installing hvd_largebatch (editable)"
  "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT" 2>&1 | grep -v '^WARNING: Location' || true
  echo "$pkg_hash" >"$pkg_stamp"
else
  step "hvd_largebatch already installed (editable)"
fi

# --- 5. check the Horovod build --------------------------------------------------------------------
check="$("$VENV/bin/horovodrun" --check-build 2>&1)" || fail "horovodrun --check-build failed: $check"
for item in TensorFlow PyTorch Gloo MPI; do
  grep -q "\[X\] $item" <<<"$check" || { echo "$check" >&2; fail "horovodrun --check-build does not list $item"; }
done
step "Horovod $HOROVOD_VERSION ready: TensorFlow, PyTorch, Gloo, MPI${gpu_ops:+, $gpu_ops}"
