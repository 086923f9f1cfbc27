"""ArchiFactory: apples-to-apples ablations of language-model architectures."""

__version__ = "0.1.0"
