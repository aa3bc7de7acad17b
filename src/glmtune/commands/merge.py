"""glmtune merge: fold a LoRA adapter into its base model and write a plain transformers directory (safetensors,
tokenizer with chat template, generation config with the end-of-turn stop tokens), once the merged model's logits
are proven equal to base + adapter's within a tolerance that fits the dtype. A failed proof writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.arguments import MergeArguments, ModelArguments
from glmtune.config import parse_arguments, to_plain_dict
from glmtune.errors import UserError


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    model_args, args = parse_arguments("glmtune merge", [ModelArguments, MergeArguments], argv, defaults,
                                       description=__doc__)
    run(model_args, args)


def run(model_args: ModelArguments, args: MergeArguments) -> Path:
    from glmtune.inference.merge import merge_adapter

    if not args.peft_path or not args.output_dir:
        raise UserError("--peft_path and --output_dir are required",
                        hint="glmtune merge --peft_path ADAPTER_DIR --output_dir MERGED_DIR")
    if model_args.quantization_bit:
        # Folding W + s*B*A into 8-bit or 4-bit weights would round the adapter's update away (and bitsandbytes'
        # merge dequantizes and requantizes every layer): the merged model would not be base + adapter.
        raise UserError(f"--quantization_bit {model_args.quantization_bit}: merge folds the adapter into the base "
                        "model's full-precision weights; merging into a quantized base would round the update away",
                        hint="leave --quantization_bit out: an adapter trained on a quantized base merges into the "
                             "unquantized base (quantize the merged model when you load it, with --quantization_bit)")
    report = merge_adapter(Path(args.peft_path), Path(args.output_dir), model_args.model, args.dtype, args.tolerance,
                           args.overwrite_output_dir, model_args.trust_remote_code,
                           to_plain_dict(model_args, args))
    how = ("AutoModelForCausalLM and AutoTokenizer after `import glmtune.models` (glmtune's own architecture)"
           if report.needs_glmtune else "plain AutoModelForCausalLM and AutoTokenizer")
    print(f"Merged {args.peft_path} into {report.output_dir} ({report.architecture}, {report.dtype}): loads with "
          f"{how}; `glmtune chat --model {report.output_dir}` talks to it")
    return report.output_dir
