"""Prints what a test needs to tell an in-process run from a launched one, then exits with a chosen code."""

import os
import sys

print(f"pid={os.getpid()} rank={os.environ.get('RANK')} world={os.environ.get('WORLD_SIZE')} "
      f"cli_loaded={'dtrain.cli' in sys.modules} args={sys.argv[1:]}", flush=True)
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
