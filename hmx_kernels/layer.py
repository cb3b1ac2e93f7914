"""FusedHyperMixing: a drop-in HyperMixing layer that dispatches to the fastest backend.

Parameter and buffer names follow the public implementations, so that
`layer.load_state_dict(speechbrain_module.state_dict(), strict=True)` works (and likewise for an
idiap module built with the same options). The positional-encoding buffer is kept only for that
compatibility: the encoding is recomputed for any sequence length (no max_length limit), and a
checkpoint's `pe` buffer of any number of rows loads.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .causal import MixingMode, resolve_mode
from .dispatch import check_backend_name
from .functional import mix
from .integrations.speechbrain import mode_from_attn_mask
from .positional import positional_encoding
from .streaming import LayerStream, StreamingState, StreamingStateMismatch, hyper_mixing_stream
from .variants import get_variant
from .varlen import _varlen

__all__ = ["FusedHyperMixing", "GeneratorMLP", "HyperNetwork", "ATTN_MASK_POLICIES"]

ATTN_MASK_POLICIES = ("raise", "ignore", "honour")


def _size(name: str, value) -> int:
    """An integer size argument; 16.9 or "16" are errors, not silently 16."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


class _Unset:
    """The default of forward's mask arguments: tells "not passed" from an explicit None."""

    def __repr__(self) -> str:
        return "None"


_UNSET = _Unset()


def _positional(names, args, **keywords) -> dict:
    """The arguments `names` from forward's extra positional `args` and its keywords (None where
    neither gave one); an argument given both ways is a TypeError, as Python raises for a plain
    signature, even when the keyword's value is None."""
    if len(args) > len(names):
        raise TypeError(f"forward takes at most {3 + len(names)} positional arguments")
    given = dict(zip(names, args))
    for name in given:
        if keywords.get(name, _UNSET) is not _UNSET:
            raise TypeError(f"forward() got multiple values for argument '{name}' (given both positionally and "
                            "by keyword)")
    for name, value in keywords.items():
        if name not in given:
            given[name] = None if value is _UNSET else value
    return given


# The order each public implementation registers a generator's parameters in. It is the order
# of `named_parameters()`, which an optimizer's state_dict indexes by position: a layer registered
# in another order loads an Adam state saved from the original without error and fails (or worse,
# mixes up moments of equal shape) at the next step.
PARAMETER_ORDER = {
    "speechbrain": ("fc1_weights", "fc1_biases", "fc2_weights", "fc2_biases"),  # ParallelMLPs
    "idiap": ("fc1_weights", "fc2_weights", "fc1_biases", "fc2_biases"),  # _ParallelMLPs
}


def _check_policy(policy) -> str:
    if not isinstance(policy, str) or policy not in ATTN_MASK_POLICIES:
        raise ValueError(f"attn_mask_policy must be one of {ATTN_MASK_POLICIES}, got {policy!r}")
    return policy


class GeneratorMLP(nn.Module):
    """H parallel MLPs d_h -> d_h -> k_h (fc1 -> GELU -> fc2), one per head (weights only).

    Named like speechbrain's `ParallelMLPs`: fc1_weights [H, d_h, d_h], fc1_biases [H, d_h],
    fc2_weights [H, k_h, d_h], fc2_biases [H, k_h], registered in the order of `variant`'s public
    implementation (PARAMETER_ORDER), so that `named_parameters()` and optimizer states line up.
    """

    def __init__(self, num_heads: int, head_dim: int, hidden_per_head: int, bias: bool,
                 variant: str = "speechbrain") -> None:
        super().__init__()
        shapes = {
            "fc1_weights": (num_heads, head_dim, head_dim),
            "fc1_biases": (num_heads, head_dim),
            "fc2_weights": (num_heads, hidden_per_head, head_dim),
            "fc2_biases": (num_heads, hidden_per_head),
        }
        for name in PARAMETER_ORDER[get_variant(variant).name]:
            if bias or name.endswith("weights"):
                self.register_parameter(name, nn.Parameter(torch.empty(shapes[name])))
            else:
                self.register_parameter(name, None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # as both public implementations: xavier_uniform_(gain=sqrt(2)) on each tensor as a whole
        for p in (self.fc1_weights, self.fc1_biases, self.fc2_weights, self.fc2_biases):
            if p is not None:
                nn.init.xavier_uniform_(p, gain=math.sqrt(2.0))

    def tensors(self) -> tuple:
        return (self.fc1_weights, self.fc1_biases, self.fc2_weights, self.fc2_biases)


class HyperNetwork(nn.Module):
    """Holds w1_gen and w2_gen (the same module when tied, as in speechbrain)."""

    def __init__(self, num_heads: int, head_dim: int, hidden_per_head: int, tied: bool, bias: bool,
                 variant: str = "speechbrain") -> None:
        super().__init__()
        self.tied = tied
        self.w1_gen = GeneratorMLP(num_heads, head_dim, hidden_per_head, bias, variant)
        self.w2_gen = self.w1_gen if tied else GeneratorMLP(num_heads, head_dim, hidden_per_head, bias, variant)


class _PositionalEncodingBuffer(nn.Module):
    """Holds the `pe` buffer [1, max_length, d] of the public implementations (checkpoint names).

    The buffer is not read by the forward pass (the encoding is computed for any length); a
    checkpoint's buffer of any number of rows loads.
    """

    def __init__(self, variant, max_length: int, d: int) -> None:
        super().__init__()
        self.register_buffer("pe", positional_encoding(variant, max_length, d, start=0).unsqueeze(0))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "pe"
        if key in state_dict:
            t = state_dict[key]
            if t.dim() == 3 and t.shape[0] == 1 and t.shape[2] == self.pe.shape[2] and t.shape[1] != self.pe.shape[1]:
                self.pe = self.pe.new_empty(t.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _mode_arguments(mode: Optional[MixingMode]) -> dict:
    """A mixing mode as the functional op's causal / chunk_size / left_context_chunks arguments."""
    if mode is None:
        return {}
    if mode.token_causal:
        return {"causal": True}
    return {"chunk_size": mode.chunk_size, "left_context_chunks": mode.left_context_chunks}


class FusedHyperMixing(nn.Module):
    """Multi-head HyperMixing, a linear-time replacement for self-attention.

    Arguments (speechbrain's first, then the idiap options):
        input_output_dim: d, the token width.
        hypernet_size: k, the token-mixing MLP's hidden size (split over heads unless
            fix_tm_hidden_size).
        tied: one hypernetwork generates both W1 and W2.
        num_heads: H; d must be divisible by H.
        fix_tm_hidden_size: each head's hidden size is k instead of k / H.
        max_length: rows of the `pe` buffer kept for checkpoint compatibility; not a length limit.
        variant: "speechbrain" (default) or "idiap" (docs/HYPERMIXING.md: input scale, positional
            encoding, cross-mixing).
        use_layer_norm: final LayerNorm over d (speechbrain: always).
        hypernetwork_bias: biases in the hypernetwork MLPs (default: speechbrain True, idiap False).
        backend: "auto", "reference" or a fast backend's name; see `hmx_kernels.registered_backends()`.
        causal, chunk_size, left_context_chunks: causal (token-causal) or chunk-causal mixing
            (hmx_kernels.causal); default: every token mixes every token.
        attn_mask_policy: what a non-None `attn_mask` does. "raise" (default for a layer built
            directly): NotImplementedError, so a causal model never silently mixes future tokens.
            "ignore" (default of `from_speechbrain`): ignore it, exactly as speechbrain's HyperMixing
            does (warns once). "honour": recognise speechbrain's causal mask (get_lookahead_mask)
            or Dynamic Chunk Training mask (make_transformer_src_mask) and mix in that mode; any
            other mask, or one that is not [N, N] for the N tokens, raises. Checked whenever it is
            assigned (layer.attn_mask_policy = "honour").
        sequence_parallel_group: a torch.distributed group whose ranks each hold one contiguous
            slice of every sequence (hmx_kernels.parallel): the state is all-reduced over it and each
            rank gets its slice of the unsplit result. One small all-gather per call gives the
            slice's position offset (unless forward gets `position_offset=`) and checks that every
            rank makes the same call (hmx_kernels.parallel.agree_on_slices); a rank may hold no tokens.

    forward, speechbrain style: `out, None = layer(x, x, x, attn_mask=None, key_padding_mask=mask)`;
    key, value and pos_embs are ignored (query is used for all three); attn_mask per attn_mask_policy.
    forward, idiap style: `out = layer(query, key, value, query_padding_mask, key_padding_mask)`,
    with M queries and N keys/values (M != N allowed).
    Masks are bool [B, length] with True = padded (uint8: non-zero = padded).
    Packed sequences: `layer(tokens, cu_seqlens=cu, max_seqlen=L)` with tokens [total, d] (or
    [1, total, d]) and cu_seqlens int32 [num_seqs + 1] (flash-attn's convention): each sequence
    mixes with itself only, positions from its own start, in the layer's mode
    (hmx_kernels.varlen.hyper_mixing_varlen); no padding masks then.
    Streaming (causal modes, hmx_kernels.streaming): `y, state = layer(piece, state=state)` starting
    from `layer.initial_state()`, or `s = layer.stream(); y = s(piece)`; self-mixing, one padding
    mask (key_padding_mask) per piece; the state carries the mode and the next position.
    """

    def __init__(
        self,
        input_output_dim: int,
        hypernet_size: int,
        tied: bool = False,
        num_heads: int = 1,
        fix_tm_hidden_size: bool = False,
        max_length: int = 3000,
        *,
        variant: str = "speechbrain",
        use_layer_norm: bool = True,
        hypernetwork_bias: Optional[bool] = None,
        backend: str = "auto",
        eps: float = 1e-5,
        causal: bool = False,
        chunk_size: Optional[int] = None,
        left_context_chunks: Optional[int] = None,
        attn_mask_policy: str = "raise",
        sequence_parallel_group=None,
    ) -> None:
        super().__init__()
        v = get_variant(variant)
        check_backend_name(backend)  # a misspelled backend fails here, not at the first forward
        d, k, H = (_size(n, v) for n, v in (("input_output_dim", input_output_dim),
                                             ("hypernet_size", hypernet_size), ("num_heads", num_heads)))
        max_length = _size("max_length", max_length)
        if d <= 0 or k <= 0 or H <= 0:
            raise ValueError(f"input_output_dim, hypernet_size and num_heads must be positive, got {d}, {k}, {H}")
        if d % H != 0:
            raise ValueError(f"input_output_dim ({d}) must be divisible by num_heads ({H})")
        if not fix_tm_hidden_size and k % H != 0:
            raise ValueError(
                f"hypernet_size ({k}) must be divisible by num_heads ({H}) unless fix_tm_hidden_size=True"
            )
        if v.name == "speechbrain" and d % 2 != 0:
            raise ValueError(
                f"the speechbrain variant's sin/cos positional encoding needs an even input_output_dim, got {d}"
            )
        if v.name == "speechbrain" and not use_layer_norm:
            warnings.warn("use_layer_norm=False departs from speechbrain's HyperMixing, which always has it")
        if hypernetwork_bias is None:
            hypernetwork_bias = v.default_hypernetwork_bias
        self.variant = v.name
        self.input_output_dim = d
        self.hypernet_size = k
        self.num_heads = H
        self.head_dim = d // H
        self.hidden_per_head = k if fix_tm_hidden_size else k // H
        self.tied = bool(tied)
        self.fix_tm_hidden_size = bool(fix_tm_hidden_size)
        self.use_layer_norm = bool(use_layer_norm)
        self.hypernetwork_bias = bool(hypernetwork_bias)
        self.backend = backend
        self.mode = resolve_mode(causal, chunk_size, left_context_chunks)
        self.attn_mask_policy = attn_mask_policy  # checked by the property's setter
        self._warned_ignored_mask = False
        self.sequence_parallel_group = sequence_parallel_group
        self.eps = eps
        self.max_length = int(max_length)

        self.hyper = HyperNetwork(H, self.head_dim, self.hidden_per_head, self.tied, self.hypernetwork_bias,
                                  v.name)
        self.layer_norm = nn.LayerNorm(d, eps=eps) if self.use_layer_norm else None
        # the public implementations' PE buffer, under their module name (checkpoint compatibility)
        self.add_module(v.pe_module_name, _PositionalEncodingBuffer(v, self.max_length, d))
        self._warned_key_value = False
        # the backend the last forward ran (None before the first): every route records it, padded,
        # packed (run as they are or padded: hmx_kernels.dispatch.run) and sequence-parallel;
        # hmx_kernels.explain says why
        self.last_backend: Optional[str] = None
        self._dispatch_probe = None  # hmx_kernels.explain: a callable given each call's problem

    def extra_repr(self) -> str:
        return (
            f"input_output_dim={self.input_output_dim}, hypernet_size={self.hypernet_size}, "
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, hidden_per_head={self.hidden_per_head}, "
            f"tied={self.tied}, variant={self.variant!r}, use_layer_norm={self.use_layer_norm}, "
            f"hypernetwork_bias={self.hypernetwork_bias}, backend={self.backend!r}"
        )

    @property
    def attn_mask_policy(self) -> str:
        """"raise", "ignore" or "honour" (see the class docstring); checked on every assignment."""
        policy = self.__dict__.get("_attn_mask_policy")
        # a layer pickled by an earlier version holds the plain attribute
        return policy if policy is not None else _check_policy(self.__dict__.get("attn_mask_policy", "raise"))

    @attn_mask_policy.setter
    def attn_mask_policy(self, policy: str) -> None:
        self._attn_mask_policy = _check_policy(policy)

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        *args,
        attn_mask: Optional[Tensor] = _UNSET,
        key_padding_mask: Optional[Tensor] = _UNSET,
        query_padding_mask: Optional[Tensor] = _UNSET,
        return_attn_weights: Optional[bool] = _UNSET,
        pos_embs: Optional[Tensor] = _UNSET,
        position_offset: Optional[int] = None,
        cu_seqlens: Optional[Tensor] = None,
        max_seqlen: Optional[int] = None,
        state: Optional[StreamingState] = None,
    ):
        # the masks (None = not given; an argument given positionally and by keyword is a TypeError)
        if self.variant == "speechbrain":
            # positional order of speechbrain's forward: attn_mask, key_padding_mask, return_attn_weights, pos_embs
            given = _positional(("attn_mask", "key_padding_mask", "return_attn_weights", "pos_embs"), args,
                                attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                return_attn_weights=return_attn_weights, pos_embs=pos_embs)
            query_padding_mask = None if query_padding_mask is _UNSET else query_padding_mask
        else:
            # idiap: forward(query, key, value, query_padding_mask=None, key_padding_mask=None)
            given = _positional(("query_padding_mask", "key_padding_mask"), args,
                                query_padding_mask=query_padding_mask, key_padding_mask=key_padding_mask)
            query_padding_mask = given["query_padding_mask"]
            given["attn_mask"] = None if attn_mask is _UNSET else attn_mask
        attn_mask, key_padding_mask = given["attn_mask"], given["key_padding_mask"]
        if state is not None:
            return self._mix_stream(query, key, value, args, attn_mask, key_padding_mask, query_padding_mask,
                                    position_offset, cu_seqlens, state)
        if cu_seqlens is not None:
            out = self._mix_packed(query, key, value, attn_mask, key_padding_mask, query_padding_mask,
                                   position_offset, cu_seqlens, max_seqlen)
            return (out, None) if self.variant == "speechbrain" else out
        if self.variant == "speechbrain":
            mode = self._mode_for(attn_mask, query)
            if query_padding_mask is not None:
                raise ValueError(
                    "the speechbrain variant uses one padding mask for all tokens: pass key_padding_mask"
                )
            if not self._warned_key_value and (
                (key is not None and key is not query) or (value is not None and value is not query)
            ):
                warnings.warn(
                    "speechbrain-variant HyperMixing ignores key and value and mixes the query with itself "
                    "(self-mixing); use variant='idiap' for cross-mixing",
                    stacklevel=2,
                )
                self._warned_key_value = True
            out = self._mix(query, None, None, key_padding_mask, None, mode, position_offset)
            return out, None

        mode = self._mode_for(attn_mask, query)
        if key is None:
            key = query
        if value is None:
            value = key
        return self._mix(query, key, value, key_padding_mask, query_padding_mask, mode, position_offset)

    def _mix_packed(self, query, key, value, attn_mask, key_padding_mask, query_padding_mask,
                    position_offset, cu_seqlens, max_seqlen) -> Tensor:
        """Packed sequences (hmx_kernels.varlen): query [total, d] (or [1, total, d]), each
        sequence of cu_seqlens mixed with itself only, in the layer's mode."""
        if attn_mask is not None or key_padding_mask is not None or query_padding_mask is not None:
            raise ValueError("with cu_seqlens the tokens are packed: pass no attn_mask and no padding masks")
        if position_offset or self.sequence_parallel_group is not None:
            raise ValueError("packed sequences (cu_seqlens) do not combine with position offsets or sequence "
                             "parallelism")
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("packed sequences are self-mixing: pass the packed tokens as query only")
        squeeze = query.dim() == 3
        if squeeze and query.shape[0] != 1:
            raise ValueError(f"packed tokens must be [total, d] or [1, total, d], got {list(query.shape)}")
        tokens = query[0] if squeeze else query
        out = _varlen(
            tokens, cu_seqlens, max_seqlen, *self._weights(),
            variant=self.variant, backend=self.backend, use_layer_norm=self.use_layer_norm, eps=self.eps,
            on_chosen=self._record_choice, **_mode_arguments(self.mode),
        )
        return out[None] if squeeze else out

    def _weights(self) -> tuple:
        """The ten parameter tensors of the functional op (w2 None when tied, ln None without)."""
        w1 = self.hyper.w1_gen.tensors()
        w2 = (None, None, None, None) if self.tied else self.hyper.w2_gen.tensors()
        ln = (self.layer_norm.weight, self.layer_norm.bias) if self.layer_norm is not None else (None, None)
        return (*w1, *w2, *ln)

    def _mode_for(self, attn_mask: Optional[Tensor], query: Tensor) -> Optional[MixingMode]:
        """The mixing mode of this call: the layer's own, or the one `attn_mask` describes (an
        honoured mask must be [N, N] for the N tokens of `query`)."""
        if attn_mask is None:
            return self.mode
        if self.attn_mask_policy == "raise":
            raise NotImplementedError(
                "FusedHyperMixing got an attn_mask, which a layer built directly refuses (attn_mask_policy="
                "'raise'), so that a causal model never silently mixes future tokens. speechbrain's HyperMixing "
                "ignores attn_mask: attn_mask_policy='ignore' does the same; attn_mask_policy='honour' runs the "
                "causal or chunk-causal mixing that speechbrain's causal / Dynamic Chunk Training masks describe; "
                "or build the layer with causal=True / chunk_size=..."
            )
        if self.attn_mask_policy == "ignore":
            if not self._warned_ignored_mask:
                warnings.warn(
                    "FusedHyperMixing ignores attn_mask, exactly as speechbrain's HyperMixing does (so a model "
                    "trained with a causal or chunked mask was in fact trained non-causally); set "
                    "layer.attn_mask_policy = 'honour' for real causal / chunk-causal mixing",
                    stacklevel=3,
                )
                self._warned_ignored_mask = True
            return self.mode
        length = query.shape[1] if isinstance(query, Tensor) and query.dim() == 3 else None
        mode = mode_from_attn_mask(attn_mask, length)
        if self.mode is not None and mode != self.mode:
            raise ValueError(
                f"attn_mask describes {mode.describe() if mode else 'non-causal'} mixing but the layer was built "
                f"for {self.mode.describe()} mixing"
            )
        return mode

    def _mix(self, query, key, value, key_padding_mask, query_padding_mask, mode=None,
             position_offset: Optional[int] = None) -> Tensor:
        """hmx_kernels.hyper_mixing's one route (functional.mix), with or without a sequence-parallel
        group (whose all-gather computes the offset when none is given)."""
        return mix(
            (query, key, value, *self._weights()), backend=self.backend, position_offset=position_offset,
            sequence_parallel_group=self.sequence_parallel_group, on_chosen=self._record_choice,
            variant=self.variant, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
            use_layer_norm=self.use_layer_norm, eps=self.eps, **_mode_arguments(mode),
        )

    def _record_choice(self, problem, backend_name: str) -> None:
        """The dispatcher's choice for this call, in `last_backend`: also under torch.compile (Dynamo
        replays the assignment after the graph, no graph break), not while torch.export traces (an
        exported program has no module state to set); and to hmx_kernels.explain's probe."""
        if not torch.compiler.is_exporting():
            self.last_backend = backend_name
        if self._dispatch_probe is not None and not torch.compiler.is_compiling():
            self._dispatch_probe(problem, backend_name)

    # ------------------------------------------------------------------------------------------
    # streaming (hmx_kernels.streaming): the layer's weights, a carried state per batch of sequences
    def initial_state(self, *, causal: bool = False, chunk_size: Optional[int] = None,
                      left_context_chunks: Optional[int] = None) -> StreamingState:
        """A fresh streaming state for this layer: `y, state = layer(piece, state=state)` per piece.

        The mode is the layer's own (causal / chunk_size given at construction); a layer built
        without one (e.g. converted from speechbrain, which gets its mode from attn_mask) takes
        it here. The state records the layer's variant, heads, d_h and k_h at once, and the batch
        size, dtype and device of the first piece."""
        mode = resolve_mode(causal, chunk_size, left_context_chunks)
        if mode is None:
            mode = self.mode
        elif self.mode is not None and mode != self.mode:
            raise ValueError(f"the layer mixes {self.mode.describe()}, so it cannot stream {mode.describe()}")
        if mode is None:
            raise ValueError("streaming needs a causal mode: build the layer with causal=True or chunk_size=..., or "
                             "pass causal=True / chunk_size=... (and left_context_chunks=...) here")
        return StreamingState(mode, variant=self.variant, heads=self.num_heads, head_dim=self.head_dim,
                              hidden_per_head=self.hidden_per_head)

    def stream(self, **mode) -> LayerStream:
        """A `LayerStream` over this layer: `y = s(piece, key_padding_mask=None)` per piece, state kept
        in `s.state`. Keyword arguments as `initial_state`."""
        return LayerStream(self, self.initial_state(**mode))

    def _mix_stream(self, query, key, value, args, attn_mask, key_padding_mask, query_padding_mask,
                    position_offset, cu_seqlens, state) -> tuple:
        """forward with state=: the next piece of every sequence (self-mixing); returns (out, new state)."""
        if not isinstance(state, StreamingState):
            raise TypeError(f"state must be a hmx_kernels.streaming.StreamingState (layer.initial_state()), "
                            f"got {type(state).__name__}")
        if args or attn_mask is not None:
            raise ValueError("with state= pass the padding mask by keyword and no attn_mask: the state carries the "
                             "mixing mode")
        if cu_seqlens is not None or position_offset is not None or self.sequence_parallel_group is not None:
            raise ValueError("with state= the positions continue from the state: packed sequences (cu_seqlens), "
                             "position_offset and sequence parallelism do not combine with streaming")
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("streaming is self-mixing: pass the piece as query only")
        if query_padding_mask is not None and query_padding_mask is not key_padding_mask:
            raise ValueError("streaming is self-mixing: pass the piece's one padding mask as key_padding_mask")
        if state.variant is not None and state.variant != self.variant:
            raise StreamingStateMismatch(f"the {state.describe()} does not fit this layer: variant: the state is "
                                         f"{state.variant!r}, the layer {self.variant!r}")
        if self.mode is not None and state.mode != self.mode:
            raise StreamingStateMismatch(f"the {state.describe()} does not fit this layer, which mixes "
                                         f"{self.mode.describe()}")
        return hyper_mixing_stream(query, *self._weights(), state=state, variant=self.variant,
                                   key_padding_mask=key_padding_mask, use_layer_norm=self.use_layer_norm,
                                   eps=self.eps, backend=self.backend)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_speechbrain(cls, module: nn.Module, *, backend: str = "auto",
                         attn_mask_policy: str = "ignore") -> "FusedHyperMixing":
        """Build from a `speechbrain.nnet.hypermixing.HyperMixing` (duck-typed) with its weights,
        device, dtype, train/eval mode and requires_grad flags. Whole models:
        `hmx_kernels.convert_speechbrain(model)` (hmx_kernels.integrations.speechbrain).

        attn_mask_policy="ignore" (default) reproduces speechbrain exactly, which ignores attn_mask;
        "honour" mixes causally / chunk-causally as the mask says (see the class docstring)."""
        from .integrations.speechbrain import fused_from_speechbrain

        return fused_from_speechbrain(module, backend=backend, attn_mask_policy=attn_mask_policy, cls=cls)

    @classmethod
    def from_idiap(cls, module: nn.Module, *, backend: str = "auto") -> "FusedHyperMixing":
        """Build from an idiap `hypermixing.HyperMixing` (duck-typed) with its weights."""
        try:
            w1 = module.hyper.w1_gen
            d = module.input_output_dim
            H = module.num_heads
            use_ln = bool(module.use_layer_norm)
            bias = bool(module.hypernetwork_bias)
            pe = module.token_information.pe
        except AttributeError as e:
            raise TypeError(f"not an idiap HyperMixing module (custom token_information is not supported): {e}") from None
        tied = bool(getattr(module.hyper, "tied", module.hyper.w2_gen is w1))
        k_h = w1.fc2_weights.shape[1]
        layer = cls(
            d, k_h * H, tied=tied, num_heads=H, max_length=pe.shape[1], variant="idiap",
            use_layer_norm=use_ln, hypernetwork_bias=bias, backend=backend,
            eps=module.layer_norm.eps if use_ln else 1e-5,
        )
        # to the module's dtype before loading: loading first would round float64 weights to float32
        layer = layer.to(device=w1.fc1_weights.device, dtype=w1.fc1_weights.dtype)
        layer.load_state_dict(module.state_dict(), strict=True)
        return layer
