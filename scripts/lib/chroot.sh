# Shared by the scripts that work in a Debian root of their own (fresh-machine-check.sh,
# build-aarch64.sh, check-aarch64.sh): the mirror, debootstrap, and the mounts a root needs to
# build and run things as a machine would. Source it; it needs root.

# The first URI in the host's apt sources (where this network reaches Debian), else deb.debian.org.
debian_mirror() {
  local m="${DEBIAN_MIRROR:-}"
  if [ -z "$m" ]; then
    m="$(grep -rhoE '^(URIs: |deb )[^ ]*https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | grep -v security | head -1 | grep -oE 'https?://[^ ]+' || true)"
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

need_debootstrap() {
  command -v debootstrap >/dev/null && return 0
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
    || { echo "$0: install debootstrap by hand (apt-get install debootstrap)" >&2; exit 1; }
}

# debootstrap_root SUITE ROOT [EXTRA_PACKAGES]: a minbase root with CA certificates.
debootstrap_root() {
  local suite="$1" root="$2" extra="${3:-}" mirror t0
  mirror="$(debian_mirror)"
  need_debootstrap
  rm -rf --one-file-system "$root"
  echo "== debootstrap $suite (minbase) from $mirror into $root" >&2
  t0=$SECONDS
  debootstrap --variant=minbase --include="ca-certificates${extra:+,$extra}" "$suite" "$root" "$mirror" >"$root.debootstrap.log" 2>&1 \
    || { tail -30 "$root.debootstrap.log" >&2; return 1; }
  echo "   $((SECONDS - t0)) s" >&2
}

# Mounts made by mount_root and bind, undone (last first) by unmount_all.
CHROOT_MOUNTS=()
unmount_all() {
  local i
  for ((i = ${#CHROOT_MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${CHROOT_MOUNTS[$i]}" 2>/dev/null || true; done
  CHROOT_MOUNTS=()
}
bind() {  # bind SRC DST [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"; CHROOT_MOUNTS+=("$2")
  [ "${3:-}" != ro ] || mount -o remount,bind,ro "$2"
}

# mount_root ROOT: proc, dev, sys, DNS and this network's CA certificates, as on a machine.
mount_root() {
  local root="$1"
  # The root must be a mount point, as / is on a machine: `unshare -m --propagation private`
  # (the fault tests' private tmpfs) refuses a root that is only a chroot directory.
  mount --bind "$root" "$root"; CHROOT_MOUNTS+=("$root")
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # The network, not the machine: where HTTPS leaves through a proxy with its own CA (as in the
  # workplace this was written in), the root gets the host's extra CA certificates and pip's
  # setting to use the system store. A machine on the open internet needs neither.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
  fi
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
  mount -t proc proc "$root/proc"; CHROOT_MOUNTS+=("$root/proc")
  bind /dev "$root/dev"
  mount -t devpts devpts "$root/dev/pts" 2>/dev/null && CHROOT_MOUNTS+=("$root/dev/pts") || true
  mount -t sysfs sys "$root/sys"; CHROOT_MOUNTS+=("$root/sys")
}
