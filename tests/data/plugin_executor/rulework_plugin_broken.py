"""A plugin module whose optional dependency is missing: importing it fails."""

import rulework_plugin_missing_dependency  # noqa: F401  (deliberately not installed)
