#!/bin/sh
# Regenerates edge/comms/sparkplug_b_pb2.py from edge/comms/sparkplug_b.proto.
# Needs protoc (Debian: apt install protobuf-compiler). The generated module is
# committed, so neither a device nor CI needs protoc to run edgecam.
set -eu
cd "$(dirname "$0")/.."
protoc --proto_path=. --python_out=. edge/comms/sparkplug_b.proto
