#!/usr/bin/env bash
# Runs every cargo-fuzz target of this repository for a bounded time; a crash (a divergence
# from the model, a broken invariant, a decoder panic) fails the script.
#
#   fuzz/run.sh            # each target 60 s
#   fuzz/run.sh 300        # each target 300 s
#   fuzz/run.sh 60 ops     # only `ops`
#
# Installs cargo-fuzz if missing. Uses `--sanitizer none` (works on stable; the default
# address sanitizer needs nightly). Crashing inputs land in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
    TARGETS=(ops decode)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

for target in "${TARGETS[@]}"; do
    echo "== cargo fuzz run $target (${SECONDS_PER_TARGET}s)"
    # Work on a scratch copy of the checked-in corpus so new inputs do not pile up in git.
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    cp -r "corpus/$target/." "$scratch/"
    extra=()
    if [ "$target" = ops ]; then
        # Each execution opens a database (the fixed cost dominates), so long inputs from the
        # start: libFuzzer's default length control would spend minutes on 1-2 step inputs.
        extra=(-max_len=4096 -len_control=0)
    fi
    cargo fuzz run --sanitizer none "$target" "$scratch" -- \
        -max_total_time="$SECONDS_PER_TARGET" \
        "${extra[@]}" \
        -rss_limit_mb=2048 \
        -malloc_limit_mb=512 \
        -print_final_stats=1
    rm -rf "$scratch"
    trap - EXIT
done
echo "== fuzzing: no crashes"
