"""Feed-forward layers. One file per family; each registers its classes with `@register_ffn`."""
