"""The options of the commands that use a model: infer, chat, eval, serve and merge."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.arguments.data import DataFormatArguments
from glmtune.arguments.generation import GenerationArguments, SamplingArguments, ThinkingArguments
from glmtune.arguments.model import AdapterArguments, Precision
from glmtune.arguments.network import ListenArguments
from glmtune.arguments.options import Options, check_at_least_one, option
from glmtune.arguments.output import OutputDirArguments, OverwriteArguments
from glmtune.arguments.run import BatchArguments
from glmtune.errors import UserError

API_KEY_ENV = "GLMTUNE_API_KEY"
# --dtype of merge -> the torch dtype's name (auto: the base checkpoint's own).
MERGE_DTYPES: dict[Precision, str | None] = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class PromptArguments(Options):
    # action "extend": `--prompt A --prompt B` and `--prompt A B` both give [A, B] (argparse would keep only B).
    prompt: list[str] | None = option("A prompt to answer; repeat the flag for several.", action="extend")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.prompt, str):  # one prompt given from Python
            self.prompt = [self.prompt]


@dataclass
class InferenceArguments(BatchArguments, OverwriteArguments, PromptArguments, ThinkingArguments, SamplingArguments,
                         GenerationArguments, DataFormatArguments, AdapterArguments):
    help_overrides = {"overwrite_output_dir": "Replace --output if it exists.",
                      "batch_size": "Prompts generated together."}

    input: str | None = option("Data file whose rows' prompts to answer (any format prepare reads).")
    output: str | None = option("JSON-lines file to write: each input row plus 'response'. Default: print to "
                                "standard output.")
    max_length: int | None = option("Longest prompt + answer in tokens.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least_one(self, "max_length")


@dataclass
class ChatArguments(PromptArguments, ThinkingArguments, SamplingArguments, GenerationArguments, AdapterArguments):
    # Several prompts are one conversation, as lines piped into chat are: chat keeps the history, infer does not.
    help_overrides = {"prompt": "Answer this prompt and exit (no interaction; for scripts); repeat the flag to "
                                "answer several in turn, as one conversation."}

    system: str | None = option("System prompt, at the start of every conversation.")


@dataclass
class MergeArguments(OverwriteArguments, OutputDirArguments, AdapterArguments):
    help_overrides = {"peft_path": "LoRA adapter directory to fold into the base model (required).",
                      "output_dir": "Directory to write the merged model to (required)."}

    dtype: Precision = option("Precision of the saved weights: auto (the base checkpoint's, else fp32), fp32, bf16 "
                               "or fp16.", default="auto")
    tolerance: float | None = option("Largest absolute logit difference the proof accepts between the merged model "
                                     "and base + adapter (default: chosen for the dtype).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tolerance is not None and self.tolerance < 0:
            raise UserError(f"--tolerance must be >= 0, got {self.tolerance}")


@dataclass
class EvalArguments(BatchArguments, OverwriteArguments, OutputDirArguments, ThinkingArguments, GenerationArguments,
                    DataFormatArguments, AdapterArguments):
    """Greedy decoding: eval has no sampling options. Its --max_new_tokens default (256) is the command's."""

    help_overrides = {"output_dir": "Directory to write predictions.jsonl and metrics.json to (required).",
                      "batch_size": "Rows generated (and scored for perplexity) together."}

    dataset: str | None = option("Data file to evaluate on (any format prepare reads): each row's last answer is "
                                 "the reference, what comes before it the prompt (required).")
    max_samples: int | None = option("Evaluate only the first N rows.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least_one(self, "max_samples")


@dataclass
class ServeArguments(ListenArguments, ThinkingArguments, AdapterArguments):
    help_overrides = {"enable_thinking": "Think before answering (true) or answer at once (false), for models whose "
                                         "chat template has this switch; others refuse it. A request's "
                                         "chat_template_kwargs {\"enable_thinking\": ...} wins. Default: the "
                                         "template's own."}

    api_key: str | None = option(f"Require 'Authorization: Bearer KEY' on every request (default: the {API_KEY_ENV} "
                                 "environment variable, which keeps the key out of the process list; neither: no "
                                 "key).")
    max_queue: int = option("Requests that may wait in line while the batch is full, and that may be read and "
                            "checked at once; more are answered 429.", default=64)
    max_request_bytes: int = option("Largest request body in bytes; a larger one is answered 413.",
                                    default=2 * 1024 * 1024)
    max_messages: int = option("Most messages in one request; more are answered 400.", default=1024)
    max_prompt_tokens: int | None = option("Longest prompt in tokens, as the chat template renders it; longer are "
                                           "answered 400 (default: the model's context).")
    max_tokens_limit: int = option("Largest max_tokens (or max_completion_tokens) a request may ask; more is "
                                   "answered 400.", default=4096)
    max_n: int = option("Most choices (n) in one request; more are answered 400 (OpenAI's own limit is 128; the "
                        "choices are generated together, each a row of the batch).", default=16)
    max_batch_size: int = option("Most answers generated together (each choice of each request is one); requests "
                                 "past it wait in line.", default=16)
    max_batch_tokens: int = option("Most key/value cache positions of the running batch, counted as answers x the "
                                   "longest prompt + max_tokens among them; requests past it wait in line (one "
                                   "larger than it runs alone).", default=16384)
    served_model_name: str | None = option("The model's name in the API (default: the adapter directory's name, else "
                                           "the model's).")
    adapter: list[str] | None = option("Serve a LoRA adapter of this base model under a name of its own: NAME=PATH; "
                                       "repeat the flag for several. A request's model picks one; the base model "
                                       "answers alone under its name (with --peft_path: --peft_path's adapter "
                                       "answers under that name, the base alone under the base's).",
                                       action="extend")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0..65535, got {self.port}")
        check_at_least_one(self, "max_queue", "max_request_bytes", "max_messages", "max_prompt_tokens",
                           "max_tokens_limit", "max_n", "max_batch_size", "max_batch_tokens")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise UserError("--served_model_name must not be empty")
        if self.adapter:
            from glmtune.serve.adapters import parse_adapter_specs

            parse_adapter_specs(self.adapter)  # every malformed value, duplicate or missing directory, now
