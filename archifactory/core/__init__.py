"""The bottom layer: errors, the component registry, hashing. Imports nothing else of the package."""
