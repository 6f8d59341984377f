"""Thin route modules: parse, check the role, call a service or the registry, audit, answer."""
