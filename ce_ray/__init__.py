"""ce-ray: train, tune and serve Context Encoders (Pathak et al., CVPR 2016) on Ray."""

__version__ = "0.1.0"
