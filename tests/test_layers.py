import pytest
import torch
import transformers
from conftest import ARCHS, ENCODER_DECODER, stack_sizes, tiny_model
from torch import nn

from hf_wb.layers import BLOCK, EMBEDDINGS, HEAD, layer_map


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_mapped_once(arch):
    model = tiny_model(arch)
    lmap = layer_map(model)
    assert list(lmap.params) == [n for n, _ in model.named_parameters()]  # tied weights once
    assert sum(p.numel for p in lmap) == sum(p.numel() for p in model.parameters())
    assert [s.num_blocks for s in lmap.stacks.values()] == stack_sizes(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_depths_follow_module_list(arch):
    model = tiny_model(arch)
    lmap = layer_map(model)
    for stack in lmap.stacks.values():
        for depth, block_name in enumerate(stack.block_names):
            for name, _ in model.get_submodule(block_name).named_parameters():
                info = lmap.params[f"{block_name}.{name}"]
                assert (info.stack, info.role, info.depth) == (stack.label, BLOCK, depth)


EXPECTED_ROLES = {
    "bert": {
        "bert.embeddings.word_embeddings.weight": EMBEDDINGS,
        "bert.pooler.dense.weight": HEAD,
        "classifier.bias": HEAD,
    },
    "roberta": {"roberta.embeddings.position_embeddings.weight": EMBEDDINGS, "classifier.out_proj.weight": HEAD},
    "distilbert": {"distilbert.embeddings.LayerNorm.weight": EMBEDDINGS, "pre_classifier.weight": HEAD},
    "deberta-v2": {"deberta.encoder.rel_embeddings.weight": EMBEDDINGS, "classifier.weight": HEAD},
    "electra": {"electra.embeddings_project.weight": EMBEDDINGS, "classifier.dense.weight": HEAD},
    "gpt2": {
        "transformer.wte.weight": EMBEDDINGS,
        "transformer.wpe.weight": EMBEDDINGS,
        "transformer.ln_f.weight": HEAD,
        "score.weight": HEAD,
    },
    "llama": {"model.embed_tokens.weight": EMBEDDINGS, "model.norm.weight": HEAD, "score.weight": HEAD},
    "t5": {
        "shared.weight": EMBEDDINGS,
        "encoder.final_layer_norm.weight": HEAD,
        "decoder.final_layer_norm.weight": HEAD,
    },
    "bart": {
        "model.shared.weight": EMBEDDINGS,
        "model.encoder.layernorm_embedding.weight": EMBEDDINGS,
        "model.decoder.embed_positions.weight": EMBEDDINGS,
        "classification_head.out_proj.weight": HEAD,
    },
}


@pytest.mark.parametrize("arch", ARCHS)
def test_roles(arch):
    lmap = layer_map(tiny_model(arch))
    for name, role in EXPECTED_ROLES[arch].items():
        assert lmap.params[name].role == role, name
        assert lmap.params[name].depth is None


@pytest.mark.parametrize("arch", sorted(ENCODER_DECODER))
def test_encoder_decoder_stacks(arch):
    lmap = layer_map(tiny_model(arch))
    assert list(lmap.stacks) == ["encoder", "decoder"]
    assert lmap.unit("encoder.final_layer_norm.weight" if arch == "t5" else "model.encoder.layers.0.fc1.weight") in (
        "encoder/head",
        "encoder/block_00",
    )
    dec = [n for n, i in lmap.params.items() if i.stack == "decoder" and i.role == HEAD]
    assert dec, "the decoder stack has a head (final norm / classification head)"
    assert lmap.units()[0] == "encoder/embeddings"


def test_units_in_forward_order():
    lmap = layer_map(tiny_model("bert", 3))
    assert lmap.units() == ["embeddings", "block_00", "block_01", "block_02", "head"]


def test_layers_pattern_overrides_discovery():
    model = tiny_model("bert")
    assert layer_map(model, layers_pattern="layer").stacks[""].module_name == "bert.encoder.layer"
    assert layer_map(model, layers_pattern=r"bert\.encoder\.layer").stacks[""].num_blocks == 4
    with pytest.raises(ValueError, match="`layers_pattern`='nope' matches no nn.ModuleList"):
        layer_map(model, layers_pattern="nope")


def test_no_block_stack_error_says_layers_pattern():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Pass `layers_pattern`"):
        layer_map(model)


def test_custom_model_with_module_list():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.out = nn.Linear(8, 2)

    lmap = layer_map(Net())
    assert lmap.units() == ["embeddings", "block_00", "block_01", "block_02", "head"]


def test_albert_shared_weights_refused():
    config = transformers.AlbertConfig(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = transformers.AlbertForSequenceClassification(config)
    with pytest.raises(ValueError, match="shares one block's weights"):
        layer_map(model)


def test_same_module_repeated_in_list_refused():
    block = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([block, block])
            self.head = nn.Linear(4, 2)

    # nn.ModuleList dedups nothing: the same weights serve two depths
    with pytest.raises(ValueError, match="share weights"):
        layer_map(Net(), layers_pattern="layers")


def test_wrapped_model_is_unwrapped():
    model = tiny_model("bert")
    compiled = torch.compile(model, backend="eager")
    assert layer_map(compiled).params.keys() == layer_map(model).params.keys()


def _xlm_roberta():
    config = transformers.XLMRobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return transformers.XLMRobertaForSequenceClassification(config)


def test_head_registered_before_base_model_is_head():
    """XLM-RoBERTa registers `classifier` before `roberta`: the head is what lies outside the base model, wherever it
    is registered, so it trains under the default recipe (failure 4 of issue #10: it was mapped as embeddings)."""
    from hf_wb import WBConfig, freeze

    model = _xlm_roberta()
    assert [n for n, _ in model.named_children()][0] == "classifier"
    lmap = layer_map(model)
    for name in ("classifier.dense.weight", "classifier.out_proj.weight", "classifier.out_proj.bias"):
        assert lmap.params[name].role == HEAD, name
    assert lmap.params["roberta.embeddings.word_embeddings.weight"].role == EMBEDDINGS
    assert lmap.units() == ["embeddings", "block_00", "block_01", "block_02", "block_03", "head"]
    freeze(model, WBConfig())
    model.train()
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert model.classifier.training
    assert not model.roberta.embeddings.word_embeddings.weight.requires_grad


def test_head_first_custom_model_with_base_model_prefix():
    """Any model with `base_model_prefix`: modules outside the base model are head, whatever their order."""

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def get_input_embeddings(self):
            return self.tok

    class Task(nn.Module):
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)
            self.body = Base()

        def get_input_embeddings(self):
            return self.body.tok

    lmap = layer_map(Task())
    assert {n: i.role for n, i in lmap.params.items() if not n.startswith("body.layers")} == {
        "proj.weight": HEAD,
        "proj.bias": HEAD,
        "out.weight": HEAD,
        "out.bias": HEAD,
        "body.tok.weight": EMBEDDINGS,
    }


def test_tied_output_layer_is_embeddings_whatever_its_name():
    """A weight shared by the input embeddings and the output layer is one tensor: it takes the embeddings' role,
    even when `named_parameters()` names it after the LM head (a head registered first)."""

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    class LM(nn.Module):
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.body = Base()
            self.lm_head.weight = self.body.tok.weight

        def get_input_embeddings(self):
            return self.body.tok

    lmap = layer_map(LM())
    assert "lm_head.weight" in lmap.params and "body.tok.weight" not in lmap.params
    assert lmap.params["lm_head.weight"].role == EMBEDDINGS
