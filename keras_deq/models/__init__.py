"""Ready-made models built on `keras_deq` layers."""

from keras_deq.models.language import BitsPerCharacter, DEQTransformerLM, Perplexity

__all__ = ["BitsPerCharacter", "DEQTransformerLM", "Perplexity"]
