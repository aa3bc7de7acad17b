"""Continuous batching: many answers generated together, one decoding step for all of them at a time, with
sequences joining and leaving between steps. `serve` drives it (serve/batching.py).

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`, as `transformers serve`
uses): in 5.24 it needs paged attention through the attention-function registry (glmtune's ChatGLM-6B class has its
own attention and 2-D positions), takes one `do_sample` and one seed for the whole manager (a request's own seed
cannot repeat its answer), and has no stop strings. What it is built for (paged KV blocks, CUDA graphs) buys
nothing on CPU.

The form here is the simplest that is correct for any transformers-native decoder with a DynamicCache: one
left-padded batch KV cache. The prompts that join between two steps are prefilled together, as one left-padded
batch (`add_many`; one forward pass instead of one per prompt, which is most of the gain when many requests arrive
at once), then their cache is left-padded to the batch's length (or the batch's to its) and concatenated along the
batch; a leaving sequence's row is dropped, and columns that became padding in every row are trimmed, so the cache
never exceeds rows x the longest prompt + answer. Every forward pass gives each row explicit positions (the count of
real tokens before each token, as `generate` derives them from a left-padded mask) and the mask of its real tokens,
so a row computes what it would alone; only the last position's logits are computed (`logits_to_keep=1`, as
`generate` asks).

Each forward pass names every row's adapter (peft's `adapter_names`, as `generate` gets them), so that requests for
different adapters of one base share the batch; a sequence that asks for log-probabilities records each token's from
its row of the raw logits (inference/logprobs.py), before its own temperature and top-p.

Each sequence samples from its own logits with its own `torch.Generator`: a seeded request draws the same tokens
whatever else is in the batch (up to float rounding of a batched matmul, which can flip a near-tie in greedy or
sampled choices alike: the same caveat as `infer`'s batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glmtune.inference.logprobs import TokenLogprob, token_logprob


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random draw


@dataclass(eq=False)
class Sequence:
    """One answer being generated: `new_ids` grows by one token per step until `finished` says why it ended."""

    prompt: list[int]
    budget: int  # new tokens allowed
    sampling: Sampling
    new_ids: list[int] = field(default_factory=list)
    finished: str | None = None  # "stop" (a stop token) or "length" (the budget ran out)
    generator: Any = None
    adapter: str | None = None  # the peft adapter that answers (GenerationSettings.adapter); None: the model as loaded
    logprobs: int | None = None  # record each token's log-probability and this many most likely tokens'; None: none
    entries: list[TokenLogprob] = field(default_factory=list)  # one per new token, when `logprobs` is set

    @property
    def footprint(self) -> int:
        """Cache positions this sequence may come to hold: its prompt and its whole budget."""
        return len(self.prompt) + self.budget


def supports_batched_steps(model: Any) -> bool:
    """True for a transformers-native model (a peft wrapper around one included) whose cache is one plain
    DynamicLayer per layer; False for remote code, ChatGLM-6B's 2-D positions and sliding-window or indexed caches,
    whose rows cannot be padded and concatenated the same way; False under a P-Tuning v2 prefix, which the step loop's
    cache does not start from."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from glmtune.models.prefix import is_prefix_model

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if is_prefix_model(model) or not type(base).__module__.startswith("transformers.models."):
        return False
    try:
        cache = DynamicCache(config=base.config)
    except Exception:  # a config the cache cannot read: not a case to guess about
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass
class Joining:
    """A prompt about to join the batch (BatchGenerator.add_many): what `add` takes, as one value."""

    prompt: list[int]
    budget: int
    sampling: Sampling
    adapter: str | None = None
    logprobs: int | None = None


class BatchGenerator:
    """The running batch. `add_many` prefills prompts together and draws their first tokens (`add`: one prompt);
    `step` draws one more token for every unfinished sequence; `remove` takes one out. Not thread-safe: one thread
    drives it."""

    def __init__(self, model: Any, stop_ids: list[int]):
        import inspect

        self.model, self.stop_ids = model, set(stop_ids)
        self.sequences: list[Sequence] = []  # the cache's rows, in order
        self._cache: Any = None
        self._mask: Any = None  # (rows, cache length): 1 = a real token
        self._device = next(model.parameters()).device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # The last position's logits only: a prompt's other positions' would be computed and thrown away.
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}

    @property
    def cache_tokens(self) -> int:
        """Positions the cache holds now, padding included (rows x length)."""
        return 0 if self._mask is None else int(self._mask.numel())

    def add(self, prompt: list[int], budget: int, sampling: Sampling, adapter: str | None = None,
            logprobs: int | None = None) -> Sequence:
        """Prefill `prompt` and draw its first token; the sequence joins the batch unless that token ended it.
        `adapter`: the peft adapter that answers it in every forward pass (its row's entry in `adapter_names`);
        `logprobs`: record its tokens' log-probabilities (Sequence.entries) with this many most likely tokens'."""
        return self.add_many([Joining(prompt, budget, sampling, adapter, logprobs)])[0]

    def add_many(self, joining: list[Joining]) -> list[Sequence]:
        """Prefill the prompts together in one left-padded forward pass and draw each one's first token; those
        that token did not end join the batch. Returns their sequences, in order."""
        import torch

        if not joining:
            return []
        if not all(j.prompt for j in joining):
            raise ValueError("a prompt of no tokens has nothing to continue")
        sequences = [Sequence(j.prompt, j.budget, j.sampling, generator=_generator(j.sampling.seed),
                              adapter=j.adapter, logprobs=j.logprobs) for j in joining]
        width = max(len(j.prompt) for j in joining)
        ids = torch.tensor([[0] * (width - len(j.prompt)) + j.prompt for j in joining], dtype=torch.long,
                           device=self._device)  # (prompts, width), left-padded (the pad id is masked out)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in joining],
                            dtype=torch.long, device=self._device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # a real token's: the real tokens before it
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **self._keep, **_adapter_kwargs(sequences))
        self._take_all(sequences, out.logits[:, -1])
        self._join([i for i, s in enumerate(sequences) if s.finished is None], sequences, out.cache, mask)
        return sequences

    def step(self) -> list[Sequence]:
        """One token for every sequence in the batch; returns them (finished ones leave the batch)."""
        import torch

        if not self.sequences:
            return []
        rows = self.sequences
        last = torch.tensor([[s.new_ids[-1]] for s in rows], dtype=torch.long, device=self._device)  # (rows, 1)
        positions = self._mask.sum(dim=1, keepdim=True)  # (rows, 1): real tokens before the one fed
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)  # (rows, length + 1)
        with torch.no_grad():
            out = self.model(input_ids=last, attention_mask=self._mask, position_ids=positions,
                             cache=self._cache, use_cache=True, **self._keep, **_adapter_kwargs(rows))
        self._cache = out.cache
        self._take_all(rows, out.logits[:, -1])
        finished = [s for s in rows if s.finished]
        if finished:
            self._keep_rows([i for i, s in enumerate(rows) if not s.finished])
        return rows

    def remove(self, sequence: Sequence) -> None:
        """Take a sequence out of the batch (finished, stopped by a stop string, or its client left)."""
        if sequence in self.sequences:
            self._keep_rows([i for i, s in enumerate(self.sequences) if s is not sequence])

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only these rows of the batch (and none of the columns that are then padding in every row)."""
        self.sequences = [self.sequences[i] for i in keep]
        if keep:
            self._mask = _select_rows(self._cache, self._mask, keep, self._device)
        else:
            self._cache = self._mask = None

    def _join(self, keep: list[int], sequences: list[Sequence], cache: Any, mask: Any) -> None:
        """The prefilled rows `keep` of (`sequences`, `cache`, `mask`) join the batch's."""
        import torch
        from torch.nn.functional import pad

        if not keep:
            return
        if len(keep) < len(sequences):  # the rows that left may have been the longest: their columns go too
            mask = _select_rows(cache, mask, keep, self._device)
        if not self.sequences:
            self.sequences, self._cache, self._mask = [sequences[i] for i in keep], cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def left(t: Any, dim_from_end: int) -> Any:  # pad dimension -dim_from_end on the left up to `width`
            missing = width - t.shape[-dim_from_end]
            return pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else t

        self._mask = torch.cat([left(self._mask, 1), left(mask, 1)], dim=0)
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([left(mine.keys, 2), left(theirs.keys, 2)], dim=0)
            mine.values = torch.cat([left(mine.values, 2), left(theirs.values, 2)], dim=0)
        self.sequences.extend(sequences[i] for i in keep)

    def _take_all(self, sequences: list[Sequence], logits: Any) -> None:
        """Each sequence's next token from its row of `logits` (rows, vocab); the greedy rows' in one argmax."""
        greedy = logits.float().argmax(dim=-1).tolist()
        for row, sequence in enumerate(sequences):
            token = greedy[row] if sequence.sampling.temperature <= 0 else \
                next_token(logits[row], sequence.sampling, sequence.generator)
            self._note(sequence, token, logits[row])

    def _note(self, sequence: Sequence, token: int, logits: Any) -> None:
        """The sequence's new token, drawn from `logits` (vocab,), and whether it ends the sequence."""
        sequence.new_ids.append(token)
        if sequence.logprobs is not None:
            sequence.entries.append(token_logprob(logits, token, sequence.logprobs))  # the raw logits, as generate's
        if token in self.stop_ids:
            sequence.finished = "stop"
        elif len(sequence.new_ids) >= sequence.budget:
            sequence.finished = "length"


def _select_rows(cache: Any, mask: Any, keep: list[int], device: Any) -> Any:
    """Keep rows `keep` of `cache` (in place) and of `mask`, less the columns that are then padding in every row;
    returns the new mask."""
    import torch

    index = torch.tensor(keep, dtype=torch.long, device=device)
    mask = mask[index]
    start = int(mask.sum(dim=0).nonzero()[0])  # columns before it are padding in every row
    for layer in cache.layers:
        layer.keys = layer.keys[index, :, start:]  # (rows, heads, length, head_dim)
        layer.values = layer.values[index, :, start:]
    return mask[:, start:]


def _generator(seed: int | None) -> Any:
    """A sequence's own CPU generator: seeded, or a fresh random draw."""
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**64)
    return generator


def _adapter_kwargs(rows: list[Sequence]) -> dict[str, Any]:
    """The forward's keywords that pick each row's adapter (peft's adapter_names, one per row), as generate gets."""
    from glmtune.inference.engine import generation_kwargs_for  # the engine imports this module

    return generation_kwargs_for([s.adapter for s in rows])


def next_token(logits: Any, sampling: Sampling, generator: Any) -> int:
    """Greedy, or a draw after transformers' own temperature and top-p warpers (as `generate` applies them)."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = logits.float().unsqueeze(0)  # (1, vocab)
    if sampling.temperature <= 0:
        return int(scores.argmax(dim=-1))
    scores = TemperatureLogitsWarper(sampling.temperature)(None, scores)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1).cpu()  # the generator is a CPU one
    return int(torch.multinomial(probs, 1, generator=generator))
