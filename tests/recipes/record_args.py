"""Writes the recipe arguments it received, as JSON, to $DTRAIN_RUN_DIR/args.json (one rank of one)."""

import json
import os
import sys
from pathlib import Path

run_dir = Path(os.environ["DTRAIN_RUN_DIR"])
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "args.json").write_text(json.dumps(sys.argv[1:]))
