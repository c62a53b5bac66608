"""What the model sees: raw text or image splits turned into model inputs, and the model to match.

:class:`Featurizer` is the one place that decides text vs images (an image column present), tokenizes or
pre-processes, adds the seeded evaluation-time noise, and builds fresh models with the data set's labels;
classification, tuning and the study's baseline selection all go through it.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf
from datasets import ClassLabel, Dataset

from .data import add_image_noise, add_text_noise
from .models import ModelArguments, build_image_processor, build_model, build_tokenizer


def is_image_data(ds: Dataset, data_args) -> bool:
    return data_args.image_column in ds.column_names


def label_names(ds: Dataset, label_column: str) -> list[str]:
    feature = ds.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(ds[label_column]))]


def image_shape(ds: Dataset, column: str) -> tuple[int, int, int]:
    array = np.asarray(ds[0][column])
    return (1, *array.shape) if array.ndim == 2 else (array.shape[2], array.shape[0], array.shape[1])


def text_features(ds: Dataset, data_args, model_args: ModelArguments, tokenizer) -> Dataset:
    def tokenize(batch):
        out = tokenizer(batch[data_args.text_column], truncation=True, max_length=model_args.max_seq_length)
        out["labels"] = batch[data_args.label_column]
        return out

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")


def image_features(ds: Dataset, data_args, processor, noise: float = 0.0, seed: int = 0) -> Dataset:
    """Pixel values as the model sees them (with seeded Gaussian noise of std ``noise``) and labels."""

    def transform(batch, indices):
        out = processor(images=batch[data_args.image_column], return_tensors="pt")
        pixels = out["pixel_values"]
        if noise > 0:
            pixels = torch.stack(
                [add_image_noise(p, noise, torch.Generator().manual_seed(seed * 1_000_003 + i)) for p, i in zip(pixels, indices)]
            )
        return {"pixel_values": pixels, "labels": batch[data_args.label_column]}

    columns = [data_args.image_column, data_args.label_column]
    return ds.map(transform, batched=True, with_indices=True, remove_columns=columns, desc="pixels").with_format("torch")


def noisy_text(dataset: Dataset, tokenizer, p: float, seed: int) -> Dataset:
    """Tokenized text with each token replaced by a random vocabulary token with probability ``p`` (seeded)."""
    special = list(tokenizer.all_special_ids)

    def corrupt(batch, indices):
        rows = []
        for ids, i in zip(batch["input_ids"], indices):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            rows.append(add_text_noise(torch.tensor(ids), None, p, len(tokenizer), special, g).tolist())
        return {"input_ids": rows}

    return dataset.map(corrupt, batched=True, with_indices=True, desc="text noise")


class Featurizer:
    """Turns raw splits into what the model sees, and builds fresh models (text or images).

    Built from the training split (its columns decide text vs images; its labels the classes):
    ``processor`` (tokenizer or image processor) and ``collator`` are the Trainer's.
    """

    def __init__(self, model_args: ModelArguments, data_args, train: Dataset):
        self.model_args, self.data_args = model_args, data_args
        self.images = is_image_data(train, data_args)
        self.id2label = dict(enumerate(label_names(train, data_args.label_column)))
        if self.images:
            self.shape = image_shape(train, data_args.image_column)
            self.processor = build_image_processor(model_args, self.shape)
            self.collator = tf.DefaultDataCollator()
        else:
            self.shape = None
            self.processor = build_tokenizer(model_args)
            self.collator = tf.DataCollatorWithPadding(self.processor)

    def features(self, raw: Dataset, noise: float = 0.0, seed: int = 0) -> Dataset:
        """``raw`` as model inputs; ``noise > 0``: with the seeded evaluation-time input noise."""
        if self.images:
            return image_features(raw, self.data_args, self.processor, noise, seed)
        features = text_features(raw, self.data_args, self.model_args, self.processor)
        return noisy_text(features, self.processor, noise, seed) if noise > 0 else features

    def model_init(self):
        return build_model(self.model_args, len(self.id2label), self.id2label, image_shape=self.shape)
