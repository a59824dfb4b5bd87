"""Datasets and batching for supervised fine-tuning."""

from automodel.data.collate import PadCollator, pad_collate
from automodel.data.dataset import SFTDataset
from automodel.data.squad import make_squad_dataset

__all__ = ["PadCollator", "SFTDataset", "make_squad_dataset", "pad_collate"]
