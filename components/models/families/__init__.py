"""One module per family; each registers itself with `@register_model`."""
