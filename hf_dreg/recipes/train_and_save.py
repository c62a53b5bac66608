"""The end of a fine-tuning script: train, evaluate, save the model, metrics, state and model card (or push)."""

from __future__ import annotations

from ..metrics import perplexity
from ..model_card import metric_results


def train_evaluate_save(trainer, training_args, train_examples: int, eval_examples: int | None, eval_kwargs=None, card_kwargs=None):
    """Train (resuming from ``--resume_from_checkpoint``), evaluate with ``eval_kwargs`` (adding ``perplexity``
    = exp(eval_loss)), save the metrics and the state, then the model and its card, or push both with
    ``--push_to_hub``. Returns (train metrics, eval metrics)."""
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_metrics = dict(train_result.metrics)
    train_metrics["train_examples"] = train_examples
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()

    eval_metrics = {}
    if eval_examples is not None:
        eval_metrics = trainer.evaluate(**(eval_kwargs or {}))
        eval_metrics["perplexity"] = perplexity(eval_metrics["eval_loss"])
        eval_metrics["eval_examples"] = eval_examples
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        trainer.run_info["results"] = metric_results(eval_metrics)

    if training_args.push_to_hub:
        trainer.push_to_hub(**(card_kwargs or {}))  # saves the model and the card, then uploads the output folder
    else:
        trainer.save_model()
        trainer.create_model_card(**(card_kwargs or {}))
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers
        trainer.end()
    return train_metrics, eval_metrics
