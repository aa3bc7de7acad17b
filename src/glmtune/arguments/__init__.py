"""Argument dataclasses, one per concern, each option declared once; a command composes the ones it takes.
Training reuses transformers' TrainingArguments (or TRL's config) for the rest.

Every field has a default and a help text; allowed values are its `Literal` type, checked by `Options`; what
else argparse can't check lives in `__post_init__`.
"""

from glmtune.arguments.data import (
    DataFilesArguments,
    DataFormat,
    DataFormatArguments,
    DatasetArguments,
    PrepareArguments,
    SequenceLengthArguments,
    TokenizeArguments,
    TrainingDataArguments,
    Truncation,
)
from glmtune.arguments.generation import GenerationArguments, SamplingArguments, ThinkingArguments
from glmtune.arguments.inference import (
    API_KEY_ENV,
    MERGE_DTYPES,
    ChatArguments,
    EvalArguments,
    InferenceArguments,
    MergeArguments,
    PromptArguments,
    ServeArguments,
)
from glmtune.arguments.model import (
    PRECISIONS,
    SEED_MODEL,
    AdapterArguments,
    ModelArguments,
    ModelNameArguments,
    Precision,
    PrecisionArguments,
)
from glmtune.arguments.options import Options, option
from glmtune.arguments.output import OutputDirArguments, OverwriteArguments
from glmtune.arguments.run import BatchArguments, SeedArguments
from glmtune.arguments.training import (
    DPO_REFERENCES,
    EVAL_METRICS,
    ComputeArguments,
    DpoArguments,
    EvalMetric,
    GenerationEvalArguments,
    HealthArguments,
    LoraArguments,
)

__all__ = [
    "API_KEY_ENV", "DPO_REFERENCES", "EVAL_METRICS", "MERGE_DTYPES", "PRECISIONS", "SEED_MODEL", "AdapterArguments",
    "BatchArguments", "ChatArguments", "ComputeArguments", "DataFilesArguments", "DataFormat", "DataFormatArguments",
    "DatasetArguments", "DpoArguments", "EvalArguments", "EvalMetric", "GenerationArguments",
    "GenerationEvalArguments", "HealthArguments", "InferenceArguments", "LoraArguments", "MergeArguments",
    "ModelArguments", "ModelNameArguments", "Options", "OutputDirArguments", "OverwriteArguments", "Precision",
    "PrecisionArguments", "PrepareArguments", "PromptArguments", "SamplingArguments", "SeedArguments",
    "SequenceLengthArguments", "ServeArguments", "ThinkingArguments", "TokenizeArguments", "TrainingDataArguments",
    "Truncation", "option",
]
