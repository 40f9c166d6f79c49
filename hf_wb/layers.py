"""Which stack, role and depth every parameter of a model belongs to.

The layer map is the foundation of the recipe: param groups, freezing, histograms and the frozen-prefix cache all
read it. It is computed from the model's own structure, never from the order in which parameters are registered (a
task model may register its head before its base model: XLM-RoBERTa's ``classifier`` comes before ``roberta``):

1. the *base model* is the submodule named by the model's ``base_model_prefix`` (``bert``, ``roberta``,
   ``model``...); a model without one is its own base;
2. the repeated transformer blocks are the ``nn.ModuleList`` inside the base model whose items all have one class
   (preferring classes named in the model's ``_no_split_modules``); nested lists inside a block are ignored, so each
   stack is the outermost one; an encoder-decoder has one stack per ``ModuleList`` (``encoder.block`` and
   ``decoder.block`` in T5), each with its own depth;
3. the *embeddings* are the module that ``get_input_embeddings()`` returns, with the ancestors that hold it and no
   block (BERT's whole ``embeddings`` module), and, beside the blocks, every ``nn.Embedding`` or module whose name
   says ``embed`` (GPT-2's ``wpe``, BART's ``layernorm_embedding``, DeBERTa's ``rel_embeddings``); a weight shared
   with the input embeddings (a tied LM head) is an embedding too;
4. the *head* is everything outside the base model (classifier, score, LM head) and, inside it, what the base model
   registers after its blocks (final norm, pooler); a module beside the blocks registered before them (GPT-2's
   embedding dropout) goes with the embeddings. Outside every stack's parent module, a head belongs to the last
   stack and an embedding to the first.

``layers_pattern`` (a regular expression matched against the full or last dotted name of a ``ModuleList``, as PEFT's
``layers_pattern``) overrides step 2. Tied weights appear once, under the name ``named_parameters()`` gives them first.
Wrappers are seen through: DDP, FSDP, DeepSpeed, ``torch.compile`` and PEFT (``PeftModel``), so the names are those
of the transformers model inside. Models whose blocks share weights (ALBERT) are refused: one set of weights serves
every depth, so a depth-wise recipe cannot be expressed for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "EMBEDDINGS",
    "BLOCK",
    "HEAD",
    "ParamInfo",
    "StackInfo",
    "LayerMap",
    "layer_map",
    "unwrap_model",
    "base_model_name",
    "input_embedding_module",
]

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
    """Strip DDP / FSDP / DataParallel / DeepSpeed / torch.compile / PEFT wrappers: the transformers model inside."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(model).__name__ in {"FullyShardedDataParallel", "DeepSpeedEngine"} and hasattr(model, "module")
        ):
            model = model.module
        elif _is_peft_wrapper(model):
            model = model.base_model
        elif any(c.__name__ == "BaseTuner" for c in type(model).__mro__) and isinstance(
            getattr(model, "model", None), nn.Module
        ):
            model = model.model  # PEFT's tuner (LoraModel ...) holds the transformers model as `.model`
        else:
            return model


def _is_peft_wrapper(model: nn.Module) -> bool:
    return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft") for c in type(model).__mro__) and (
        isinstance(getattr(model, "base_model", None), nn.Module)
    )


def base_model_name(model: nn.Module) -> str:
    """Qualified name of the base model inside a task model (``bert``, ``roberta``, ``model``, ``transformer``...),
    found through ``base_model_prefix``; ``""`` when the model is its own base (a bare encoder, a custom module)."""
    prefix = getattr(model, "base_model_prefix", None)
    if isinstance(prefix, str) and prefix:
        module = getattr(model, prefix, None)
        if isinstance(module, nn.Module) and module is not model:
            return prefix
    return ""


def input_embedding_module(model: nn.Module) -> nn.Module | None:
    """What ``model.get_input_embeddings()`` returns, or None when the model has no such method or it fails."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        module = getter()
    except (NotImplementedError, AttributeError, TypeError):
        return None
    return module if isinstance(module, nn.Module) else None


def _no_split_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        value = getattr(module, "_no_split_modules", None)
        if value:
            names.update(value)
    return names


def _module_class(module: nn.Module) -> type:
    """The module's own class, seen through the eval-pinned subclass that :func:`hf_wb.freezing.pin_eval` swaps in."""
    return getattr(type(module), "_hf_wb_base", type(module))


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidate_lists(model: nn.Module, layers_pattern: str | None, base: str = "") -> list[tuple[str, nn.ModuleList]]:
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and n]
    if layers_pattern is None and base and any(_under(n, base) for n, _ in lists):
        lists = [(n, m) for n, m in lists if _under(n, base)]  # the blocks live in the base model, not in the head
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
        (n, m)
        for n, m in lists
        if len({_module_class(x) for x in m}) == 1 and _param_count(m) > 0 and not _is_head_list(n)
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
        model: any ``transformers`` model (or ``nn.Module``), wrapped or not (DDP, FSDP, DeepSpeed, compile, PEFT).
        layers_pattern: regex for the name (full dotted name or last component) of the ``nn.ModuleList`` holding the
            repeated blocks; overrides automatic discovery.

    Raises:
        ValueError: when no stack of blocks is found, or the blocks share weights (ALBERT).
    """
    model = unwrap_model(model)
    _check_shared_config(model)
    base = base_model_name(model)
    found = _candidate_lists(model, layers_pattern, base)
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
    first_label, last_label = next(iter(stacks)), list(stacks)[-1]
    modules = dict(model.named_modules(remove_duplicate=False))
    embedding_roots = _embedding_roots(model, modules, [s.module_name for s in stacks.values()])

    # Beside the blocks, inside the base model: the base model's own registration order says before / after.
    order = {name: i for i, name in enumerate(modules)}
    parents = {label: s.module_name.rsplit(".", 1)[0] if "." in s.module_name else "" for label, s in stacks.items()}
    first_block = {label: order[s.block_names[0]] for label, s in stacks.items()}

    def owner(module_name: str, role: str) -> str:
        owners = [label for label in stacks if parents[label] and _under(module_name, parents[label])]
        if owners:  # nested parents: the deepest one owns it
            return max(owners, key=lambda label: len(parents[label]))
        if role == EMBEDDINGS:
            return first_label
        if role == HEAD:
            return last_label
        label = first_label  # outside every stack's parent: the last stack registered before it
        for candidate in stacks:
            if first_block[candidate] <= order.get(module_name, 0):
                label = candidate
        return label

    def locate(module_name: str) -> tuple[str, str, int | None]:
        for label, s in stacks.items():
            if _under(module_name, s.module_name) and module_name != s.module_name:
                depth = int(module_name[len(s.module_name) + 1 :].split(".")[0])
                return label, BLOCK, depth
        if any(_under(module_name, root) for root in embedding_roots):
            return owner(module_name, EMBEDDINGS), EMBEDDINGS, None
        if base and not _under(module_name, base):
            return owner(module_name, HEAD), HEAD, None
        if isinstance(modules.get(module_name), nn.Embedding) or "embed" in module_name.lower():
            return owner(module_name, EMBEDDINGS), EMBEDDINGS, None
        label = owner(module_name, "")
        if order.get(module_name, 0) < first_block[label]:
            return label, EMBEDDINGS, None
        return label, HEAD, None

    module_units = {name: locate(name) for name in modules if name}
    tied = _input_embedding_params(model)
    params: dict[str, ParamInfo] = {}
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        label, role, depth = module_units.get(module_name) or locate(module_name)
        if id(param) in tied and role != EMBEDDINGS:  # an output layer tied to the input embeddings is one tensor
            label, role, depth = owner(tied[id(param)], EMBEDDINGS), EMBEDDINGS, None
        params[name] = ParamInfo(name, label, role, depth, param.numel())
    _deberta_rel_norm(model, params)
    return LayerMap(stacks=stacks, params=params, module_units=module_units)


def _embedding_roots(model: nn.Module, modules: dict[str, nn.Module], stack_names: list[str]) -> list[str]:
    """Qualified names of the input embeddings (``get_input_embeddings()``), each raised to its outermost ancestor
    that holds no block (BERT: ``bert.embeddings``; GPT-2: ``transformer.wte``)."""
    embeddings = input_embedding_module(model)
    if embeddings is None:
        return []
    roots = []
    for name, module in modules.items():
        if module is not embeddings or not name:
            continue
        while "." in name:
            parent = name.rsplit(".", 1)[0]
            if any(_under(s, parent) for s in stack_names):
                break
            name = parent
        if not any(_under(s, name) for s in stack_names):
            roots.append(name)
    return roots


def _input_embedding_params(model: nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> qualified module name, for the parameters of the input embeddings."""
    embeddings = input_embedding_module(model)
    if embeddings is None:
        return {}
    name = next((n for n, m in model.named_modules() if m is embeddings), "")
    return {id(p): name for p in embeddings.parameters()}


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
