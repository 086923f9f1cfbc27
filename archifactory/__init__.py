"""ArchiFactory: apples-to-apples ablations of language-model architectures."""

from archifactory.config.resolvers import register_resolvers
from archifactory.hf.auto import install as _install_auto_classes

__version__ = "0.1.0"

register_resolvers()
# transformers' AutoConfig / AutoModelForCausalLM learn model_type "archifactory" once they load
_install_auto_classes()
