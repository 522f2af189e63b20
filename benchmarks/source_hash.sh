#!/usr/bin/env bash
# One hash of everything ditq._C is compiled from (csrc/ and setup.py, by content): prebuild_extension.sh
# records it beside a prebuilt extension, gpu_suite.sh compares it with the tree it runs on. Content, not git
# history: the GPU machine gets a copy of the working tree, and an uncommitted edit must count.
set -eu
cd "$(dirname "$0")/.."
find csrc setup.py -type f \( -name '*.h' -o -name '*.cuh' -o -name '*.cu' -o -name '*.cpp' -o -name '*.py' \) \
  -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
