"""The built-in evaluation protocols, one module each, registered with ``@register_protocol``."""
