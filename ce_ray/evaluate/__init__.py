"""Evaluation against classical inpainting: the paper's tile protocol and whole photos with painted holes."""
