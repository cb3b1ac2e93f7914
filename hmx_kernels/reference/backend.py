"""Registers the reference implementation as the `reference` backend (any device, any float dtype)."""
from __future__ import annotations

from torch import Tensor

from ..dispatch import Backend, register_backend
from ..validation import HyperMixingProblem
from .hyper_mixing import hyper_mixing_ref


def reference_forward(p: HyperMixingProblem) -> Tensor:
    return hyper_mixing_ref(
        p.query, p.key, p.value, *p.weights(),
        variant=p.variant.name,
        key_padding_mask=p.key_padding_mask,
        query_padding_mask=p.query_padding_mask,
        use_layer_norm=p.use_layer_norm,
        eps=p.eps,
    )


register_backend(
    Backend(
        name="reference",
        description="plain PyTorch (fp32 compute, materialises W1/W2: O(N*k) memory); any device",
        forward=reference_forward,
    )
)
