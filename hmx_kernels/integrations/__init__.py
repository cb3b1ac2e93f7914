"""Integrations with toolkits that build models around HyperMixing (speechbrain)."""
