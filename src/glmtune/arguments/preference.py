"""The options of the preference methods beyond DPO's (kto, orpo, simpo). Their losses' own options (beta, loss_type,
desirable_weight, simpo_gamma...) are TRL's config fields, taken as they are, as dpo takes DPOConfig's."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.arguments.data import TrainingDataArguments
from glmtune.arguments.model import AdapterArguments
from glmtune.arguments.training import DpoArguments

PAIRS_HELP = ("Dataset directory of preference pairs written by `glmtune prepare`, or a data file of pairs, tokenized "
              "here with the options above by the main process alone, into prepare's cache (HF_HOME/glmtune/prepare).")


@dataclass
class KtoArguments(DpoArguments):
    """`glmtune kto`'s own options: DPO's (a starting adapter, the reference model)."""

    help_overrides = {
        "dataset_path": "Dataset directory of labelled rows (prompt/completion/label) or of preference pairs "
                        "written by `glmtune prepare`, or a data file of either, tokenized here with the options above "
                        "by the main process alone, into prepare's cache (HF_HOME/glmtune/prepare). Each pair gives "
                        "KTO two rows: its chosen answer desirable, its rejected one not.",
        "peft_path": "LoRA adapter to start from and go on training (a `glmtune train` output, e.g. the SFT run); "
                     "default: a new adapter from the LoRA options.",
    }


@dataclass
class PreferenceArguments(TrainingDataArguments, AdapterArguments):
    """The options of a preference method with no reference model (orpo, simpo): the pairs and a starting adapter."""

    help_overrides = {
        "peft_path": "LoRA adapter to start from and go on training (a `glmtune train` output); default: a new adapter "
                     "from the LoRA options.",
        "dataset_path": PAIRS_HELP,
    }
