"""`python -m examples.images [ARGS]` is `rulework run examples.images.workflow:ingest [ARGS]`."""

import sys

from rulework.cli import main

raise SystemExit(main(["run", "examples.images.workflow:ingest", *sys.argv[1:]]))
