"""The board's labels in English and Chinese. Components register the key of their label as they are made; the
language switch then relabels every one of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LANGUAGES = ("en", "zh")

LABELS: dict[str, tuple[str, str]] = {
    "title": ("## glmtune board", "## glmtune 控制台"),
    "language": ("Language", "语言"),
    "tab_data": ("Data", "数据"),
    "tab_train": ("Train", "训练"),
    "tab_chat": ("Chat", "对话"),
    "tab_plan": ("Plan", "显存规划"),
    "tab_export": ("Evaluate & export", "评估与导出"),
    "model": ("Model (directory or hub name)", "模型（目录或 Hub 名称）"),
    "data_file": ("Data file (path on this machine)", "数据文件（本机路径）"),
    "upload": ("Or upload a data file", "或上传数据文件"),
    "max_seq_length": ("Max sequence length", "最大序列长度"),
    "truncation": ("Truncation", "截断方式"),
    "report_button": ("Show the dataset report", "生成数据报告"),
    "report": ("Report (glmtune prepare --dry_run)", "报告（glmtune prepare --dry_run）"),
    "histogram": ("Sample lengths (tokens)", "样本长度（token）"),
    "samples": ("First samples: trained spans highlighted", "前几条样本：高亮部分参与训练"),
    "bad_rows": ("Bad rows", "错误行"),
    "command": ("Command", "命令"),
    "method": ("Method", "方法"),
    "runs_folder": ("Runs folder", "运行目录"),
    "run_name": ("Run name (its output folder)", "运行名称（输出目录）"),
    "max_steps": ("Max steps (-1: by epochs)", "最大步数（-1：按轮数）"),
    "epochs": ("Epochs", "训练轮数"),
    "batch_size": ("Batch size", "批大小"),
    "learning_rate": ("Learning rate", "学习率"),
    "lora_rank": ("LoRA rank", "LoRA 秩"),
    "lora_alpha": ("LoRA alpha", "LoRA alpha"),
    "logging_steps": ("Log every N steps", "每 N 步记录"),
    "save_steps": ("Checkpoint every N steps", "每 N 步保存检查点"),
    "val_size": ("Validation share", "验证集比例"),
    "start": ("Start", "开始训练"),
    "stop": ("Stop (save a checkpoint)", "停止（保存检查点）"),
    "resume": ("Resume", "继续训练"),
    "runs": ("Runs", "运行列表"),
    "refresh": ("Refresh", "刷新"),
    "status": ("Status", "状态"),
    "progress": ("Progress", "进度"),
    "loss_curve": ("Loss (train and eval)", "损失（训练与验证）"),
    "log": ("Log", "日志"),
    "adapter": ("Adapter (a run or checkpoint folder)", "适配器（运行或检查点目录）"),
    "system": ("System prompt", "系统提示词"),
    "temperature": ("Temperature (0: greedy)", "温度（0：贪心）"),
    "top_p": ("Top p", "Top p"),
    "max_new_tokens": ("Max new tokens", "最大生成长度"),
    "compare_base": ("Also answer with the base model", "同时显示基础模型的回答"),
    "message": ("Message", "消息"),
    "send": ("Send", "发送"),
    "clear": ("Clear", "清空"),
    "tuned": ("Tuned", "微调后"),
    "base": ("Base", "基础模型"),
    "plan_button": ("Estimate the memory", "估算显存"),
    "memory": ("Where the memory goes (GiB)", "显存去向（GiB）"),
    "device_memory": ("Device memory in GiB (0: this machine's)", "设备显存 GiB（0：本机）"),
    "plan_text": ("Estimate", "估算结果"),
    "eval_button": ("Evaluate", "评估"),
    "eval_data": ("Evaluation data file", "评估数据文件"),
    "metrics": ("Metrics", "指标"),
    "merge_button": ("Merge the adapter", "合并适配器"),
    "convert_button": ("Convert", "转换"),
    "convert_source": ("THUDM checkpoint to convert", "待转换的 THUDM 模型"),
    "export_dir": ("Output folder", "输出目录"),
    "output": ("Output", "输出"),
}


def text(key: str, lang: str) -> str:
    en, zh = LABELS[key]
    return zh if lang == "zh" else en


class Labeller:
    """Makes labelled components and remembers them, so that `relabel` can switch every one to another language."""

    def __init__(self, lang: str):
        self.lang = lang
        self.entries: list[tuple[Any, str, str]] = []  # (component, key, attribute: "label" or "value")

    def __call__(self, key: str) -> str:
        return text(key, self.lang)

    def add(self, make: Callable[..., Any], key: str, attribute: str = "label", **kwargs: Any) -> Any:
        component = make(**{attribute: text(key, self.lang)}, **kwargs)
        self.entries.append((component, key, attribute))
        return component

    def components(self) -> list[Any]:
        return [component for component, _, _ in self.entries]

    def relabel(self, lang: str) -> list[dict[str, Any]]:
        """One update per registered component, in `components()` order."""
        import gradio as gr

        return [gr.update(**{attribute: text(key, lang)}) for _, key, attribute in self.entries]
