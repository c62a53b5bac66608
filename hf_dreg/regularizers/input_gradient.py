"""IGPen: the input-gradient penalty, mean over examples of ||d task_loss_b / d x_b||^2.

x is the token embeddings for text and the pixel values for images. The gradient is taken with
``create_graph=True`` so that the penalty can be trained (double backward): this costs about two
extra backward passes, and needs an attention implementation with double backward (eager).
"""

from __future__ import annotations

import torch
from transformers.utils import logging

from .base import Penalty, Regularizer, batch_mean_of_squares, model_inputs_with_grad, needs_double_backward

logger = logging.get_logger(__name__)


class InputGradient(Regularizer):
    name = "igpen"
    default_strength = 0.01

    def __init__(self, model, args):
        needs_double_backward(model, self.name, logger)

    def compute(self, model, inputs, task_loss, step):
        if not (model.training and torch.is_grad_enabled()):
            loss, outputs = task_loss(model, inputs)
            return loss, outputs, Penalty()
        inputs, x = model_inputs_with_grad(model, inputs)
        loss, outputs = task_loss(model, inputs)
        # scale the task loss to a sum over examples to get each example's own gradient: by the batch size
        # for a per-batch mean, by the step's item count for a loss normalised over the whole step
        scale = step.example_scale if step.example_scale is not None else x.shape[0]
        (grad,) = torch.autograd.grad(loss * scale, x, create_graph=True)
        value = batch_mean_of_squares(grad)
        return loss, outputs, Penalty(term=value, value=value.detach())
