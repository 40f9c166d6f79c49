"""Run by tests/test_faults_inputs.py: two of these build the same on-disk prefix cache at the same moment.

Usage: cache_build.py CACHE_DIR SYNC_DIR INDEX. Each process writes SYNC_DIR/ready-INDEX, waits until both are
there, then builds; the build is slowed down (2 s) so that the two would overlap without the file lock.
"""

import json
import sys
import time
from pathlib import Path

from conftest import tiny_model
from test_prefix_cache import Pad, varlen_dataset

from hf_wb import WBConfig, freeze, layer_map
from hf_wb.prefix_cache import PrefixCache

cache_dir, sync, index = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
model = tiny_model("bert", 4)
freeze(model, WBConfig(top_layers=2))
cache = PrefixCache(model, layer_map(model), "float32", cache_dir)
compute = PrefixCache._compute


def slow_compute(self, *args, **kwargs):
    compute(self, *args, **kwargs)
    time.sleep(2.0)


PrefixCache._compute = slow_compute
(sync / f"ready-{index}").write_text("")
while len(list(sync.glob("ready-*"))) < 2:
    time.sleep(0.05)
cache.build([varlen_dataset(24)], Pad(), progress=False)
first = cache.storage[:4].clone()
(sync / f"result-{index}.json").write_text(
    json.dumps({"stats": cache.stats, "key": cache.key, "first": first.flatten().tolist()})
)
