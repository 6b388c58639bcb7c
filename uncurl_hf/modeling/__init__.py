"""Model classes that uncurl-hf writes: importing this package registers them with the Auto classes."""

from uncurl_hf.modeling import pruned_decoder_moe  # noqa: F401  (registers on import)
from uncurl_hf.modeling import pruned_switch_transformers  # noqa: F401  (registers on import)
from uncurl_hf.modeling.kernels import experts_implementation

__all__ = ["experts_implementation"]
