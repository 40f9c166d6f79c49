"""Issue #10, What to build #4: every architecture of transformers' sequence-classification and causal-LM auto
mappings, built tiny (on the meta device), gets a correct layer map or a clear refusal.

For each: the blocks are found or `layer_map` raises a ValueError that says what to do; the input embeddings are in
role "embeddings"; the output layer is in role "head" and trainable under `WBConfig()` (an output layer tied to the
input embeddings is one tensor with them: role "embeddings", and `freeze` warns that it will not train). Architectures
that cannot be built from a generically shrunk config, or need a package not installed, are skipped with the reason.
`python tests/arch_sweep.py` prints the counts quoted in README.
"""

import pytest
from arch_sweep import CASES, check


@pytest.mark.parametrize(("kind", "model_type"), CASES, ids=[f"{k}-{t}" for k, t in CASES])
def test_architecture_layer_map(kind, model_type):
    outcome = check(kind, model_type)
    if outcome.status == "skipped":
        pytest.skip(outcome.detail)
    assert outcome.status in ("ok", "refused"), outcome.detail
