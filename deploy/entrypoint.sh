#!/bin/sh
# Entry point of the serving image (deploy/Dockerfile): `vsteer serve [MODEL] [options]`, listening
# on 0.0.0.0:8000 unless the container's arguments give --host / --port.
#
# MODEL may stand anywhere among the options (`vsteer serve` finds it as `vllm serve` does); the
# defaults go last so that the container's own --host/--port win.
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
