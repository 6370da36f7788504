"""Plugins: pluggy hooks (`hookspecs`), the plugin manager factory (`manager`), the L7 filter API
(`filters`) and the built-in filters: retries, timeout, ratelimit, fault, headers.

Third-party packages declare an entry point in the `meshd` group and mark functions with `hookimpl`.
"""

from meshd.plugins.hookspecs import hookimpl

__all__ = ["hookimpl"]
