"""Argument dataclasses, one per concern. Training reuses transformers' TrainingArguments for the rest.

Every field has a default and a help text; validation of what argparse can't check lives in __post_init__.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glmtune.errors import UserError

SEED_MODEL = "THUDM/chatglm-6b"  # the seed scripts' model: their entry points default to it


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


def _check_format(name: str | None) -> None:
    from glmtune.data.formats import FORMATS

    if name is not None and name not in FORMATS:
        raise UserError(f"--format {name} is unknown", hint=f"choose one of {', '.join(FORMATS)}")


@dataclass
class ModelArguments:
    model: str | None = field(**_help("Name or path of the base model (a hub name or a local directory). "
                                      "Defaults to the model the dataset or adapter was made with.", default=None))
    trust_remote_code: bool = field(**_help("Run the model repository's own Python code.", default=False))
    quantization_bit: int | None = field(**_help(
        "Load the base model's linear layers quantized with bitsandbytes: 8 (LLM.int8) or 4 (QLoRA: NF4, double "
        "quantization); LoRA and the optimizer stay fp32. On a CUDA GPU, or on CPU (slower than fp32 there).",
        default=None))

    def __post_init__(self) -> None:
        if self.quantization_bit is not None and self.quantization_bit not in (4, 8):
            raise UserError(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}",
                            hint="--quantization_bit 8 (LLM.int8) or 4 (QLoRA NF4); leave it out for no quantization")


@dataclass
class TokenizeArguments:
    """How data files' rows become training samples: `glmtune prepare`'s options, and `glmtune train`'s when
    --dataset_path is a data file (prepared on the fly, see glmtune.data.prepared)."""

    max_seq_length: int = field(**_help("Longest sample in tokens (see --truncation).", default=512))
    truncation: str = field(**_help("Rows longer than --max_seq_length: 'right' cuts the end, 'left' drops the "
                                    "oldest turns (then cuts the start) to keep the last answer, 'drop' leaves "
                                    "the row out.", default="right"))
    format: str | None = field(**_help("Data format (sharegpt, messages, alpaca, prompt_response, "
                                       "prompt_completion, context_target, content_summary, text). Detected "
                                       "from each file's rows when not given.", default=None))
    columns: str | None = field(**_help("Rename the files' fields, e.g. 'question=instruction,answer=output'.",
                                        default=None))
    last_turn_only: bool = field(**_help("Train on the last assistant turn only (default: every one).",
                                         default=False))
    train_on_prompt: bool = field(**_help("Take the loss on the prompts too, not only on the answers.",
                                          default=False))
    skip_bad_rows: bool = field(**_help("Leave bad rows out (counted, and written to a .rejects.jsonl file beside "
                                        "the tokenized dataset) instead of stopping.", default=False))
    val_size: float = field(**_help("Rows held out in a `validation` split: a fraction (below 1) or a count.",
                                    default=0.0))
    num_proc: int | None = field(**_help("Processes that tokenize in parallel.", default=None))

    def __post_init__(self) -> None:
        if self.max_seq_length < 2:
            raise UserError(f"--max_seq_length must be at least 2, got {self.max_seq_length}")
        from glmtune.data.tokenize import TRUNCATION_RULES

        if self.truncation not in TRUNCATION_RULES:
            raise UserError(f"--truncation {self.truncation} is unknown", hint=f"choose {', '.join(TRUNCATION_RULES)}")
        _check_format(self.format)
        self.column_map()  # validates
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise UserError(f"--val_size must be a fraction below 1 or a whole count, got {self.val_size}")
        if self.num_proc is not None and self.num_proc < 1:
            raise UserError(f"--num_proc must be at least 1, got {self.num_proc}")

    def column_map(self) -> dict[str, str]:
        if isinstance(self.columns, dict):  # from a YAML mapping
            return {str(source): str(target) for source, target in self.columns.items()}
        mapping = {}
        for pair in filter(None, (p.strip() for p in (self.columns or "").split(","))):
            source, sep, target = pair.partition("=")
            if not sep or not source.strip() or not target.strip():
                raise UserError(f"--columns: '{pair}' is not of the form file_field=format_field",
                                hint="e.g. --columns question=instruction,answer=output")
            mapping[source.strip()] = target.strip()
        return mapping


@dataclass
class PrepareArguments(TokenizeArguments):
    jsonl_path: list[str] | None = field(**_help(
        "Data file(s): JSON array, JSON lines, CSV or Parquet; several may follow the flag.", default=None))
    save_path: str | None = field(**_help("Directory to write the tokenized dataset to.", default=None))
    dry_run: bool = field(**_help("Print the report and write nothing.", default=False))
    seed: int = field(**_help("Seed of the validation split's shuffle.", default=42))
    use_cache: bool = field(**_help("Reuse the result of an identical earlier run (same data, tokenizer, "
                                    "template and options), kept under HF_HOME/glmtune/prepare.", default=True))
    overwrite_output_dir: bool = field(**_help("Replace --save_path if it exists.", default=False))


@dataclass
class DatasetArguments(TokenizeArguments):
    dataset_path: str | None = field(**_help(
        "Dataset directory written by `glmtune prepare`, or a data file (any format prepare reads), tokenized "
        "here with the options above by the main process alone, into prepare's cache (HF_HOME/glmtune/prepare).",
        default=None))
    overwrite_output_dir: bool = field(**_help("Start afresh in a non-empty --output_dir.", default=False))
    packing: bool = field(**_help("Put a batch's samples end to end in one row, positions restarting at each, with "
                                  "no padding (on for models whose attention keeps packed samples apart; others "
                                  "pad, grouped by length).", default=True))


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class PrecisionArguments:
    precision: str = field(**_help("Weights and compute in auto (bf16 where the GPU or CPU has bf16 units, fp16 on "
                                   "older GPUs, else fp32), fp32, bf16 or fp16 (CUDA only). The LoRA weights and "
                                   "the optimizer stay in fp32. --bf16/--fp16 mean the same as bf16/fp16 here.",
                                   default="auto"))

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision} is unknown", hint=f"choose one of {', '.join(PRECISIONS)}")


@dataclass
class ComputeArguments(PrecisionArguments):
    """train's: the precision, and its own loss (dpo's loss is TRL's)."""

    chunked_loss: bool = field(**_help("Compute the loss in chunks of tokens from the final hidden states, never "
                                       "holding the whole [tokens x vocabulary] logits (same value and gradients).",
                                       default=True))


@dataclass
class LoraArguments:
    lora_rank: int = field(**_help("LoRA rank r.", default=8))
    lora_alpha: float = field(**_help("LoRA scaling alpha (the update is scaled by alpha / r).", default=32))
    lora_dropout: float = field(**_help("Dropout on the LoRA input.", default=0.1))
    target_modules: str | None = field(**_help("Comma-separated module names to adapt, or 'all-linear'. "
                                               "Default: chosen per architecture.", default=None))

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise UserError(f"--lora_rank must be a positive integer, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class InferenceArguments:
    peft_path: str | None = field(**_help("LoRA adapter directory (a `glmtune train` output).", default=None))
    # action "extend": `--prompt A --prompt B` and `--prompt A B` both give [A, B] (argparse would keep only B).
    prompt: list[str] | None = field(default=None, metadata={
        "help": "A prompt to answer; repeat the flag for several.", "action": "extend"})
    input: str | None = field(**_help("Data file whose rows' prompts to answer (any format prepare reads).",
                                      default=None))
    format: str | None = field(**_help("Format of --input; detected when not given.", default=None))
    output: str | None = field(**_help("JSON-lines file to write: each input row plus 'response'. "
                                       "Default: print to standard output.", default=None))
    overwrite_output_dir: bool = field(**_help("Replace --output if it exists.", default=False))
    max_length: int | None = field(**_help("Longest prompt + answer in tokens.", default=None))
    max_new_tokens: int | None = field(**_help("Longest answer in tokens (default 256 unless --max_length).",
                                               default=None))
    temperature: float = field(**_help("Sampling temperature; 0 means greedy decoding.", default=0.0))
    top_p: float = field(**_help("Nucleus sampling probability mass (with temperature > 0).", default=1.0))
    batch_size: int = field(**_help("Prompts generated together.", default=8))
    seed: int = field(**_help("Random seed for sampling.", default=42))

    def __post_init__(self) -> None:
        _check_format(self.format)
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {self.batch_size}")
        for name in ("max_length", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")


@dataclass
class ChatArguments:
    peft_path: str | None = field(**_help("LoRA adapter directory (a `glmtune train` output).", default=None))
    system: str | None = field(**_help("System prompt, at the start of every conversation.", default=None))
    prompt: str | None = field(**_help("Answer this one prompt and exit (no interaction; for scripts).",
                                       default=None))
    max_new_tokens: int | None = field(**_help("Longest answer in tokens (default 256).", default=None))
    temperature: float = field(**_help("Sampling temperature; 0 means greedy decoding.", default=0.0))
    top_p: float = field(**_help("Nucleus sampling probability mass (with temperature > 0).", default=1.0))
    seed: int = field(**_help("Random seed for sampling.", default=42))

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")


MERGE_DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class MergeArguments:
    peft_path: str | None = field(**_help("LoRA adapter directory to fold into the base model (required).",
                                          default=None))
    output_dir: str | None = field(**_help("Directory to write the merged model to (required).", default=None))
    overwrite_output_dir: bool = field(**_help("Replace --output_dir if it exists and is not empty.",
                                               default=False))
    dtype: str = field(**_help("Precision of the saved weights: auto (the base checkpoint's, else fp32), fp32, "
                               "bf16 or fp16.", default="auto"))
    tolerance: float | None = field(**_help("Largest absolute logit difference the proof accepts between the "
                                            "merged model and base + adapter (default: chosen for the dtype).",
                                            default=None))

    def __post_init__(self) -> None:
        if self.dtype not in MERGE_DTYPES:
            raise UserError(f"--dtype {self.dtype} is unknown", hint=f"choose one of {', '.join(MERGE_DTYPES)}")
        if self.tolerance is not None and self.tolerance < 0:
            raise UserError(f"--tolerance must be >= 0, got {self.tolerance}")


# Metrics `glmtune eval` reports (see glmtune.evaluation.metrics); perplexity is the one where lower is better.
EVAL_METRICS = ("bleu-4", "bleu-4-jieba", "rouge-1", "rouge-2", "rouge-l", "exact_match", "perplexity")


@dataclass
class EvalArguments:
    peft_path: str | None = field(**_help("LoRA adapter directory (a `glmtune train` output or one of its "
                                          "checkpoint-* directories).", default=None))
    dataset: str | None = field(**_help("Data file to evaluate on (any format prepare reads): each row's last "
                                        "answer is the reference, what comes before it the prompt (required).",
                                        default=None))
    format: str | None = field(**_help("Format of --dataset; detected when not given.", default=None))
    output_dir: str | None = field(**_help("Directory to write predictions.jsonl and metrics.json to (required).",
                                           default=None))
    overwrite_output_dir: bool = field(**_help("Replace --output_dir if it exists and is not empty.", default=False))
    batch_size: int = field(**_help("Rows generated (and scored for perplexity) together.", default=8))
    max_new_tokens: int = field(**_help("Longest generated answer in tokens.", default=256))
    max_samples: int | None = field(**_help("Evaluate only the first N rows.", default=None))

    def __post_init__(self) -> None:
        _check_format(self.format)
        for name in ("batch_size", "max_new_tokens", "max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")


@dataclass
class GenerationEvalArguments:
    """`glmtune train`'s hook: evaluate each saved checkpoint as `glmtune eval` does, keep the best. The flags share
    the `eval_generate` prefix: TrainingArguments owns `metric_for_best_model` and the other `eval_*` names (its
    loss-based best-model selection), and these must not be mistaken for them."""

    eval_generate: bool = field(**_help("On each checkpoint save, generate answers for the validation split and "
                                        "score them (BLEU, ROUGE, exact match, perplexity); at the end the best "
                                        "checkpoint's adapter becomes the final one.", default=False))
    eval_generate_metric: str = field(**_help(f"Metric that picks the best checkpoint: {', '.join(EVAL_METRICS)} "
                                              "(perplexity: lowest; the others: highest).", default="rouge-l"))
    eval_generate_max_new_tokens: int = field(**_help("Longest generated answer in tokens.", default=128))
    eval_generate_max_samples: int | None = field(**_help("Evaluate only the first N validation rows.",
                                                          default=None))
    eval_generate_batch_size: int = field(**_help("Validation rows generated together.", default=8))

    def __post_init__(self) -> None:
        if self.eval_generate_metric not in EVAL_METRICS:
            raise UserError(f"--eval_generate_metric {self.eval_generate_metric} is unknown",
                            hint=f"choose one of {', '.join(EVAL_METRICS)}")
        for name in ("eval_generate_max_new_tokens", "eval_generate_max_samples", "eval_generate_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")


API_KEY_ENV = "GLMTUNE_API_KEY"


@dataclass
class ServeArguments:
    peft_path: str | None = field(**_help("LoRA adapter directory (a `glmtune train` output).", default=None))
    host: str = field(**_help("Address to listen on; 0.0.0.0 opens the server to other machines.",
                              default="127.0.0.1"))
    port: int = field(**_help("Port to listen on (0: any free port, printed at start).", default=8000))
    api_key: str | None = field(**_help(f"Require 'Authorization: Bearer KEY' on every request (default: the "
                                        f"{API_KEY_ENV} environment variable, which keeps the key out of the "
                                        f"process list; neither: no key).", default=None))
    max_queue: int = field(**_help("Requests that may wait while one is answered; more are answered 429.",
                                   default=64))
    served_model_name: str | None = field(**_help("The model's name in the API (default: the adapter directory's "
                                                  "name, else the model's).", default=None))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0..65535, got {self.port}")
        if self.max_queue < 1:
            raise UserError(f"--max_queue must be at least 1, got {self.max_queue}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise UserError("--served_model_name must not be empty")


DPO_REFERENCES = ("start", "base")


@dataclass
class DpoArguments(TokenizeArguments):
    """`glmtune dpo`'s own options. beta, loss_type and the other preference options are TRL's DPOConfig fields,
    taken from it as they are (declaring them here too would give the parser two --beta)."""

    dataset_path: str | None = field(**_help(
        "Dataset directory of preference pairs written by `glmtune prepare`, or a data file of pairs, tokenized here "
        "with the options above by the main process alone, into prepare's cache (HF_HOME/glmtune/prepare).",
        default=None))
    peft_path: str | None = field(**_help("LoRA adapter to start from and go on training (a `glmtune train` output, "
                                          "e.g. the SFT run); default: a new adapter from the LoRA options.",
                                          default=None))
    reference: str = field(**_help("The reference model the rewards are measured against: 'start' (the model as DPO "
                                   "starts: the base, plus a frozen copy of --peft_path's adapter if given; standard "
                                   "DPO) or 'base' (the base model without any adapter). Neither loads a second copy "
                                   "of the base weights.", default="start"))
    overwrite_output_dir: bool = field(**_help("Start afresh in a non-empty --output_dir.", default=False))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference not in DPO_REFERENCES:
            raise UserError(f"--reference {self.reference} is unknown", hint=f"choose {' or '.join(DPO_REFERENCES)}")
