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

step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "all checks passed"
