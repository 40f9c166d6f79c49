#!/usr/bin/env python
"""Fine-tune and evaluate on a GLUE task with the hf_wb recipe.

    python scripts/run_glue.py configs/glue/mrpc.yaml [--key value ...]
    accelerate launch scripts/run_glue.py configs/glue/mrpc.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/run_glue.py configs/glue/mrpc.yaml
    torchrun --standalone --nproc_per_node 2 scripts/run_glue.py configs/glue/mrpc.yaml

The same as ``hf-wb glue ...``; the logic is in :mod:`hf_wb.glue.run` (``--help`` lists every argument).
"""

import sys
from pathlib import Path

try:
    from hf_wb.glue.run import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_wb.glue.run import main

if __name__ == "__main__":
    sys.exit(main())
