"""The decoder (plain PyTorch) and its Hugging Face export/import."""

from tokenmill.model.hf import export_hf, import_hf
from tokenmill.model.llama import PRESETS, Llama, ModelConfig

__all__ = ["PRESETS", "Llama", "ModelConfig", "export_hf", "import_hf"]
