"""Integrations with toolkits that build models around HyperMixing (speechbrain). Each submodule
imports its toolkit lazily or not at all (duck typing), so importing hmx_kernels never needs them."""
