"""The recipe given as the first argument, run as itself, but with the exit that `setup()` makes quick undone:
what every rank's exit cost before (bench/startup.py's third pair)."""

import atexit
import gc
import runpy
import sys

recipe = sys.argv.pop(1)
sys.argv[0] = recipe
runpy.run_path(recipe, run_name="__main__")
atexit.unregister(gc.freeze)
