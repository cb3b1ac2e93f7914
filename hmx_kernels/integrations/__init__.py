"""Integrations with other toolkits (speechbrain). Each submodule imports its toolkit lazily or
not at all (duck typing), so importing hmx_kernels never needs them."""
