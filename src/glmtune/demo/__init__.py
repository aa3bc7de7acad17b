"""The bundled demo data: short finance question/answer pairs in Chinese and English, written for glmtune."""

from importlib.resources import files
from pathlib import Path


def demo_data_path() -> Path:
    return Path(str(files(__name__) / "finance_qa.json"))
