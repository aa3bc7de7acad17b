"""prepare gives the same dataset with the one-rendering path (data/single_render.py) as with the reference (each
answer located from its prompt's rendering and the whole's, templates.training_text): ids, labels, every column,
the features and the report, on 4 tokenizers x 10 data files x 4 option sets (160 configurations, up to 300 rows
each), all in one process (num_proc 1, no cache).

    .venv/bin/python bench/prepare_equivalence.py [--tokenizers glm-4-9b-chat,chatglm3-6b] [--rows 300]

About 3 minutes on the 2-core CPU machine. Prints one line per configuration (its rows through the one-rendering
path, and whether it differs) and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FILES = ("alpaca/alpaca_zh_demo.json", "alpaca/alpaca_en_demo.json", "alpaca/identity.json",
         "multiturn/v1_sft_demo.jsonl", "multiturn/glaive_toolcall_zh_demo.json", "multiturn/dummy_conversation.json",
         "advertisegen/dev_sample.jsonl", "finance_zh/disc_fin_consulting_part.json", "preference/dpo_zh_demo.json",
         "preference/dpo_en_demo.json")
TOKENIZERS = ("glm-4-9b-chat", "chatglm3-6b", "chatglm2-6b", "chatglm-6b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS))
    parser.add_argument("--rows", type=int, default=300)
    args = parser.parse_args()

    import datasets

    from glmtune.data import single_render, tokenize
    from glmtune.data.prepare import load_data, tokenize_with_cache
    from glmtune.data.tokenize import TokenizeOptions
    from glmtune.models.loading import load_tokenizer, stop_token_ids

    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    option_sets = [TokenizeOptions(1024), TokenizeOptions(128, "left"), TokenizeOptions(96, "drop"),
                   TokenizeOptions(200, "right", last_turn_only=True, train_on_prompt=True)]
    calls = {"once": 0}

    def counted(*a, **k):
        located = single_render.training_text_once(*a, **k)
        calls["once"] += located is not None
        return located

    def prepared(data, tokenizer, stops, options, once: bool):
        with mock.patch.object(tokenize, "training_text_once", counted if once else lambda *a, **k: None):
            try:
                kept, report = tokenize_with_cache(data, tokenizer, stops, options, 1, None, "equivalence")
            except Exception as e:  # (preference pairs refuse some options): both paths must refuse alike
                return {"error": repr(e)}
        return {"data": kept.to_dict(), "features": repr(kept.features), "report": dataclasses.asdict(report)}

    differ = total = 0
    for name in args.tokenizers.split(","):
        directory = str(SHARED / "tokenizers" / name)
        tokenizer = load_tokenizer(directory)
        stops = stop_token_ids(directory, tokenizer)
        for file in FILES:
            data = load_data([str(SHARED / "data" / file)], None, skip_bad_rows=True)
            data.conversations = data.conversations[: args.rows]
            for k, options in enumerate(option_sets):
                calls["once"] = 0
                same = prepared(data, tokenizer, stops, options, once=True) == \
                    prepared(data, tokenizer, stops, options, once=False)
                total, differ = total + 1, differ + (not same)
                print(f"{name} {file} options {k}: {calls['once']:4d} rows rendered once, "
                      f"{'same' if same else 'DIFFERENT'}", flush=True)
    print(f"{total} configurations, {differ} different")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
