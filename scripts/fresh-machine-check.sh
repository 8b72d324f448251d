#!/usr/bin/env bash
# Proves the README's two commands on a really fresh machine: a minimal Debian root made with
# debootstrap (nothing in it but Debian's minbase and the CA certificates any HTTPS client needs),
# the host's Rust toolchain bind-mounted read-only (rustup's servers are not reachable here, so a
# toolchain is the one thing brought in), an empty cargo home (crates come from crates.io, as on a
# new machine), an empty d2c cache, and a fresh clone of this repository's HEAD. Inside it runs
#   bash scripts/demo.sh     then     bash scripts/test.sh
# prints each one's wall time, and exits non-zero if either fails.
#
#   sudo scripts/fresh-machine-check.sh [--keep] [--suite bookworm] [--reuse] [--phases demo,test]
#   --keep    leave the root (and its caches) in place afterwards
#   --reuse   start from a root kept by an earlier --keep run (its caches warm, its clone moved
#             to HEAD) instead of a new one: for rerunning a phase, not for first-run times
# Needs root (debootstrap, chroot, mounts) and about 8 GB of disk. Takes about an hour on 2 cores
# (llama.cpp is built twice: the crate's copy and llama-server). Not part of CI (it would not fit
# beside the test run in CI's 90 minutes); run it on every change to what setup installs
# (scripts/setup.sh, the apt list, Cargo.lock, the Python pins). Commit first: it tests HEAD.
#   D2C_FRESH_ROOT   where the root is built (default /var/tmp/d2c-fresh-root; wiped first)
#   DEBIAN_MIRROR    default: the first URI in the host's apt sources, else deb.debian.org
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

KEEP=0
REUSE=0
SUITE=bookworm
PHASES=demo,test
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --reuse) REUSE=1 ;;
    --suite) SUITE="$2"; shift ;;
    --phases) PHASES="$2"; shift ;;
    *) echo "fresh-machine-check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

[ "$(id -u)" -eq 0 ] || { echo "fresh-machine-check: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
. scripts/lib/chroot.sh
RUSTUP_DIR="${RUSTUP_HOME:-$HOME/.rustup}"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
[ -x "$CARGO_BIN/cargo" ] && [ -d "$RUSTUP_DIR/toolchains" ] \
  || { echo "fresh-machine-check: no rustup toolchain on the host ($RUSTUP_DIR, $CARGO_BIN)" >&2; exit 1; }
TOOLCHAIN="$(rustup show active-toolchain | cut -d' ' -f1)"

ROOT="${D2C_FRESH_ROOT:-/var/tmp/d2c-fresh-root}"
cleanup() {
  unmount_all
  [ "$KEEP" -eq 1 ] || rm -rf --one-file-system "$ROOT"
}
trap cleanup EXIT

if [ "$REUSE" -eq 1 ]; then
  [ -d "$ROOT/root/d2c-gguf/.git" ] || { echo "fresh-machine-check: --reuse needs a root kept by --keep at $ROOT" >&2; exit 2; }
else
  debootstrap_root "$SUITE" "$ROOT" || exit 1
fi
mount_root "$ROOT"
# The toolchain, read-only: the root's own cargo home starts empty.
bind "$RUSTUP_DIR" "$ROOT/opt/rustup" ro
bind "$CARGO_BIN" "$ROOT/opt/cargo-bin" ro

# A fresh clone of what is committed, as a new user gets it.
if [ "$REUSE" -eq 1 ]; then
  git -C "$ROOT/root/d2c-gguf" fetch -q "$REPO" HEAD && git -C "$ROOT/root/d2c-gguf" reset -q --hard FETCH_HEAD
else
  git clone -q "$REPO" "$ROOT/root/d2c-gguf"
fi

run_inside() {  # run_inside LABEL COMMAND
  local label="$1" cmd="$2" t rc
  echo "== $label: $cmd" >&2
  t=$SECONDS
  set +e
  chroot "$ROOT" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/root/.cargo/bin:/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUSTUP_HOME=/opt/rustup RUSTUP_TOOLCHAIN="$TOOLCHAIN" CARGO_HOME=/root/.cargo \
    bash -c "cd /root/d2c-gguf && $cmd" >"$ROOT.$label.log" 2>&1
  rc=$?
  set -e
  times+=("$label: $((SECONDS - t)) s, exit $rc")
  echo "   $label exited $rc after $((SECONDS - t)) s (log: $ROOT.$label.log)" >&2
  [ "$rc" -eq 0 ] || tail -40 "$ROOT.$label.log" >&2
  return "$rc"
}
times=()
status=0
case ",$PHASES," in *,demo,*) run_inside demo "bash scripts/demo.sh" || status=1 ;; esac
case ",$PHASES," in *,test,*) run_inside test "bash scripts/test.sh" || status=1 ;; esac
[ "$REUSE" -eq 1 ] && what="a reused root (caches warm)" || what="empty caches"
echo "== fresh Debian $SUITE, toolchain $TOOLCHAIN, $what, HEAD $(git -C "$ROOT/root/d2c-gguf" rev-parse --short HEAD):"
printf '   %s\n' "${times[@]}"
grep -E '^test result:|passed|failed' "$ROOT.test.log" | tail -3 | sed 's/^/   /' || true
exit "$status"
