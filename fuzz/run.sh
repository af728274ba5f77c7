#!/usr/bin/env bash
# Fuzzes echod's config parser for a bounded time, for CI and by hand:
#
#   fuzz/run.sh [SECONDS [TARGET...]]    (default: 60 seconds per target,
#                                         targets config and config_roundtrip)
#
#   config            arbitrary bytes (lossy UTF-8) to Config::parse: no
#                     panic, one-line errors, parse(to_toml(c)) == c
#   config_roundtrip  arbitrary valid Configs: parse(to_toml(c)) == c
#
# Installs cargo-fuzz and the nightly toolchain if they are missing. Exits
# non-zero when libFuzzer finds a crash; the input is then saved under
# fuzz/artifacts/TARGET/ and can be replayed with
#   cargo +nightly fuzz run --fuzz-dir fuzz TARGET fuzz/artifacts/TARGET/crash-...
# The corpora grow in fuzz/corpus/TARGET (git-ignored); fuzz/seeds/config
# (valid configs that set every key, in every form) and etc/echod.toml seed
# the `config` one. Keep fuzz/corpus between CI runs (cache it) to fuzz
# deeper.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
case "$secs" in
    ''|*[!0-9]*) echo "usage: fuzz/run.sh [SECONDS [TARGET...]]" >&2; exit 64 ;;
esac
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(config config_roundtrip)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    # cargo-fuzz needs nightly (sanitizer flags). Where no nightly can be
    # installed, say so and skip rather than fail the whole CI run.
    if ! rustup toolchain install nightly --profile minimal; then
        echo "SKIP: fuzz: no nightly toolchain on this machine and none can be installed"
        exit 0
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus"
    seeds=()
    if [ "$target" = config ]; then
        cp -n etc/echod.toml "$corpus/sample.toml" 2>/dev/null || true
        seeds=(fuzz/seeds/config)
    fi
    echo "== fuzz $target for $secs s"
    cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$secs" \
        -max_len=4096 \
        -timeout=10 \
        -rss_limit_mb=2048 \
        -dict=fuzz/config.dict \
        -use_value_profile=1 \
        -print_final_stats=1
done
