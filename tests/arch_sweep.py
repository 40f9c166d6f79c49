"""Every architecture of transformers' sequence-classification and causal-LM auto mappings, built tiny, through the
layer map. `tests/test_architectures.py` runs it; `python tests/arch_sweep.py` prints the counts that README quotes.

Configs are shrunk generically (hidden size 32, 4 layers, 2 heads, vocab 128 ... in every sub-config) and the models
are built on the meta device: no weights are allocated, so even a multimodal model builds in well under a second.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from hf_wb import WBConfig, freeze, layer_map
from hf_wb.heads import find_output_layer
from hf_wb.layers import input_embedding_module

MAPPINGS = {"seq-cls": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "causal-lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
CASES = [(kind, model_type) for kind, mapping in MAPPINGS.items() for model_type in mapping]

HIDDEN = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "model_dim", "n_embed", "d_embed", "emb_dim")
FFN = (
    "intermediate_size",
    "ffn_dim",
    "d_ff",
    "n_inner",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "d_inner",
    "ffn_hidden_size",
    "inner_hidden_size",
)
LAYERS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
)
HEADS = (
    "num_attention_heads",
    "n_head",
    "num_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "n_heads",
    "num_key_value_heads",
)
VOCAB = 128


def shrink(config: PretrainedConfig) -> dict:
    """Keyword arguments that make ``type(config)`` tiny: only fields the default config has, set to small values."""
    d = {k: v for k, v in config.to_dict().items()}
    kw: dict = {}
    for keys, value in ((HIDDEN, 32), (FFN, 64), (LAYERS, 4), (HEADS, 2)):
        kw.update({k: value for k in keys if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)})
    # fields present but None by default, that the modelling code needs as numbers
    for k, value in (("head_dim", 16), ("num_key_value_heads", 2), ("vocab_size", VOCAB)):
        if k in d and (d[k] is None or (k == "head_dim" and isinstance(d[k], int))):
            kw[k] = value
    for k in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(d.get(k), int) and d[k] > 4:
            kw[k] = 4
    for k in ("num_experts_per_tok", "moe_topk"):
        if isinstance(d.get(k), int) and d[k] > 2:
            kw[k] = 2
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        if "vocab_size" in k and v > VOCAB:
            kw[k] = VOCAB
        elif k == "max_position_embeddings" and v > 128:
            kw[k] = 128
        elif (k.endswith("_token_id") or k.endswith("_token_index")) and v >= VOCAB:
            kw[k] = 3
    for k, v in d.items():
        if (k.endswith("_token_id") or k == "eos_token_id") and isinstance(v, list):
            kw[k] = [x if x < VOCAB else 3 for x in v]
    for key in getattr(type(config), "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig):
            kw[key] = {"model_type": sub.model_type, **shrink(sub)}
    return kw


@dataclass
class Built:
    model: nn.Module | None
    reason: str = ""  # why it could not be built


@functools.cache
def build(kind: str, model_type: str) -> Built:
    """A tiny model of ``model_type`` from ``MAPPINGS[kind]`` on the meta device, or the reason it cannot be built."""
    name = MAPPINGS[kind][model_type]
    name = name[0] if isinstance(name, (list, tuple)) else name
    model_cls = getattr(transformers, name, None)
    if model_cls is None:
        return Built(None, f"transformers has no class {name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("transformers").level
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            config_cls = getattr(model_cls, "config_class", None) or CONFIG_MAPPING[model_type]
            config = config_cls(**shrink(config_cls()), num_labels=2)
            with torch.device("meta"):
                return Built(model_cls(config))
        except ImportError as exc:
            return Built(None, "needs an extra package: " + str(exc).strip().splitlines()[0][:120])
        except Exception as exc:  # noqa: BLE001 - recorded as the reason it cannot be built generically
            return Built(None, f"generic tiny config does not build: {type(exc).__name__}: {str(exc)[:120]}")
        finally:
            logging.getLogger("transformers").setLevel(level)


@dataclass
class Outcome:
    status: str  # "ok", "refused", "skipped", "wrong"
    detail: str = ""


def output_weight(kind: str, model: nn.Module) -> tuple[str, nn.Parameter] | None:
    if kind == "seq-cls":
        try:
            layer = find_output_layer(model)[1]
        except ValueError:  # a head inside the base model (Perceiver's decoder): the last Linear to num_labels
            found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 2]
            if not found:
                raise
            layer = found[-1]
        return "output layer", layer.weight
    try:
        layer = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    if layer is None or not isinstance(getattr(layer, "weight", None), nn.Parameter):
        return None
    return "output embeddings", layer.weight


def check(kind: str, model_type: str) -> Outcome:
    """Blocks found (or a clear ValueError), the output layer in role head and trainable under ``WBConfig()``, the
    input embeddings in role embeddings; an output layer tied to the input embeddings counts as embeddings."""
    built = build(kind, model_type)
    if built.model is None:
        return Outcome("skipped", built.reason)
    model = built.model
    try:
        lmap = layer_map(model)
    except ValueError as exc:
        message = str(exc)
        ok = "layers_pattern" in message or "baseline()" in message
        return Outcome("refused" if ok else "wrong", message.split(":")[0] if ok else f"unclear refusal: {message}")
    names = {id(p): n for n, p in model.named_parameters()}
    problems = []
    embeddings = input_embedding_module(model)
    for p in embeddings.parameters() if isinstance(embeddings, nn.Module) else []:
        if lmap.params[names[id(p)]].role != "embeddings":
            problems.append(f"input embeddings {names[id(p)]} in role {lmap.params[names[id(p)]].role}")
    try:
        out = output_weight(kind, model)
    except ValueError as exc:
        return Outcome("wrong", f"no output layer found: {str(exc)[:100]}")
    tied = out is not None and isinstance(embeddings, nn.Module) and any(out[1] is p for p in embeddings.parameters())
    if out is not None and not tied:
        role = lmap.params[names[id(out[1])]].role
        if role != "head":
            problems.append(f"output layer {names[id(out[1])]} in role {role}")
    try:
        freeze(model, WBConfig(), lmap)
    except ValueError as exc:
        return Outcome("refused", f"freeze: {str(exc)[:100]}")
    if out is not None and not tied and not out[1].requires_grad:
        problems.append(f"output layer {names[id(out[1])]} frozen under WBConfig()")
    if problems:
        return Outcome("wrong", "; ".join(problems))
    return Outcome("ok", "tied output layer" if tied else "")


def main() -> None:
    from collections import Counter

    results = {case: check(*case) for case in CASES}
    counts = Counter(o.status for o in results.values())
    print(f"{counts['ok']} of {len(CASES)} architecture entries mapped and checked; {dict(counts)}")
    tied = sum(o.detail == "tied output layer" for o in results.values())
    print(f"  of which the output layer is tied to the input embeddings: {tied}")
    for status in ("refused", "skipped", "wrong"):
        reasons = Counter(_reason(o.detail) for o in results.values() if o.status == status)
        for reason, n in reasons.most_common():
            cases = [f"{k}/{t}" for (k, t), o in results.items() if o.status == status and _reason(o.detail) == reason]
            print(f"{status}: {n} x {reason[:110]} -- {', '.join(cases)}")


def _reason(detail: str) -> str:
    return ":".join(detail.split(":")[:2])


if __name__ == "__main__":
    main()
