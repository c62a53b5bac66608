"""hf_dreg: the DREG layer-wise Jacobian penalty for Hugging Face Transformers."""

from .attach import DREGHandle, attach
from .sites import Site, find_sites

__all__ = ["attach", "find_sites", "DREGHandle", "Site"]
__version__ = "0.1.0"
