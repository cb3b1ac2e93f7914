"""speechbrain models with FusedHyperMixing: whole-model conversion, both ways.

`convert_speechbrain(model)` replaces every speechbrain `HyperMixing` in a model, wherever it sits
(`self_att` of the Transformer layers, `mha_layer` of the Conformer and Branchformer layers, any
nested module), by a FusedHyperMixing with the same weights, in place; `to_speechbrain(model)`
does the reverse, for exporting a model to a speechbrain-only environment. Both keep each
replaced module's position in its parent, its train/eval mode, its parameters' requires_grad,
device and dtype, and a module shared by several parents stays shared. FusedHyperMixing registers
its parameters in speechbrain's order with speechbrain's names, so `model.named_parameters()`
(names, order, shapes) is the same on both sides, and an optimizer state_dict saved on one side
(speechbrain's Checkpointer saves it by parameter position) resumes on the other.

Nothing here imports speechbrain except `to_speechbrain`, which needs its HyperMixing class; a
speechbrain HyperMixing is recognised by its class (speechbrain.nnet.hypermixing.HyperMixing,
exactly: a subclass may compute something else and is left alone).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Tuple

from torch import nn

from ..layer import FusedHyperMixing

__all__ = [
    "convert_speechbrain",
    "to_speechbrain",
    "fused_from_speechbrain",
    "speechbrain_from_fused",
    "is_speechbrain_hypermixing",
]

_SB_MODULE, _SB_CLASS = "speechbrain.nnet.hypermixing", "HyperMixing"


def is_speechbrain_hypermixing(module) -> bool:
    """True for an instance of speechbrain.nnet.hypermixing.HyperMixing itself (not a subclass)."""
    cls = type(module)
    return cls.__module__ == _SB_MODULE and cls.__qualname__ == _SB_CLASS


def _copy_module_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """dst takes src's train/eval mode and each same-named parameter's requires_grad."""
    dst.train(src.training)
    flags = {name: p.requires_grad for name, p in src.named_parameters()}
    for name, p in dst.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    return dst


def fused_from_speechbrain(module: nn.Module, *, backend: str = "auto", attn_mask_policy: str = "ignore",
                           cls=FusedHyperMixing) -> FusedHyperMixing:
    """One speechbrain HyperMixing (duck-typed) as a FusedHyperMixing with its weights, on its
    device and dtype (FusedHyperMixing.from_speechbrain)."""
    try:
        w1 = module.hyper.w1_gen
        d = module.input_output_dim
        H = module.num_heads
        pe = module.positional_encoding.pe
    except AttributeError as e:
        raise TypeError(f"not a speechbrain HyperMixing module: {e}") from None
    tied = bool(getattr(module.hyper, "tied", module.hyper.w2_gen is w1))
    k_h = w1.fc2_weights.shape[1]
    k = int(getattr(w1, "original_out_size", k_h * H))  # speechbrain's hypernet_size
    fix = H > 1 and k_h == k  # fix_tm_hidden_size: every head has k hidden units
    layer = cls(
        d, k, tied=tied, num_heads=H, fix_tm_hidden_size=fix,
        max_length=pe.shape[1], variant="speechbrain", backend=backend,
        eps=module.layer_norm.eps, attn_mask_policy=attn_mask_policy,
    )
    # to the module's dtype before loading: loading first would round float64 weights to float32
    layer = layer.to(device=w1.fc1_weights.device, dtype=w1.fc1_weights.dtype)
    layer.load_state_dict(module.state_dict(), strict=True)
    return _copy_module_state(module, layer)


def _export_problem(layer: FusedHyperMixing) -> str:
    """Why `layer` has no speechbrain HyperMixing that computes the same ("" when it has one)."""
    if layer.variant != "speechbrain":
        return f"its variant is {layer.variant!r} (speechbrain has only the 'speechbrain' variant)"
    if not layer.use_layer_norm:
        return "it has no LayerNorm (speechbrain's HyperMixing always has one)"
    if not layer.hypernetwork_bias:
        return "its hypernetwork has no biases (speechbrain's always has them)"
    if layer.mode is not None:
        return f"it mixes {layer.mode.describe()} (speechbrain's HyperMixing mixes every token with every token)"
    if layer.sequence_parallel_group is not None:
        return "it is sequence-parallel (speechbrain's HyperMixing is not)"
    return ""


def speechbrain_from_fused(layer: FusedHyperMixing) -> nn.Module:
    """One FusedHyperMixing as a speechbrain HyperMixing with its weights, on its device and dtype.

    Raises ValueError for a layer that speechbrain cannot express (idiap variant, no LayerNorm or
    biases, causal / chunked / sequence-parallel mixing); warns for attn_mask_policy="honour",
    since speechbrain ignores attn_mask."""
    problem = _export_problem(layer)
    if problem:
        raise ValueError(f"this FusedHyperMixing has no speechbrain equivalent: {problem}")
    if layer.attn_mask_policy == "honour":
        warnings.warn("the layer honours attn_mask; speechbrain's HyperMixing, which it is exported to, ignores "
                      "it (outputs differ where a model passes a causal or chunk mask)", stacklevel=3)
    from speechbrain.nnet.hypermixing import HyperMixing

    pe_rows = getattr(layer, "positional_encoding").pe.shape[1]
    w = layer.hyper.w1_gen.fc1_weights
    module = HyperMixing(layer.input_output_dim, layer.hypernet_size, tied=layer.tied, num_heads=layer.num_heads,
                         fix_tm_hidden_size=layer.fix_tm_hidden_size, max_length=pe_rows)
    module.layer_norm.eps = layer.eps
    module = module.to(device=w.device, dtype=w.dtype)  # before loading, as in fused_from_speechbrain
    module.load_state_dict(layer.state_dict(), strict=True)
    return _copy_module_state(layer, module)


def _replace_all(model: nn.Module, matches: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module],
                 what: str) -> int:
    """Replace every submodule of `model` for which `matches` holds by `make(submodule)`, in
    place, keeping its place in its parent; each distinct module is converted once (shared stays
    shared). All replacements are built before the first is assigned, so a failing one leaves the
    model unchanged. Returns the number of distinct modules replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if matches(model):
        raise TypeError(f"the model is itself a {what} layer, which cannot be replaced in place: convert it with "
                        f"the single-layer function and use the returned module")
    sites: List[Tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent._modules.items():  # every name, even a second one for the same module
            if child is not None and matches(child):
                sites.append((parent, name, child))
    made: Dict[int, nn.Module] = {}
    for _, _, child in sites:
        if id(child) not in made:
            made[id(child)] = make(child)
    for parent, name, child in sites:
        setattr(parent, name, made[id(child)])
    return len(made)


def convert_speechbrain(model: nn.Module, attn_mask_policy: str = "ignore", backend: str = "auto") -> int:
    """Replace every speechbrain HyperMixing in `model` by a FusedHyperMixing with its weights,
    in place; returns how many were replaced.

    attn_mask_policy="ignore" (default) computes exactly what speechbrain computes, which ignores
    attn_mask (warns once per layer when a mask arrives); "honour" runs the causal / chunk-causal
    mixing that speechbrain's causal and Dynamic Chunk Training masks describe (FusedHyperMixing).
    An optimizer built over `model.parameters()` before the call holds the replaced tensors:
    build it after (a saved optimizer state_dict loads into the new one)."""
    return _replace_all(
        model, is_speechbrain_hypermixing,
        lambda m: fused_from_speechbrain(m, backend=backend, attn_mask_policy=attn_mask_policy),
        "speechbrain HyperMixing (use FusedHyperMixing.from_speechbrain)")


def to_speechbrain(model: nn.Module) -> int:
    """Replace every FusedHyperMixing in `model` by a speechbrain HyperMixing with its weights, in
    place; returns how many were replaced. Raises ValueError, changing nothing, if one of them
    has no speechbrain equivalent (see `speechbrain_from_fused`)."""
    for name, m in model.named_modules() if isinstance(model, nn.Module) else ():
        if isinstance(m, FusedHyperMixing) and m is not model:
            problem = _export_problem(m)
            if problem:
                raise ValueError(f"{name} has no speechbrain equivalent: {problem}; nothing was replaced")
    return _replace_all(model, lambda m: isinstance(m, FusedHyperMixing), speechbrain_from_fused,
                        "FusedHyperMixing (use hmx_kernels.integrations.speechbrain.speechbrain_from_fused)")
