"""The fresh process `dtrain export` starts to load each artifact back as a user would, nothing of the exporting
process's state at hand, and run it: `python -m dtrain.export.check JOB.json`. Its outputs go back through a file
(read with `weights_only=True`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dtrain.core.exports import FORMATS
from dtrain.export.artifacts import accuracy, load
from dtrain.export.recipe import Recipe


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    recipe = Recipe.load(Path(job["recipe"]), job["recipe_args"])
    batches = torch.load(job["batches"], weights_only=True)
    evaluation = recipe.evaluation() if job["eval"] else None
    outputs, accuracies = {}, {}
    with torch.no_grad():
        for name in job["formats"]:
            run = load(FORMATS[name], Path(job["folder"]), recipe)
            outputs[name] = [run(batch) for batch in batches]
            if evaluation is not None and FORMATS[name].traced:
                accuracies[name] = accuracy(run, *evaluation, job["eval_batch"], job["fixed_batch"])
    torch.save({"outputs": outputs, "accuracy": accuracies}, job["results"])


if __name__ == "__main__":
    main(sys.argv[1])
