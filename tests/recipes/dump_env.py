"""Writes this worker's DTRAIN_* environment to $DTRAIN_RUN_DIR/env-rank<RANK>.json (no torch: quick)."""

import json
import os
from pathlib import Path

run_dir = Path(os.environ["DTRAIN_RUN_DIR"])
run_dir.mkdir(parents=True, exist_ok=True)
contract = {key: value for key, value in os.environ.items() if key.startswith("DTRAIN_")}
(run_dir / f"env-rank{os.environ['RANK']}.json").write_text(json.dumps(contract, indent=1, sort_keys=True))
