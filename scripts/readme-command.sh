#!/usr/bin/env bash
# Print command N of the first ```sh block of README.md, without its
# comment: 1 is the main job, 2 the test command (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
awk '/^```sh/{f=1;next} f&&/^```/{exit} f{print}' README.md | sed -n "${1:?which line}p" | sed 's/ *#.*//'
