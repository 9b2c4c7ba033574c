"""The megatron-core CPU shims the demo installs; they live in :mod:`locmoe_plugin.testing.cpu_shims`
(public, with a context manager). ``install()`` applies them for the rest of the process."""

from ..testing.cpu_shims import install, installed, megatron_cpu_shims

__all__ = ["install", "installed", "megatron_cpu_shims"]
