"""Load a base model with an optional LoRA adapter and answer conversations: in batches, or one streamed.

Prompts are built by the same template code as training (`encode_prompt`), so they match token for token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.artifacts import MANIFEST, read_json_object
from glmtune.data.conversation import Conversation
from glmtune.data.templates import encode_prompt
from glmtune.errors import UserError
from glmtune.inference.answers import AnswerParser
from glmtune.inference.batch_generation import BatchGenerator, supports_batched_steps
from glmtune.inference.decoding import AnswerDecoder
from glmtune.inference.streaming import Completion, TextStream, count_completion
from glmtune.inference.tool_calls import tool_call_form
from glmtune.models.hub import canonical_model_name
from glmtune.models.loading import load_model, load_tokenizer, stop_token_ids, tokenizer_fingerprint

DEFAULT_MAX_NEW_TOKENS = 256
BASE_ADAPTER = "__base__"  # peft's name, in adapter_names, for a row answered by the base model alone


@dataclass
class GenerationSettings:
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + answer; max_new_tokens wins when both are given
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    enable_thinking: bool | None = None  # the chat template's thinking switch; None: the template's default
    # Which loaded adapter answers (serve's --adapter): its peft name, or BASE_ADAPTER for none; None: the model as
    # loaded (its active adapter, if any).
    adapter: str | None = None


class Engine:
    """A loaded model (base, or base + adapter), its tokenizer and stop ids: what infer, chat, serve and eval ask."""

    def __init__(self, model: str | None, peft_path: str | None = None, trust_remote_code: bool = False,
                 quantization_bit: int | None = None):
        """Load the tokenizer, then the model in eval mode, with the adapter on it when one is given.

        Args:
            model: --model; None for the base model the adapter's config names.
            peft_path: a LoRA adapter directory (a training run's output or one of its checkpoints).
            trust_remote_code: run the checkpoint's own code instead of glmtune's loaders.
            quantization_bit: 8 or 4 to load the base quantized (bitsandbytes).
        Raises:
            UserError: no model named, the model or adapter can't be loaded, the adapter was trained with another
                tokenizer, or the model defines no stop token.
        """
        from peft import PeftModel

        from glmtune.models.prefix import enable_prefix_generation

        adapter_base = adapter_base_model(Path(peft_path)) if peft_path else None
        if not (model or adapter_base):
            raise UserError("--model is required (or --peft_path, whose adapter names its base model)")
        self.model_name = canonical_model_name(model or adapter_base)
        self.tokenizer = load_tokenizer(self.model_name, trust_remote_code)
        if peft_path:
            check_adapter_tokenizer(Path(peft_path), self.tokenizer, self.model_name)
        self.stop_ids = stop_token_ids(self.model_name, self.tokenizer)
        self.model = load_model(self.model_name, trust_remote_code, quantization_bit=quantization_bit)
        if peft_path:
            self.model = PeftModel.from_pretrained(self.model, peft_path)
            enable_prefix_generation(self.model)  # a P-Tuning v2 prefix: generate() must start from it
        self.model.eval()

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Answer as the base model would (the demo's "before tuning")."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            yield

    def generate(self, conversations: list[Conversation], settings: GenerationSettings,
                 batch_size: int = 8, progress: bool = True) -> list[str]:
        """One answer per conversation, in order: complete()'s texts (same arguments and errors)."""
        return [c.text for c in self.complete(conversations, settings, batch_size, progress)]

    def complete(self, conversations: list[Conversation], settings: GenerationSettings,
                 batch_size: int = 8, progress: bool = True) -> list[Completion]:
        """One answer per conversation, in order, with its token counts. Batches hold prompts of similar length
        (less padding).

        Args:
            conversations: each answered after its last message (a trailing assistant answer is left out).
            settings: the answer's budget and sampling (temperature 0: greedy).
            batch_size: prompts generated together.
            progress: show a progress bar (unless --quiet turned bars off).
        Raises:
            UserError: a prompt the chat template can't render, an empty prompt, or --max_length that leaves
                a prompt no room; checked for every conversation before anything is generated.
        """
        prompts = [encode_prompt(self.tokenizer, c.prompt_part(), settings.enable_thinking) for c in conversations]
        budgets = [self._answer_budget(settings, prompt, c) for prompt, c in zip(prompts, conversations, strict=True)]
        parsers = [answer_parser(self.tokenizer, prompt, c.tools) for prompt, c in zip(prompts, conversations,
                                                                                      strict=True)]
        return generate_batched(self.model, self.tokenizer, self.stop_ids, prompts, budgets, settings, batch_size,
                                progress, parsers)

    def stream(self, conversation: Conversation, settings: GenerationSettings,
               stop_strings: list[str] | None = None, logprobs: int | None = None) -> TextStream:
        """One answer, as text pieces while it is generated (see TextStream). The prompt is checked now;
        generation starts when iteration does. `stop_strings` end generation at the token that completes one of
        them (transformers' StopStringCriteria); the text still holds it, for the caller to cut, and the
        completion's finish_reason stays "length" unless a stop token came first. `logprobs`: record each token's
        log-probability and this many most likely tokens' (TextStream.logprobs); None: none.

        Raises:
            UserError: a prompt the chat template can't render, an empty prompt, or --max_length that leaves it
                no room.
        """
        prompt, budget, parser = self.prepare(conversation, settings)
        return self._stream(prompt, budget, settings, stop_strings, logprobs, parser)

    def stream_prompt(self, prompt: list[int], settings: GenerationSettings, stop_strings: list[str] | None = None,
                      logprobs: int | None = None) -> TextStream:
        """As `stream`, for a prompt that is already token ids (a text completion: no chat template); the answer
        is read as plain text (no reasoning or tool calls split off)."""
        return self._stream(prompt, self.prompt_budget(prompt, settings), settings, stop_strings, logprobs,
                            AnswerParser())

    def prepare(self, conversation: Conversation, settings: GenerationSettings) -> tuple[list[int], int, AnswerParser]:
        """One answer's prompt ids, its budget of new tokens and its parser (stream()'s checks and errors)."""
        prompt = encode_prompt(self.tokenizer, conversation.prompt_part(), settings.enable_thinking)
        budget = self._answer_budget(settings, prompt, conversation)
        return prompt, budget, answer_parser(self.tokenizer, prompt, conversation.tools)

    def prompt_budget(self, prompt: list[int], settings: GenerationSettings) -> int:
        """New tokens allowed after a prompt of token ids (stream_prompt()'s checks and errors)."""
        return self._answer_budget(settings, prompt, Conversation(messages=[]))

    def batch_generator(self) -> BatchGenerator | None:
        """A continuous batch over this model (see batch_generation), or None for a model whose cache rows can't
        be joined (then answers are generated one at a time)."""
        if not supports_batched_steps(self.model):
            return None
        return BatchGenerator(self.model, self.stop_ids)

    def _stream(self, prompt: list[int], budget: int, settings: GenerationSettings, stop_strings: list[str] | None,
                logprobs: int | None, parser: AnswerParser) -> TextStream:
        input_ids, attention_mask = left_pad([prompt], self.tokenizer.pad_token_id)  # (1, prompt)
        config = generation_config(settings, budget, self.stop_ids, self.tokenizer.pad_token_id)
        if stop_strings:
            config.stop_strings = stop_strings
        return TextStream(self.model, self.tokenizer, input_ids, attention_mask, config, self.stop_ids, parser,
                          logprobs, generation_kwargs_for([settings.adapter]))

    def _answer_budget(self, settings: GenerationSettings, prompt: list[int], conversation: Conversation) -> int:
        """New tokens allowed for one prompt; checked for every prompt before anything is generated."""
        where = f"{conversation.location}: " if conversation.location else ""
        if not prompt:
            raise UserError(f"{where}the prompt is empty", hint="give every row a non-empty prompt")
        if settings.max_new_tokens is not None:
            return settings.max_new_tokens
        if settings.max_length is None:
            return DEFAULT_MAX_NEW_TOKENS
        if settings.max_length <= len(prompt):
            raise UserError(f"{where}--max_length {settings.max_length} leaves no room for an answer after a "
                            f"{len(prompt)}-token prompt", hint="raise --max_length or use --max_new_tokens")
        return settings.max_length - len(prompt)


def answer_parser(tokenizer: Any, prompt: list[int], tools: list[dict[str, Any]] | None = None) -> AnswerParser:
    """How the answer to this prompt is split: the call form of the model's template, the tools offered, and
    whether the prompt ends inside a think block (a template that opens it for the model)."""
    tail = tokenizer.decode(prompt[-4:], skip_special_tokens=False).rstrip()
    return AnswerParser(tool_call_form(getattr(tokenizer, "chat_template", None)), tools, tail.endswith("<think>"))


def generate_batched(model: Any, tokenizer: Any, stop_ids: list[int], prompts: list[list[int]], budgets: list[int],
                     settings: GenerationSettings, batch_size: int = 8, progress: bool = True,
                     parsers: list[AnswerParser] | None = None) -> list[Completion]:
    """Answers to prompt ids, in order, each within its own budget of new tokens. Batches hold prompts of similar
    length (less padding), left-padded. The engine's path, and train's evaluation hook's (which has only ids).
    `parsers` split each answer (default: by the tokenizer's template, no tools)."""
    import torch
    from tqdm.auto import tqdm

    from glmtune.logs import progress_bars_enabled

    decoder = AnswerDecoder(tokenizer)
    parsers = parsers or [answer_parser(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, Completion] = {}
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="Generating", unit="batch", disable=not (progress and progress_bars_enabled())):
        input_ids, attention_mask = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id)
        config = generation_config(settings, max(budgets[i] for i in batch), stop_ids, tokenizer.pad_token_id)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids.to(model.device),
                                    attention_mask=attention_mask.to(model.device), generation_config=config,
                                    **generation_kwargs_for([settings.adapter] * len(batch)))
        for row, index in enumerate(batch):
            # Each answer keeps its own budget, whatever it was batched with.
            new_tokens = output[row, input_ids.shape[1]:][: budgets[index]]
            parts = parsers[index].parse(decoder.decode(new_tokens.tolist()))
            answers[index] = count_completion(parts, len(prompts[index]), new_tokens.tolist(), stop_ids)
    return [answers[i] for i in range(len(prompts))]


def generation_kwargs_for(adapters: list[str | None]) -> dict[str, Any]:
    """generate()'s (and forward's) keywords that pick each row's adapter: peft's `adapter_names`, one per row
    (BASE_ADAPTER for the base alone), so that rows for different adapters share one batch. peft mixes adapters
    only for LoRA on linear, embedding and conv layers, unmerged, without DoRA (serve checks each adapter it loads);
    with n samples per row, repeat the row's name n times. All None (the model as loaded): no keyword."""
    if all(a is None for a in adapters):
        return {}
    if any(a is None for a in adapters):
        raise ValueError(f"every row of a batch names its adapter, or none does; got {adapters}")
    return {"adapter_names": list(adapters)}


def left_pad(prompts: list[list[int]], pad: int) -> tuple[Any, Any]:
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)  # (batch, width)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return input_ids, attention_mask


def generation_config(settings: GenerationSettings, max_new: int, stop_ids: list[int], pad: int) -> Any:
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} \
        if settings.temperature > 0 else {"do_sample": False}
    return GenerationConfig(max_new_tokens=max_new, eos_token_id=stop_ids, pad_token_id=pad, **sampling)


def adapter_base_model(peft_path: Path) -> str | None:
    config_file = peft_path / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"--peft_path {peft_path} is not a LoRA adapter directory: it has no adapter_config.json",
                        hint="pass the --output_dir of `glmtune train` (or one of its checkpoint-* directories)")
    return read_json_object(config_file, "adapter config").get("base_model_name_or_path")


def check_adapter_tokenizer(peft_path: Path, tokenizer: Any, model_name: str) -> None:
    """Refuse an adapter trained with another tokenizer: its ids would mean other tokens."""
    manifest_file = peft_path / MANIFEST
    if not manifest_file.is_file():  # a checkpoint-* directory or a foreign adapter: nothing to compare
        return
    manifest = read_json_object(manifest_file, "manifest")
    expected = manifest.get("tokenizer_fingerprint")
    if expected and expected != tokenizer_fingerprint(tokenizer):
        raise UserError(f"the adapter {peft_path} was trained on '{manifest.get('base_model')}', whose tokenizer "
                        f"differs from that of '{model_name}'",
                        hint=f"pass --model {manifest.get('base_model')}, or leave --model out")
