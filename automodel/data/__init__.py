"""Datasets and batching for supervised fine-tuning."""

from automodel.batch import PadCollator, pad_collate
from automodel.data.chat import make_chat_dataset
from automodel.data.dataset import SFTDataset
from automodel.data.instruction import make_instruction_dataset
from automodel.data.packing import PackingCollator
from automodel.data.squad import make_squad_dataset

__all__ = ["PackingCollator", "PadCollator", "SFTDataset", "make_chat_dataset", "make_instruction_dataset",
           "make_squad_dataset", "pad_collate"]
