"""Write the held-out (validation) documents of the embedded corpus, exactly as the recipes split
them (val_fraction 0.05, seed 0: held out by document hash), to a JSONL file: text no training run has seen."""
import json
import sys

from byteify.data.streams import decide_holdout, held_out_documents
from byteify.train.recipe import load_recipe

recipe, _ = load_recipe("smollm2-135m")
sources = recipe.data.sources
val = list(held_out_documents(sources, decide_holdout(sources, recipe.data.val_fraction, recipe.seed)))
with open(sys.argv[1], "w") as f:
    for doc in val:
        f.write(json.dumps({"text": doc.decode("utf-8", errors="replace")}) + "\n")
print(f"{len(val)} held-out documents, {sum(map(len, val)):,} bytes -> {sys.argv[1]}")
