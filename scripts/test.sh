#!/usr/bin/env bash
# Every check of the project, as CI runs it: formatting, lints, the whole test suite,
# and the docs. Run from anywhere: `bash scripts/test.sh`.
#
# It installs what it needs on a fresh machine (rustfmt and clippy through rustup when
# missing). Tests that need a service start it themselves through this script.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if command -v rustup >/dev/null; then
    for component in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$component" \
            || rustup component add "$component"
    done
fi

step "one rustls crypto provider: aws-lc-rs, never ring"
# With both providers linked, rustls cannot pick one and panics at run time.
ring_users=$(cargo tree --workspace --locked -e normal -i ring 2>/dev/null || true)
if [ -n "$ring_users" ]; then
    echo "ring is linked; use the aws-lc-rs features instead:"
    echo "$ring_users"
    exit 1
fi

step "FoundationDB backend compiles (feature fdb)"
# The FoundationDB client library (libfdb_c) is not on CI machines, so nothing built with
# the feature can link or run here; its headers come with the bindings, and bindgen needs
# libclang. The feature only changes caretwin-cluster, so this re-checks that crate alone.
if ! dpkg -s libclang-dev >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libclang-dev
fi
fdb_ring=$(cargo tree -p caretwin-cluster --features fdb --locked -e normal -i ring 2>/dev/null || true)
if [ -n "$fdb_ring" ]; then
    echo "ring is linked with feature fdb:"
    echo "$fdb_ring"
    exit 1
fi
cargo check -p caretwin-cluster --features fdb --all-targets --locked
cargo clippy -p caretwin-cluster --features fdb --all-targets --locked -- -D warnings

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (all targets, warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the binaries (end-to-end tests start them)"
cargo build --workspace --bins --locked

step "a throwaway PostgreSQL server for the PostgreSQL backend's tests"
# A real server in a temporary directory (installed from Debian's packages if missing),
# stopped and removed when this script ends, however it ends.
pg_settings=$(bash scripts/postgres.sh start)
set -a # export CARETWIN_TEST_PG_URL and CARETWIN_TEST_PG_DIR
eval "$pg_settings"
set +a
trap 'bash scripts/postgres.sh remove "$CARETWIN_TEST_PG_DIR"' EXIT
echo "$CARETWIN_TEST_PG_URL"

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
    cargo test --workspace --locked --doc
else
    cargo test --workspace --locked --no-fail-fast
fi

if [ -n "${FDB_CLUSTER_FILE:-}" ]; then
    step "FoundationDB conformance (FDB_CLUSTER_FILE=$FDB_CLUSTER_FILE)"
    # Ignored (reported as skipped) unless asked for. nextest runs each test in its own
    # process, which the client needs: its network thread starts once per process.
    cargo nextest --version >/dev/null 2>&1 \
        || { echo "the FoundationDB tests need cargo-nextest (one process per test)"; exit 1; }
    cargo nextest run -p caretwin-cluster --features fdb --locked --no-fail-fast \
        --run-ignored all 'store::fdb::'
fi

step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "all checks passed"
