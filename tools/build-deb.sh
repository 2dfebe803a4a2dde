#!/usr/bin/env bash
# Build the .deb: release binaries, their man pages and completions, then
# cargo-deb (metadata: [package.metadata.deb] in the root Cargo.toml). Prints the
# path of the package on its last line. Needs cargo-deb (.ci/deb installs the
# pinned version).
#   tools/build-deb.sh                   # target/debian/idallocd_<version>-1_<arch>.deb
#   tools/build-deb.sh --output OUT.deb  # arguments go to cargo deb
# By default the binaries are stripped (--strip: the release profile has debug
# info, which would make the package 190 MB); `tools/build-deb.sh --dbgsym` keeps
# it in a separate idallocd-dbgsym .ddeb instead.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

# Only the packaged binaries: not powercut-fs (a test tool), not the tests.
cargo build --release --workspace --exclude powercut-fs --bins

# Generated from the binaries just built, so the pages match what is shipped.
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets"/{man8,man5,man1,bash,zsh,fish}
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$target/release/idallocd" man "$tmp"
mv "$tmp"/*.8 "$assets/man8/"
mv "$tmp"/*.5 "$assets/man5/"
"$target/release/idallocctl" man "$assets/man1"
for bin in idallocd idallocctl; do
  "$target/release/$bin" completions bash >"$assets/bash/$bin"
  "$target/release/$bin" completions zsh >"$assets/zsh/_$bin"
  "$target/release/$bin" completions fish >"$assets/fish/$bin.fish"
done

if [ "$#" -eq 0 ]; then
  set -- --strip
fi
cargo deb -p idalloc --no-build "$@"
