"""hf_dreg: the DREG layer-wise Jacobian penalty for Hugging Face Transformers."""

from .attach import DREGHandle, attach
from .args import DREGTrainingArguments
from .sites import Site, find_sites
from .trainer import DREGTrainer

__all__ = ["attach", "find_sites", "DREGHandle", "Site", "DREGTrainer", "DREGTrainingArguments"]
__version__ = "0.1.0"
