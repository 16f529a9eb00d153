"""Method plugins: one file per method, each registering itself with ``@register("method", name)``."""
