"""Convert a sharded DeepSpeed checkpoint into a PEFT adapter (or a merged model); needs no GPU.

    python launch/convert_to_peft.py OUT/checkpoint-1200 OUT/adapter-1200
    python launch/convert_to_peft.py OUT/checkpoint-1200 OUT/merged --merge --base_model /models/Llama-2-7b-hf
    python launch/convert_to_peft.py --help

Same as the `clora-ds-convert` console script (clora_ds/export/convert.py).
"""
import sys

from clora_ds.export.convert import main

if __name__ == "__main__":
    sys.exit(main())
