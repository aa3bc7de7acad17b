"""The options of the training commands (train, dpo) beyond the model, the data and transformers' own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from glmtune.arguments.data import TrainingDataArguments
from glmtune.arguments.model import AdapterArguments, PrecisionArguments
from glmtune.arguments.options import Options, check_at_least_one, option
from glmtune.errors import UserError

# Metrics `glmtune eval` reports (see glmtune.evaluation.metrics); perplexity is the one where lower is better.
EvalMetric = Literal["bleu-4", "bleu-4-jieba", "rouge-1", "rouge-2", "rouge-l", "exact_match", "perplexity"]
EVAL_METRICS: tuple[str, ...] = get_args(EvalMetric)

# What a training run trains: a LoRA adapter, the model's own weights (all, or some blocks), or a P-Tuning v2
# prefix (train/ptuning.py, arguments/ptuning.py).
FinetuningType = Literal["lora", "full", "freeze", "ptuning"]
# peft's init_lora_weights values that need nothing beyond the model (pissa_niter_N is pissa with N fast-SVD
# iterations); eva and corda need calibration data, loftq a LoftQ config, and glmtune gives them none.
LORA_INITS: tuple[str, ...] = ("true", "false", "gaussian", "pissa", "pissa_niter_N", "olora", "orthogonal")
NEEDS_DATA_INITS = {"eva": "calibration data", "corda": "calibration data", "lora_ga": "calibration gradients",
                    "loftq": "a LoftQ config (and an unquantized base)"}

DpoReference = Literal["start", "base"]
DPO_REFERENCES: tuple[str, ...] = get_args(DpoReference)


@dataclass
class ComputeArguments(PrecisionArguments):
    """train's: the precision, and its own loss (dpo's loss is TRL's)."""

    chunked_loss: bool = option("Compute the loss in chunks of tokens from the final hidden states, never holding "
                                "the whole [tokens x vocabulary] logits (same value and gradients).", default=True)


@dataclass
class LoraArguments(Options):
    lora_rank: int = option("LoRA rank r.", default=8)
    lora_alpha: float = option("LoRA scaling alpha (the update is scaled by alpha / r).", default=32)
    lora_dropout: float = option("Dropout on the LoRA input.", default=0.1)
    target_modules: str | None = option("Comma-separated module names to adapt, or 'all-linear'. Default: chosen per "
                                        "architecture.")
    train_router: bool = option("Mixture-of-experts models (glm4_moe): train the router's weights too (saved whole "
                                "with the adapter); by default the router is frozen.", default=False)
    moe_aux_loss_coef: float | None = option("Mixture-of-experts models (glm4_moe): add this weight x a router "
                                             "load-balancing loss (DeepSeek-V3's) to the gradients, to keep a "
                                             "trained router (--train_router) spreading tokens over the experts. "
                                             "Default: off.")
    use_dora: bool = option("DoRA: train each adapted weight's magnitude apart from its direction (peft's "
                            "use_dora); slower per step.", default=False)
    use_rslora: bool = option("rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r (peft's use_rslora), "
                              "which keeps high ranks learning.", default=False)
    init_lora_weights: str = option("How the new adapter starts (peft's init_lora_weights): true (B = 0), false, "
                                    "gaussian, pissa, pissa_niter_N (PiSSA by N fast-SVD iterations), olora, "
                                    "orthogonal. PiSSA and OLoRA move part of each base weight into the adapter; "
                                    "the saved adapter is converted back to a plain LoRA on the original base; "
                                    "both need an unquantized base (no --quantization_bit).",
                                    default="true")
    loraplus_lr_ratio: float | None = option("LoRA+: the B matrices learn this many times faster than the A "
                                             "matrices (--learning_rate); LoRA+'s authors suggest 16. Default: off.")
    finetuning_type: FinetuningType = option("What the run trains: 'lora' (an adapter), 'full' (every weight of "
                                             "the model), 'freeze' (the last --freeze_trainable_layers blocks) or "
                                             "'ptuning' (P-Tuning v2: a learned prefix of keys and values in every "
                                             "layer, see --pre_seq_len; default learning rate 2e-2). full and freeze "
                                             "save a whole model, loaded with --model.", default="lora")
    freeze_trainable_layers: int = option("--finetuning_type freeze: train the last N decoder blocks (negative: "
                                          "the first -N).", default=2)
    freeze_trainable_modules: str = option("--finetuning_type freeze: within those blocks, train only the modules "
                                           "whose names contain one of these comma-separated words (e.g. mlp), or "
                                           "'all'.", default="all")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_rank < 1:
            raise UserError(f"--lora_rank must be a positive integer, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.moe_aux_loss_coef is not None and self.moe_aux_loss_coef <= 0:
            raise UserError(f"--moe_aux_loss_coef must be positive, got {self.moe_aux_loss_coef}",
                            hint="leave it out to train without the balancing loss")
        if isinstance(self.init_lora_weights, bool):  # a YAML config's `init_lora_weights: true`
            self.init_lora_weights = str(self.init_lora_weights).lower()
        check_lora_init(self.init_lora_weights)
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise UserError(f"--loraplus_lr_ratio must be positive, got {self.loraplus_lr_ratio}",
                            hint="LoRA+'s authors suggest 16; leave it out for plain LoRA")
        if self.freeze_trainable_layers == 0:
            raise UserError("--freeze_trainable_layers 0 trains nothing",
                            hint="N > 0 trains the last N blocks, N < 0 the first -N")
        if self.use_dora and lora_init_mutates_base(self.init_lora_weights):
            raise UserError(f"--use_dora with --init_lora_weights {self.init_lora_weights}: the adapter saved for the "
                            "original base can't carry DoRA's magnitudes", hint="use one or the other")
        lora_only = [flag for flag, given in (("--use_dora", self.use_dora), ("--use_rslora", self.use_rslora),
                                              ("--init_lora_weights", self.init_lora_weights.lower() != "true"),
                                              ("--loraplus_lr_ratio", self.loraplus_lr_ratio is not None)) if given]
        if self.finetuning_type != "lora" and lora_only:
            raise UserError(f"{', '.join(lora_only)}: LoRA options, and --finetuning_type is {self.finetuning_type}",
                            hint="leave them out, or --finetuning_type lora")


def check_lora_init(value: str) -> None:
    """--init_lora_weights: one of LORA_INITS (pissa_niter_N with N a whole number).

    Raises:
        UserError: an unknown name, or one of peft's that needs data glmtune does not give it.
    """
    name = value.lower()
    if name in LORA_INITS or (name.startswith("pissa_niter_") and name.removeprefix("pissa_niter_").isdigit()):
        return
    if name in NEEDS_DATA_INITS:
        raise UserError(f"--init_lora_weights {value} needs {NEEDS_DATA_INITS[name]}, which glmtune does not give "
                        "peft", hint=f"choose one of {', '.join(LORA_INITS)}")
    raise UserError(f"--init_lora_weights {value} is unknown", hint=f"choose one of {', '.join(LORA_INITS)}")


def peft_lora_init(value: str) -> bool | str:
    """The value peft's LoraConfig takes: true/false as booleans, the names as they are."""
    name = value.lower()
    return {"true": True, "false": False}.get(name, name)


def lora_init_mutates_base(value: str) -> bool:
    """PiSSA and OLoRA take their start from the base weights and subtract it from them: the trained adapter fits the
    changed base, and must be converted to fit the original one (train/skeleton.py, save_final)."""
    return value.lower().startswith("pissa") or value.lower() == "olora"


@dataclass
class GenerationEvalArguments(Options):
    """`glmtune train`'s hook: evaluate each saved checkpoint as `glmtune eval` does, keep the best. The flags share
    the `eval_generate` prefix: TrainingArguments owns `metric_for_best_model` and the other `eval_*` names (its
    loss-based best-model selection), and these must not be mistaken for them."""

    eval_generate: bool = option("On each checkpoint save, generate answers for the validation split and score them "
                                 "(BLEU, ROUGE, exact match, perplexity); at the end the best checkpoint's adapter "
                                 "becomes the final one.", default=False)
    eval_generate_metric: EvalMetric = option("Metric that picks the best checkpoint (perplexity: lowest; the "
                                              "others: highest).", default="rouge-l")
    eval_generate_max_new_tokens: int = option("Longest generated answer in tokens.", default=128)
    eval_generate_max_samples: int | None = option("Evaluate only the first N validation rows.")
    eval_generate_batch_size: int = option("Validation rows generated together.", default=8)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least_one(self, "eval_generate_max_new_tokens", "eval_generate_max_samples",
                           "eval_generate_batch_size")


@dataclass
class DpoArguments(TrainingDataArguments, AdapterArguments):
    """`glmtune dpo`'s own options. beta, loss_type and the other preference options are TRL's DPOConfig fields,
    taken from it as they are (declaring them here too would give the parser two --beta)."""

    help_overrides = {
        "peft_path": "LoRA adapter to start from and go on training (a `glmtune train` output, e.g. the SFT run); "
                     "default: a new adapter from the LoRA options.",
        "dataset_path": "Dataset directory of preference pairs written by `glmtune prepare`, or a data file of pairs, "
                        "tokenized here with the options above by the main process alone, into prepare's cache "
                        "(HF_HOME/glmtune/prepare).",
    }

    reference: DpoReference = option("The reference model the rewards are measured against: 'start' (the model as "
                                     "DPO starts: the base, plus a frozen copy of --peft_path's adapter if given; "
                                     "standard DPO) or 'base' (the base model without any adapter). Neither loads a "
                                     "second copy of the base weights.", default="start")


NanPolicy = Literal["stop", "skip"]


@dataclass
class HealthArguments(Options):
    """What a training run does when its loss or gradients stop being finite numbers (train/health.py)."""

    nan_policy: NanPolicy = option("On a NaN or infinite gradient: 'stop' the run there with a diagnosis (the "
                                   "checkpoints saved before it are kept), or 'skip' that update and go on (counted "
                                   "in the manifest; the run stops after --nan_max_skips of them).", default="stop")
    nan_max_skips: int = option("With --nan_policy skip (and in fp16, whose loss scaler skips overflowing updates "
                                "itself): how many non-finite updates in a row are tolerated before the run stops.",
                                default=10)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least_one(self, "nan_max_skips")
