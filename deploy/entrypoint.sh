#!/bin/sh
# Entry point of the serving image (deploy/Dockerfile): `vsteer serve [MODEL] [options]`, listening
# on 0.0.0.0:8000 unless the container's arguments give --host / --port.
#
# `vsteer serve` takes MODEL only as the first argument it passes on to vLLM (vsteer's own options,
# such as --max-slots or --tenants, may come anywhere): an ENTRYPOINT of
# `vsteer serve --host 0.0.0.0 --port 8000` put MODEL after --host/--port, and the default model
# (SmolLM2) was served instead. So the defaults are appended after the container's arguments.
set -eu

host=yes
port=yes
for arg in "$@"; do
    case $arg in
        --host | --host=*) host= ;;
        --port | --port=*) port= ;;
    esac
done
if [ -n "$host" ]; then
    set -- "$@" --host "${VSTEER_HOST:-0.0.0.0}"
fi
if [ -n "$port" ]; then
    set -- "$@" --port "${VSTEER_PORT:-8000}"
fi
exec vsteer serve "$@"
