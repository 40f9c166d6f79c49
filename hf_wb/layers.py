"""Which stack, role and depth every parameter of a model belongs to.

The layer map is the foundation of the recipe: param groups, freezing, histograms and the frozen-prefix cache all
read it. It is computed from the model's own structure:

1. the repeated transformer blocks are the ``nn.ModuleList`` whose items all have one class (preferring classes named
   in the model's ``_no_split_modules``); nested lists inside a block are ignored, so each stack is the outermost one;
2. an encoder-decoder has one stack per ``ModuleList`` (``encoder.block`` and ``decoder.block`` in T5), each with
   its own depth;
3. a parameter outside every block belongs to the stack whose parent module holds it (``encoder.final_layer_norm``
   belongs to the encoder), or, outside every stack's parent, to the stack it is registered nearest to;
4. inside its stack, a parameter registered before the first block, or whose module path mentions ``embed``
   (BART's ``layernorm_embedding``, DeBERTa's ``rel_embeddings``), is an *embedding*; one registered after the last
   block (final norm, pooler, classifier, LM head) is the *head*.

``layers_pattern`` (a regular expression matched against the full or last dotted name of a ``ModuleList``, as PEFT's
``layers_pattern``) overrides step 1. Tied weights appear once, under the name ``named_parameters()`` gives them first.
Models whose blocks share weights (ALBERT) are refused: one set of weights serves every depth, so a depth-wise recipe
cannot be expressed for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

__all__ = ["EMBEDDINGS", "BLOCK", "HEAD", "ParamInfo", "StackInfo", "LayerMap", "layer_map", "unwrap_model"]

EMBEDDINGS = "embeddings"
BLOCK = "block"
HEAD = "head"


@dataclass(frozen=True)
class ParamInfo:
    """Where one parameter sits: its stack (label), role (embeddings / block / head) and block depth."""

    name: str
    stack: str
    role: str
    depth: int | None
    numel: int


@dataclass(frozen=True)
class StackInfo:
    """One stack of repeated blocks: its short label, the ``ModuleList``'s qualified name and its blocks."""

    label: str
    module_name: str
    num_blocks: int
    block_names: tuple[str, ...]


@dataclass
class LayerMap:
    """The result of :func:`layer_map`: stacks in forward order and a :class:`ParamInfo` per parameter."""

    stacks: dict[str, StackInfo]
    params: dict[str, ParamInfo]
    module_units: dict[str, tuple[str, str, int | None]] = field(default_factory=dict)

    def unit(self, param_name: str) -> str:
        """Readable unit of a parameter: ``embeddings``, ``block_03``, ``head`` (``encoder/`` prefix if several)."""
        info = self.params[param_name]
        return unit_name(info.stack, info.role, info.depth)

    def units(self) -> list[str]:
        """All units in forward order (embeddings, blocks bottom to top, head for each stack)."""
        seen: dict[str, None] = {}
        for name in self.params:
            seen.setdefault(self.unit(name), None)
        return sorted(seen, key=self._unit_order)

    def _unit_order(self, unit: str) -> tuple[int, int]:
        labels = list(self.stacks)
        stack, _, rest = unit.rpartition("/")
        index = labels.index(stack) if stack in labels else 0
        if rest == EMBEDDINGS:
            return index, -1
        if rest == HEAD:
            return index, 1 << 20
        return index, int(rest.split("_")[1])

    def params_of(self, stack: str, role: str, depth: int | None = None) -> list[str]:
        """Names of the parameters in one unit."""
        return [
            n
            for n, i in self.params.items()
            if i.stack == stack and i.role == role and (depth is None or i.depth == depth)
        ]

    def __iter__(self) -> Iterator[ParamInfo]:
        return iter(self.params.values())


def unit_name(stack: str, role: str, depth: int | None) -> str:
    base = f"block_{depth:02d}" if role == BLOCK else role
    return f"{stack}/{base}" if stack else base


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(model).__name__ in {"FullyShardedDataParallel", "DeepSpeedEngine"} and hasattr(model, "module")
        ):
            model = model.module
        else:
            return model


def _no_split_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        value = getattr(module, "_no_split_modules", None)
        if value:
            names.update(value)
    return names


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidate_lists(model: nn.Module, layers_pattern: str | None) -> list[tuple[str, nn.ModuleList]]:
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and n]
    if layers_pattern is not None:
        regex = re.compile(layers_pattern)
        found = [(n, m) for n, m in lists if regex.fullmatch(n) or regex.fullmatch(n.rsplit(".", 1)[-1])]
        if not found:
            raise ValueError(
                f"`layers_pattern`={layers_pattern!r} matches no nn.ModuleList of {type(model).__name__}; "
                f"its ModuleLists are {[n for n, _ in lists] or 'none'}. Pass the name (or a regex for the name) of "
                "the list that holds the repeated blocks, e.g. 'layer', 'h', 'layers' or 'encoder.block'."
            )
        return _outermost(found)
    homogeneous = [
        (n, m) for n, m in lists if len({type(x) for x in m}) == 1 and _param_count(m) > 0 and not _is_head_list(n)
    ]
    preferred = _no_split_classes(model)
    chosen = [(n, m) for n, m in homogeneous if type(m[0]).__name__ in preferred]
    if not chosen:
        chosen = [(n, m) for n, m in homogeneous if len(m) >= 2]
        chosen = _outermost(chosen)
        if chosen:
            # Without `_no_split_modules` keep only the lists that hold most of the weights (the block stacks,
            # not, say, a list of per-layer adapters).
            total = max(_param_count(m) for _, m in chosen)
            chosen = [(n, m) for n, m in chosen if _param_count(m) >= 0.25 * total]
    return _outermost(chosen)


def _is_head_list(name: str) -> bool:
    return bool(re.search(r"(^|\.)(heads?|classifiers?|lm_heads?)$", name))


def _outermost(lists: list[tuple[str, nn.ModuleList]]) -> list[tuple[str, nn.ModuleList]]:
    names = [n for n, _ in lists]
    return [(n, m) for n, m in lists if not any(n != o and n.startswith(o + ".") for o in names)]


def _labels(module_names: list[str]) -> list[str]:
    if len(module_names) == 1:
        return [""]
    for take in range(2, 10):
        labels = []
        for name in module_names:
            parts = name.split(".")
            # the component(s) above the list itself: "model.encoder.layers" -> "encoder"
            parent = parts[:-1][-(take - 1) :] if len(parts) > 1 else parts
            labels.append(".".join(parent) or name)
        if len(set(labels)) == len(labels):
            return labels
    return [n.replace(".", "_") for n in module_names]


def _check_shared_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    groups = getattr(config, "num_hidden_groups", None)
    layers = getattr(config, "num_hidden_layers", None)
    if groups is not None and layers is not None and groups < layers:
        raise ValueError(
            f"{type(model).__name__} shares one block's weights across its {layers} layers "
            f"(`num_hidden_groups`={groups}), so a depth-wise recipe (top blocks at a higher LR, lower blocks frozen) "
            "cannot be expressed: every depth uses the same tensors. Fine-tune it with `WBConfig.baseline()` and a "
            "plain `Trainer`, or choose a model whose blocks have their own weights."
        )


def _check_shared_weights(model: nn.Module, stacks: list[tuple[str, nn.ModuleList]]) -> None:
    for name, blocks in stacks:
        seen: dict[int, int] = {}
        for index, block in enumerate(blocks):
            for p in block.parameters():
                other = seen.setdefault(id(p), index)
                if other != index:
                    raise ValueError(
                        f"Blocks {other} and {index} of `{name}` in {type(model).__name__} share weights, so they "
                        "cannot get different learning rates or be frozen apart. Use `WBConfig.baseline()`."
                    )


def layer_map(model: nn.Module, layers_pattern: str | None = None) -> LayerMap:
    """Map every named parameter of ``model`` to its stack, role (embeddings / block / head) and block depth.

    Args:
        model: any ``transformers`` model (or ``nn.Module``), wrapped or not.
        layers_pattern: regex for the name (full dotted name or last component) of the ``nn.ModuleList`` holding the
            repeated blocks; overrides automatic discovery.

    Raises:
        ValueError: when no stack of blocks is found, or the blocks share weights (ALBERT).
    """
    model = unwrap_model(model)
    _check_shared_config(model)
    found = _candidate_lists(model, layers_pattern)
    if not found:
        raise ValueError(
            f"Could not find a stack of repeated transformer blocks in {type(model).__name__}: no nn.ModuleList of "
            "same-class modules was found. Pass `layers_pattern` (the name of the ModuleList holding the blocks, "
            "e.g. 'layer', 'h' or 'layers') in WBConfig."
        )
    _check_shared_weights(model, found)
    labels = _labels([n for n, _ in found])
    stacks = {
        label: StackInfo(label, name, len(blocks), tuple(f"{name}.{i}" for i in range(len(blocks))))
        for label, (name, blocks) in zip(labels, found, strict=True)
    }

    # Position of each module in registration order; blocks give anchor positions per stack.
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    parents = {label: s.module_name.rsplit(".", 1)[0] if "." in s.module_name else "" for label, s in stacks.items()}
    spans = {
        label: (order[s.block_names[0]], max(order[n] for n, _ in model.named_modules() if _under(n, s.module_name)))
        for label, s in stacks.items()
    }

    def locate(module_name: str) -> tuple[str, str, int | None]:
        for label, s in stacks.items():
            if _under(module_name, s.module_name) and module_name != s.module_name:
                depth = int(module_name[len(s.module_name) + 1 :].split(".")[0])
                return label, BLOCK, depth
        position = order.get(module_name, 0)
        owners = [label for label in stacks if parents[label] and _under(module_name, parents[label])]
        if len(owners) > 1:  # nested parents: the deepest one owns it
            owners = [max(owners, key=lambda label: len(parents[label]))]
        if owners:
            label = owners[0]
        else:
            # outside every stack's parent: before the first stack -> its embeddings, else the last stack before it
            label = next(iter(stacks))
            for candidate in stacks:
                if spans[candidate][0] <= position:
                    label = candidate
        first, _ = spans[label]
        if position < first or "embed" in module_name.lower():
            return label, EMBEDDINGS, None
        return label, HEAD, None

    module_units = {name: locate(name) for name in order if name}
    params: dict[str, ParamInfo] = {}
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        label, role, depth = module_units.get(module_name) or locate(module_name)
        params[name] = ParamInfo(name, label, role, depth, param.numel())
    _deberta_rel_norm(model, params)
    return LayerMap(stacks=stacks, params=params, module_units=module_units)


def _deberta_rel_norm(model: nn.Module, params: dict[str, ParamInfo]) -> None:
    """DeBERTa-v2's ``encoder.LayerNorm`` normalises the relative position embeddings: it belongs with them."""
    for module_name, module in model.named_modules():
        if hasattr(module, "rel_embeddings") and isinstance(getattr(module, "LayerNorm", None), nn.Module):
            prefix = f"{module_name}.LayerNorm." if module_name else "LayerNorm."
            for name, info in list(params.items()):
                if name.startswith(prefix):
                    params[name] = ParamInfo(name, info.stack, EMBEDDINGS, None, info.numel)


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")
