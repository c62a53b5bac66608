"""hf_dreg: the DREG layer-wise Jacobian penalty for Hugging Face Transformers."""

from .config import DREGConfig
from .modeling.hooks import DREGHandle, attach
from .modeling.positions import count_positions
from .modeling.sites import Site, find_sites
from .trainer import DREGTrainer, with_dreg
from .training_args import DREGTrainingArguments

__all__ = ["attach", "count_positions", "find_sites", "DREGHandle", "Site", "DREGConfig", "with_dreg", "DREGTrainer", "DREGTrainingArguments"]
__version__ = "0.1.0"
