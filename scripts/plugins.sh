#!/usr/bin/env bash
# Builds every WebAssembly plugin from source with Debian's toolchains (docs/plugins.md):
#   plugins/<dir>/plugin.c | lib.rs + plugin.json      the examples
#   tests/plugins/<stem>.c + <stem>.json                the hostile test plugins
# into var/plugin-builds/<name>.wasm and <name>.json (a copy of the spec). A plugin whose source, spec,
# SDK header and compiler are unchanged since its last build is skipped (a SHA-256 stamp beside it),
# so a second run builds nothing. Prints one line per plugin it builds.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[plugins]\033[0m %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Always these two by path or versioned name: a rustup rustc earlier on PATH has no wasm32-wasi
# standard library, and an unversioned clang may be another LLVM without the wasm32 runtime.
CLANG=clang-14
RUSTC=/usr/bin/rustc
PACKAGES=(clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 rustc libstd-rust-dev-wasm32)
OUT=var/plugin-builds
SDK=plugins/sdk/edgefleet_plugin.h
C_FLAGS=(--target=wasm32-wasi -O2 -mexec-model=reactor -Wall -Wextra -Werror -Iplugins/sdk -Wl,--strip-all)
RUST_FLAGS=(--edition 2021 --target wasm32-wasi --crate-type cdylib -C opt-level=s -C lto -C strip=symbols)

missing_packages() {
  local package
  for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
      echo "$package"
    fi
  done
}

if command -v dpkg-query >/dev/null; then
  missing=$(missing_packages)
  if [ -n "$missing" ]; then
    say "installing Debian's wasm32-wasi toolchains:" $missing
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  fi
fi
command -v "$CLANG" >/dev/null && [ -x "$RUSTC" ] || { say "needs $CLANG and $RUSTC (Debian: ${PACKAGES[*]})"; exit 1; }

# name <TAB> spec <TAB> source, one line per plugin; the specs are checked here (exactly the keys an
# author chooses, unique names) so that a bad one stops the build with its file named.
plugins=$(python3 - plugins/*/plugin.json tests/plugins/*.json <<'EOF'
import json, sys
from pathlib import Path
KEYS = {"name", "description", "limits", "grants", "config"}
seen = {}
for spec in map(Path, sys.argv[1:]):
    try:
        data = json.loads(spec.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"{spec}: not a JSON spec: {exc}")
    if not isinstance(data, dict) or set(data) != KEYS:
        sys.exit(f"{spec}: a plugin spec has exactly the keys {sorted(KEYS)}")
    name = data["name"]
    if name in seen:
        sys.exit(f"{spec}: plugin name {name!r} is also {seen[name]}'s")
    seen[name] = spec
    if spec.name == "plugin.json":
        sources = [s for s in (spec.parent / "plugin.c", spec.parent / "lib.rs") if s.exists()]
    else:
        sources = [s for s in [spec.with_suffix(".c")] if s.exists()]
    if len(sources) != 1:
        sys.exit(f"{spec}: needs exactly one source beside it (plugin.c or lib.rs; <stem>.c for a test plugin)")
    print(f"{name}\t{spec}\t{sources[0]}")
EOF
)

mkdir -p "$OUT"
clang_version=$("$CLANG" --version | head -1)
rustc_version=$("$RUSTC" --version)
built=0 total=0
while IFS=$'\t' read -r name spec source; do
  total=$((total + 1))
  case "$source" in
    *.rs) compiler=("$RUSTC" "${RUST_FLAGS[@]}"); version=$rustc_version; inputs=("$source" "$spec") ;;
    *) compiler=("$CLANG" "${C_FLAGS[@]}"); version=$clang_version; inputs=("$source" "$spec" "$SDK") ;;
  esac
  stamp=$( { echo "$version ${compiler[*]}"; cat "${inputs[@]}"; } | sha256sum | cut -d' ' -f1)
  if [ -f "$OUT/$name.wasm" ] && [ -f "$OUT/$name.json" ] && [ "$(cat "$OUT/$name.stamp" 2>/dev/null)" = "$stamp" ]; then
    continue
  fi
  # Written beside and renamed, so a reader never sees half a module.
  "${compiler[@]}" -o "$OUT/.$name.wasm.tmp" "$source"
  cp "$spec" "$OUT/.$name.json.tmp"
  mv "$OUT/.$name.wasm.tmp" "$OUT/$name.wasm"
  mv "$OUT/.$name.json.tmp" "$OUT/$name.json"
  echo "$stamp" >"$OUT/$name.stamp"
  say "built $OUT/$name.wasm ($(stat -c %s "$OUT/$name.wasm") bytes, $source)"
  built=$((built + 1))
done <<<"$plugins"
[ "$built" -gt 0 ] || say "$total plugins up to date in $OUT"
