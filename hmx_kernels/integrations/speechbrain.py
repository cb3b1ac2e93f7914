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

`mode_from_attn_mask(attn_mask)` recognises the attention masks speechbrain hands its layers
([N, N]; float with -inf where a query may not see a key, or bool with True there): those of
`get_lookahead_mask` (token-causal) and `make_transformer_src_mask` (Dynamic Chunk Training), as a
`MixingMode`; any other mask is an error (HyperMixing's state is a sum over tokens: it can only
restrict which tokens enter the sum in these chunk patterns), and so is a mask of another size
than the sequence's. Recognition reads the mask once and remembers the result for that tensor
version, since every layer of an encoder gets the same mask; an inference tensor (made under
torch.inference_mode) has no version counter and is read on every call. The mode depends on the
mask's values, so under torch.compile the recognition runs outside the graph (graph breaks), and
torch.compile(fullgraph=True) raises, saying so (build the layer with causal= / chunk_size=).
FusedHyperMixing(attn_mask_policy="honour") calls it.

Nothing here imports speechbrain except `to_speechbrain`, which needs its HyperMixing class; a
speechbrain HyperMixing is recognised by its class (speechbrain.nnet.hypermixing.HyperMixing,
exactly: a subclass may compute something else and is left alone).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..causal import MixingMode, allowed_matrix

if TYPE_CHECKING:  # the layer imports this module (mask recognition); conversion imports it lazily
    from ..layer import FusedHyperMixing

__all__ = [
    "convert_speechbrain",
    "to_speechbrain",
    "fused_from_speechbrain",
    "speechbrain_from_fused",
    "is_speechbrain_hypermixing",
    "mode_from_attn_mask",
]

_SB_MODULE, _SB_CLASS = "speechbrain.nnet.hypermixing", "HyperMixing"


def _fused_class():
    from ..layer import FusedHyperMixing  # here, not at import: the layer imports this module

    return FusedHyperMixing


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
                           cls=None) -> FusedHyperMixing:
    """One speechbrain HyperMixing (duck-typed) as a FusedHyperMixing (or `cls`, a subclass) with
    its weights, on its device and dtype (FusedHyperMixing.from_speechbrain)."""
    cls = cls or _fused_class()
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
    fused = _fused_class()
    for name, m in model.named_modules() if isinstance(model, nn.Module) else ():
        if isinstance(m, fused) and m is not model:
            problem = _export_problem(m)
            if problem:
                raise ValueError(f"{name} has no speechbrain equivalent: {problem}; nothing was replaced")
    return _replace_all(model, lambda m: isinstance(m, fused), speechbrain_from_fused,
                        "FusedHyperMixing (use hmx_kernels.integrations.speechbrain.speechbrain_from_fused)")


# ---- attention masks as mixing modes ----------------------------------------------------------
# mask tensor -> (its version when read, mode); weak: a freed mask leaves, and a new tensor at the
# same address is never mistaken for it
_RECOGNISED = WeakIdKeyDictionary()


HONOUR_COMPILE_NOTE = (
    "hmx_kernels: attn_mask_policy='honour' reads the attn_mask's values to find the mixing mode, which "
    "torch.compile cannot capture in the graph; build the layer with causal=True or chunk_size=... (and "
    "left_context_chunks=...) for one graph"
)


def mode_from_attn_mask(attn_mask: Tensor, length: Optional[int] = None) -> Optional[MixingMode]:
    """The mode an [N, N] speechbrain attention mask describes (None: it blocks nothing).

    Accepts float masks (0 = allowed, -inf = blocked) and bool masks (True = blocked), as
    speechbrain's get_lookahead_mask and make_transformer_src_mask build them; raises ValueError
    for any other pattern, and for a mask that is not [length, length] when `length` (the
    sequence's N) is given."""
    if not isinstance(attn_mask, Tensor) or attn_mask.dim() != 2 or attn_mask.shape[0] != attn_mask.shape[1]:
        shape = list(attn_mask.shape) if isinstance(attn_mask, Tensor) else type(attn_mask).__name__
        raise ValueError(f"attn_mask must be an [N, N] tensor, got {shape}")
    if length is not None and attn_mask.shape[0] != length:
        raise ValueError(
            f"attn_mask is {list(attn_mask.shape)} but the sequence has N = {length} tokens: an honoured attn_mask "
            f"must be [N, N] = [{length}, {length}] (one row per query, one column per key)"
        )
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=HONOUR_COMPILE_NOTE)
    if attn_mask.is_inference():  # no version counter: read it every time
        return _recognise(attn_mask)
    seen = _RECOGNISED.get(attn_mask)
    if seen is not None and seen[0] == attn_mask._version:
        return seen[1]
    mode = _recognise(attn_mask)
    _RECOGNISED[attn_mask] = (attn_mask._version, mode)
    return mode


def _recognise(attn_mask: Tensor) -> Optional[MixingMode]:
    if attn_mask.dtype == torch.bool:
        allowed = ~attn_mask
    elif attn_mask.is_floating_point():
        if not bool(((attn_mask == 0) | (attn_mask == float("-inf"))).all()):
            raise ValueError("a float attn_mask must hold only 0 (allowed) and -inf (blocked): HyperMixing cannot "
                             "weight tokens, only leave them out of its sum")
        allowed = attn_mask == 0
    else:
        raise TypeError(f"attn_mask must be float (0 / -inf) or bool (True = blocked), got {attn_mask.dtype}")
    n = allowed.shape[0]
    allowed = allowed.cpu()
    if bool(allowed.all()):
        mode = None
    else:
        first_row = allowed[0]
        C = int(first_row.sum())  # chunk 0 sees exactly its own chunk
        if C < 1 or not bool(first_row[:C].all()):
            raise ValueError(_UNRECOGNISED)
        lo = allowed.int().argmax(dim=1)  # first allowed key of each query
        ct = torch.arange(n) // C
        if bool((lo == 0).all()):
            L = None
        else:
            L = int((ct - lo // C).max())
        mode = MixingMode(C, L)
        if not torch.equal(allowed, allowed_matrix(mode, n)):
            raise ValueError(_UNRECOGNISED)
    return mode


_UNRECOGNISED = (
    "attn_mask is not a causal or chunk-causal mask: HyperMixing honours speechbrain's causal mask "
    "(get_lookahead_mask) and its Dynamic Chunk Training masks (make_transformer_src_mask with a chunk "
    "size and left context), where every query sees whole chunks up to its own; other masks cannot be "
    "expressed as a restriction of its token sum"
)
