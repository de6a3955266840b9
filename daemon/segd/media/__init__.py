"""Bytes to pixels to vectors: image formats, decoding, the embedder."""
