"""The two public HyperMixing variants and what distinguishes them.

See docs/HYPERMIXING.md (the specification): the variants differ in the hypernetwork input scale,
the positional-encoding formula and its first position, and in whether key/value are used at all.
Everything else (the hypernetwork MLPs, the masks, the mixing, the LayerNorm) is shared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Variant", "VARIANTS", "get_variant"]


@dataclass(frozen=True)
class Variant:
    name: str
    # hypernetwork input is  input_scale(d) * masked_tokens + PE(position)
    scale_by_sqrt_d: bool
    # position of the first token in the positional-encoding table (0 or 1)
    first_position: int
    # True: query is used as key and value (self-mixing only; key/value arguments are ignored)
    self_mixing_only: bool
    # default of the hypernetwork biases (speechbrain always has them)
    default_hypernetwork_bias: bool
    # name of the module that owns the `pe` buffer in the public implementation's state_dict
    pe_module_name: str

    def input_scale(self, d: int) -> float:
        return math.sqrt(d) if self.scale_by_sqrt_d else 1.0


SPEECHBRAIN = Variant(
    name="speechbrain",
    scale_by_sqrt_d=False,
    first_position=0,
    self_mixing_only=True,
    default_hypernetwork_bias=True,
    pe_module_name="positional_encoding",
)
IDIAP = Variant(
    name="idiap",
    scale_by_sqrt_d=True,
    first_position=1,
    self_mixing_only=False,
    default_hypernetwork_bias=False,
    pe_module_name="token_information",
)
VARIANTS = {v.name: v for v in (SPEECHBRAIN, IDIAP)}


def get_variant(variant: "str | Variant") -> Variant:
    if isinstance(variant, Variant):
        return variant
    try:
        return VARIANTS[variant]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown HyperMixing variant {variant!r}; expected one of {sorted(VARIANTS)}"
        ) from None
