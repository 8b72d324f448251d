# Sourced by the check and benchmark scripts: runs scripts/setup.sh (which installs whatever is
# missing and fails loudly if it cannot) and exports the D2C_* asset paths it prints.
d2c_setup_env() {
  local out
  out="$(mktemp)"
  bash "$(dirname "${BASH_SOURCE[0]}")/setup.sh" > "$out" || { rm -f "$out"; return 1; }
  eval "$(grep '^D2C_' "$out" | sed 's/^/export /')"
  rm -f "$out"
}
