"""The built-in backends: cache backends (`memory`, `sqlite`, `s3`) and process executors
(`local`, `ssh`, `container`).

Nothing here is imported eagerly: the engine finds every backend, built-in or third-party, by
name through the entry-point registry (`rulework.engine.registry`), which imports a backend's
module only when a configuration selects it, so an optional dependency that is not installed
costs nothing until then.
"""
