"""Kept for old imports: the shims live in ``locmoe_plugin.demo.cpu_shims``."""
from locmoe_plugin.demo.cpu_shims import install  # noqa: F401
