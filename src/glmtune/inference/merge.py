"""Fold a LoRA adapter into its base model's weights (peft's `merge_and_unload`), save a plain transformers
directory, and prove it: the saved model, reloaded with AutoModelForCausalLM, must give the logits of base +
adapter (unmerged, same dtype) on a few chat-templated probe prompts, within a tolerance that fits the dtype.

The gap this fills: `merge_and_unload` gives no evidence that the merged model behaves like base + adapter, and
the usual ways a merge goes wrong (an adapter on a module the merge skips, a lossy dtype, a wrong base) show only
in the outputs. A failed proof leaves no output directory.

The LoRA variants merge the same way: DoRA's magnitudes and rsLoRA's scale go through merge_and_unload, and a PiSSA
or OLoRA run saves its adapter already converted to a plain LoRA on the original base (train/skeleton.py,
keep_initial_adapter). A full or freeze run saved a whole model: merge says so and writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.arguments import MERGE_DTYPES
from glmtune.artifacts import MANIFEST, atomic_directory, check_writable_output, read_json_object, write_manifest
from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import encode_prompt
from glmtune.disk import tensor_bytes
from glmtune.errors import UserError
from glmtune.inference.engine import adapter_base_model, check_adapter_tokenizer
from glmtune.logs import progress_bars_enabled
from glmtune.models.hub import canonical_model_name, resolve_model
from glmtune.models.loading import load_model, load_tokenizer, local_config, stop_token_ids, tokenizer_fingerprint

PROBES = ["Hello! Who are you?", "什么是股票？请简要回答。", "Explain compound interest in one sentence."]
DATASET_PROBES = 4  # rows of the adapter's training data (prompt and answer: where the adapter acts most)
PROBE_MAX_TOKENS = 256

# The proof's tolerance, as a fraction of the largest |logit| of base + adapter on the probes (whatever the model's
# logit scale). Merging reorders floating-point operations (W x + s B(A x) against (W + s B A) x) and, below fp32,
# rounds W + s B A to the saved precision: noise that compounds over the layers. Measured on random tiny GLMs with
# all-linear LoRA, up to 32 layers: at most 7.7e-6 in fp32, 1.3e-2 in fp16, 1.1e-1 in bf16 (docs/benchmarks.md).
# So fp32 keeps >10x headroom and catches one unmerged module; the 16-bit tolerances are coarse and catch a wrong
# base model or a broken merge only.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 1.5e-1}

logger = logging.getLogger(__name__)


@dataclass
class MergeReport:
    output_dir: Path
    dtype: str  # "float32", "bfloat16" or "float16"
    architecture: str
    probes: int
    max_abs_diff: float  # merged (reloaded) against base + adapter
    tolerance: float
    adapter_effect: float  # base + adapter against the base alone: what the proof can detect
    needs_glmtune: bool  # glmtune's own architecture: AutoModelForCausalLM needs `import glmtune.models`


def merge_adapter(peft_path: Path, output_dir: Path, model: str | None = None, dtype: str = "auto",
                  tolerance: float | None = None, overwrite: bool = False, trust_remote_code: bool = False,
                  config: dict[str, Any] | None = None) -> MergeReport:
    """Fold the adapter into its base model and write the result to output_dir once its logits are proven.

    Args:
        peft_path: the LoRA adapter directory.
        output_dir: where the merged model goes (staged beside it, moved into place after the proof).
        model: the base model; None for the one adapter_config.json names.
        dtype: "auto" (the base checkpoint's), "fp32", "bf16" or "fp16": the merge's and the saved weights'.
        tolerance: the largest allowed logit difference; None for RELATIVE_TOLERANCE of the dtype times the
            logits' scale.
        overwrite: replace an existing output_dir.
        trust_remote_code: load the base with its own code instead of glmtune's loaders.
        config: the command's resolved options, recorded in the output's manifest.
    Returns:
        The output directory, dtype, architecture and the proof's figures.
    Raises:
        UserError: not an adapter directory, no base model named, an output_dir that may not be written, a base
            or tokenizer that doesn't match the adapter, an adapter that isn't LoRA, merged weights that are not
            finite, or logits that differ by more than the tolerance (nothing is written then).
    """
    import torch
    from peft import PeftModel

    from glmtune.models.prefix import refuse_prefix_merge

    refuse_prefix_merge(peft_path)
    refuse_whole_model(peft_path)
    base = model or adapter_base_model(peft_path)
    if not base:
        raise UserError(f"the adapter {peft_path} does not name its base model", hint="pass --model BASE_MODEL")
    base = canonical_model_name(base)
    inputs = (peft_path, *([Path(base)] if Path(base).exists() else []))
    check_writable_output(output_dir, overwrite, "directory", inputs)  # before minutes of loading
    tokenizer = load_tokenizer(base, trust_remote_code)
    check_adapter_tokenizer(peft_path, tokenizer, base)
    torch_dtype = getattr(torch, resolve_dtype(base, dtype))

    peft_model = PeftModel.from_pretrained(load_model(base, trust_remote_code, torch_dtype), str(peft_path)).eval()
    vocab = peft_model.get_input_embeddings().weight.shape[0]
    probes = probe_ids(tokenizer, peft_path, vocab)
    reference = [_logits(peft_model, ids) for ids in _progress(probes, "Probing base + adapter")]
    with peft_model.disable_adapter():
        effect = max(_max_diff(_logits(peft_model, ids), ref) for ids, ref in zip(probes, reference, strict=True))
    scale = max(ref.abs().max().item() for ref in reference)
    if tolerance is None:
        tolerance = RELATIVE_TOLERANCE[resolve_dtype(base, dtype)] * max(scale, 1.0)
    if not hasattr(peft_model.base_model, "merge_and_unload"):
        raise UserError(f"the adapter {peft_path} is a {peft_model.peft_config['default'].peft_type} adapter, "
                        "which cannot be folded into the weights", hint="merge works on LoRA adapters")
    try:
        merged = peft_model.merge_and_unload(progressbar=progress_bars_enabled(), safe_merge=True)
    except ValueError as e:  # safe_merge: the merged weights hold NaN or inf
        raise UserError(f"merging {peft_path} into {base} gives broken weights: {e}") from None
    stops = _set_generation_config(merged, base, tokenizer, vocab)
    architecture, needs_glmtune = type(merged).__name__, type(merged).__module__.startswith("glmtune.")

    with atomic_directory(output_dir, overwrite, inputs, "the merged model",
                          tensor_bytes(merged.parameters())) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, peft_model  # the proof reloads what was written, as a user would
        reloaded = _load_plain(tmp, torch_dtype, trust_remote_code)
        diff = max(_max_diff(_logits(reloaded, ids), ref)
                   for ids, ref in zip(_progress(probes, "Proving the merged model"), reference, strict=True))
        print(f"merge proof: largest |logit difference| merged vs base + adapter = {diff:.3g} over {len(probes)} "
              f"probes (tolerance {tolerance:.3g} in {torch_dtype}; logits up to {scale:.3g}; the adapter "
              f"itself moves them by up to {effect:.3g})")
        if torch_dtype != torch.float32:
            logger.info(f"note: in {torch_dtype} the proof is coarse (rounding noise grows with depth): it catches "
                        "a wrong base or a broken merge, not one unmerged module; --dtype fp32 gives a strict one")
        if not diff <= tolerance:  # also catches NaN
            raise UserError(f"the merged model's logits differ from base + adapter by {diff:.3g}, more than the "
                            f"tolerance {tolerance:.3g}: nothing was written to {output_dir}",
                            hint="merge in a wider dtype (--dtype fp32), or check that the adapter was made for "
                                 "this base model; --tolerance sets another bound")
        write_manifest(tmp, "merge", config or {}, base_model=base, peft_path=str(peft_path),
                       tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), stop_ids=stops,
                       architecture=architecture, dtype=str(torch_dtype).removeprefix("torch."),
                       proof={"probes": len(probes), "max_abs_diff": diff, "tolerance": tolerance,
                              "logit_scale": scale, "adapter_effect": effect})
    if effect <= tolerance:
        logger.warning(f"the adapter changes the logits by at most {effect:.3g}, within the tolerance: the proof "
                       "cannot tell a merged adapter from a missing one (an untrained adapter, or a dtype too coarse)")
    return MergeReport(output_dir, str(torch_dtype).removeprefix("torch."), architecture, len(probes), diff,
                       tolerance, effect, needs_glmtune)


def refuse_whole_model(path: Path) -> None:
    """A full or freeze run (--finetuning_type) saved a whole model, not an adapter: there is nothing to fold in.

    Raises:
        UserError: `path` holds a model's weights and no adapter.
    """
    if (path / "adapter_config.json").is_file() or not (path / "config.json").is_file():
        return
    manifest = read_json_object(path / MANIFEST, "manifest") if (path / MANIFEST).is_file() else {}
    kind = manifest.get("finetuning_type")
    what = f"a --finetuning_type {kind} run" if kind in ("full", "freeze") else "a whole model"
    raise UserError(f"{path} is {what}: it holds the model's own weights, not an adapter, so no merge is needed",
                    hint=f"use it as it is: glmtune infer --model {path} (or chat, eval, serve)")


def resolve_dtype(base: str, dtype: str) -> str:
    """torch's name of the dtype to merge and save in; "auto" keeps the base checkpoint's (THUDM ships fp16 and
    bf16: fp32 would double the size), fp32 where the checkpoint doesn't say."""
    if dtype != "auto":
        return MERGE_DTYPES[dtype]
    config = local_config(resolve_model(base)) or {}
    # transformers 5 writes `dtype`; older checkpoints (THUDM's included) `torch_dtype`.
    name = config.get("dtype") or config.get("torch_dtype")
    return name if name in {"bfloat16", "float16"} else "float32"


def probe_ids(tokenizer: Any, peft_path: Path, vocab: int) -> list[list[int]]:
    """The prompts the proof runs: PROBES through the chat template (as inference asks them), then the first
    rows of the adapter's training data when its dataset directory is still there."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    conversations = [Conversation(messages=[Message("user", p)]) if chat else Conversation(text=p) for p in PROBES]
    probes = [encode_prompt(tokenizer, c)[:PROBE_MAX_TOKENS] for c in conversations]
    probes += _dataset_rows(peft_path)
    # A real tokenizer beside a smaller test model has ids the model can't embed.
    probes = [p for p in probes if p and max(p) < vocab]
    if not probes:
        raise UserError(f"no probe prompt fits the model's {vocab}-token vocabulary, so the merge can't be checked")
    return probes


def _dataset_rows(peft_path: Path) -> list[list[int]]:
    manifest_file = peft_path / MANIFEST
    dataset = read_json_object(manifest_file, "manifest").get("dataset") if manifest_file.is_file() else None
    if not dataset or not (Path(dataset) / "train").is_dir():
        return []
    from datasets import load_from_disk

    rows = load_from_disk(str(Path(dataset) / "train"))
    rows = rows.select(range(min(DATASET_PROBES, len(rows))))
    if "input_ids" not in rows.column_names:  # preference pairs (a `glmtune dpo` adapter): the chosen sequences
        return [(row["prompt_ids"] + row["chosen_ids"])[:PROBE_MAX_TOKENS] for row in rows]
    return [list(ids[:PROBE_MAX_TOKENS]) for ids in rows["input_ids"]]


def _set_generation_config(model: Any, base: str, tokenizer: Any, vocab: int) -> list[int]:
    """Make the saved generation config stop on the family's end-of-turn tokens (as `glmtune convert` does), so
    that any tool generating from the merged directory stops where glmtune's engine does."""
    stops = [i for i in stop_token_ids(base, tokenizer) if i < vocab]
    model.generation_config.eos_token_id = stops
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = stops
    return stops


def _load_plain(directory: Path, dtype: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code).eval()


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()  # (tokens, vocab)


def _max_diff(a: Any, b: Any) -> float:
    return (a - b).abs().max().item()


def _progress(items: list[Any], description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="probe", disable=not progress_bars_enabled())
