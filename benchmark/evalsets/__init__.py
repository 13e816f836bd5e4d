"""The built-in evaluation sets, one module per source, each registered with ``@register_eval_set``."""
