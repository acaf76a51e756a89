#!/bin/sh
# Start genrnn the way the container does, with settings from the environment.
#
#   entrypoint.sh [serve] [--option value ...]   serve GENRNN_MODEL over HTTP
#   entrypoint.sh COMMAND [ARG ...]              run anything else as it is (genrnn generate ..., bash)
#
# Each GENRNN_* variable below becomes the `genrnn serve` option of the same name
# (GENRNN_MAX_BATCH_SIZE=32 -> --max-batch-size 32); options given as arguments come
# after them and win. The script `exec`s the server so that it receives `docker stop`'s
# SIGTERM itself and drains the requests in flight before it exits.
#
# `make serve` runs this same script on the host, so the container's start is the one
# that the quickstart and the tests exercise.
set -eu

# The variables that mirror `genrnn serve`'s options, one to one (tests/test_docker.py
# checks these lists against `genrnn serve --help`). Unset ones keep the server's defaults.
SERVE_OPTIONS="MODEL ENSEMBLE_AVERAGING HOST PORT ACCELERATOR DEVICES WORKERS_PER_DEVICE API_SERVERS MAX_BATCH_SIZE BATCH_TIMEOUT
    MAX_QUEUE TIMEOUT DEADLINE EXIT_WHEN_STUCK MAX_BODY_BYTES API_KEY_ENV MAX_INPUTS MAX_INPUT_LENGTH MAX_NEW_TOKENS MAX_BEAM_SIZE
    MAX_RETURN_SEQUENCES LOG_LEVEL"
# Options without a value: on when the variable is 1, true or yes (GENRNN_ACCESS_LOG=1).
SERVE_SWITCHES="ACCESS_LOG"

case "${1:-serve}" in
    serve) if [ "$#" -gt 0 ]; then shift; fi ;;
    -*) ;;  # options only: they are for `genrnn serve`
    *) exec "$@" ;;
esac

# Put the options from the environment before the arguments given, so the arguments win
# (argparse keeps the last value). `set --` keeps every value one word, spaces and all.
given_model=no
for argument in "$@"; do
    case "$argument" in
        -h | --help) exec genrnn serve --help ;;  # needs no bundle
        --model | --model=*) given_model=yes ;;
        # The image's health check and the announcement below read the variables: an argument
        # would move the server away from them (the container then reported unhealthy).
        --port | --port=* | --host | --host=*)
            name=$(echo "${argument%%=*}" | sed 's/^--//' | tr 'a-z' 'A-Z')
            echo "genrnn: set GENRNN_$name instead of $argument: the health check and this script read it" >&2
            exit 2
            ;;
    esac
done
option() { echo "--$1" | tr 'A-Z_' 'a-z-'; }
for name in $SERVE_OPTIONS; do
    value=$(printenv "GENRNN_$name" || true)
    if [ -n "$value" ]; then
        set -- "$(option "$name")" "$value" "$@"
    fi
done
for name in $SERVE_SWITCHES; do
    case "$(printenv "GENRNN_$name" || true)" in
        1 | true | yes) set -- "$(option "$name")" "$@" ;;
    esac
done

# A missing bundle is the usual first mistake in a container: say where one should be.
# Several bundles joined by commas are an ensemble: each must be there. A directory whose own
# name holds a comma is the one bundle it is, as genrnn reads it.
missing=""
if [ "$given_model" = no ]; then
    set -f  # a bundle's name is not a pattern
    old_ifs=$IFS
    IFS=,
    if [ -d "${GENRNN_MODEL:-}" ]; then
        IFS=""  # not split
    fi
    for member in ${GENRNN_MODEL:-}; do
        member=$(echo "$member" | sed 's/^ *//; s/ *$//')  # genrnn allows spaces after the commas
        if [ ! -f "$member/genrnn.json" ]; then
            missing="$member"
            break
        fi
    done
    IFS=$old_ifs
    set +f
fi
if [ -n "$missing" ]; then
    model="$missing"
    echo "genrnn: no bundle at $model (genrnn.json missing)." >&2
    echo "  Mount one there (docker run --mount type=bind,source=\$PWD/runs/g2p-en-small/bundle,target=$model,readonly ...)," >&2
    echo "  bake one in (docker build --build-arg BUNDLE=runs/g2p-en-small/bundle ...), or point GENRNN_MODEL at one;" >&2
    echo "  'make bundle' or 'genrnn train' writes one." >&2
    exit 1
fi

# Once /health answers, print where the service is and a request that works. The
# watcher is detached (double fork) so that it is not left as a child of the server,
# and it gives up as soon as the server process is gone.
port="${GENRNN_PORT:-8000}"
case "${GENRNN_HOST:-127.0.0.1}" in
    0.0.0.0 | :: | "") shown_host=localhost ;;
    *) shown_host="${GENRNN_HOST:-127.0.0.1}" ;;
esac
url="http://$shown_host:$port"
# Where clients reach it: compose may publish the container's port as another of the host's.
public="http://$shown_host:${GENRNN_PUBLISHED_PORT:-$port}"
server_pid=$$
auth=""
if [ -n "${GENRNN_API_KEY_ENV:-}" ]; then
    auth=" -H \"Authorization: Bearer \$$GENRNN_API_KEY_ENV\""
fi
announce() {
    while kill -0 "$server_pid" 2>/dev/null; do
        if python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "$url/health" >/dev/null 2>&1; then
            cat <<EOF

genrnn is ready at $public
  try:     curl -s $public/v1/generate -H 'Content-Type: application/json'$auth -d '{"inputs": ["cat", "dog"], "mode": "beam"}'
  metrics: $public/metrics    model: $public/info
EOF
            return 0
        fi
        sleep 1
    done
}
(announce &)

exec genrnn serve "$@"
