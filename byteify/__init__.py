"""byteify: turn a pretrained Llama-family checkpoint into a Byte Latent Transformer (BLT)."""

__version__ = "0.1.0"
