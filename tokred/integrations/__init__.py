"""Integrations of tokred with inference engines other than ``transformers``' own ``generate``."""
