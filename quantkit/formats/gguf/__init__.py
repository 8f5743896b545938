"""GGUF output for llama.cpp, grouped from the plan:

* :mod:`.tensors`: the plan's weights under their GGUF names, experts stacked;
* :mod:`.hparams`: the hyperparameters, from the ``GgufExport`` each ArchSpec declares;
* :mod:`.tokenizer`: SentencePiece or BPE vocabularies;
* :mod:`.layout`: one run's file: loading in GGUF layout, storing, writing;
* :mod:`.writer`: the checked, staged GGUF writer;
* :mod:`.file_format`: ``--format gguf`` (registered on import).
"""

from quantkit.formats.gguf.file_format import GgufFormat
from quantkit.formats.gguf.layout import GgufLayout

__all__ = ["GgufFormat", "GgufLayout"]
