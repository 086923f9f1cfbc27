"""Token mixers. One file per family; each registers its classes with `@register_mixin`."""
