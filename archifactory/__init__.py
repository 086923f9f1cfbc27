"""ArchiFactory: apples-to-apples ablations of language-model architectures."""

from archifactory.resolvers import register_resolvers

__version__ = "0.1.0"

register_resolvers()
