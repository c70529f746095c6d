"""Data sets for fine-tuning, as batched `tf.data` pipelines, one module per
source.

Every loader checks the data before training starts (labels in range, at
least two classes, no empty folder, unreadable files skipped and counted):

- `arrays`: `from_numpy`, `load_npz`, `DataBundle`;
- `images`: `from_image_folder`; `tfds`: `from_tfds`;
- `builtin`: data that installs offline (Fashion-MNIST, the embedded
  hold-out set); `text`: fortunes, WordNet glosses, CSV / JSON lines;
- `audio`, `speech`: WAV folders, speech synthesised with espeak-ng;
- `sft`, `chat`: supervised fine-tuning batches for causal LMs and chat
  templates; `preference`: chosen / rejected pairs.

Add a data source here. Imports: `kft.backbones`, `kft.losses`, `kft.utils`.
"""

from kft._lazy import attach

_EXPORTS = {
    "BUILTIN_DATASETS": "kft.data.builtin",
    "check_labels": "kft.data.arrays",
    "DataBundle": "kft.data.arrays",
    "FASHION_MNIST_CLASSES": "kft.data.builtin",
    "from_audio_folder": "kft.data.audio",
    "from_image_folder": "kft.data.images",
    "from_numpy": "kft.data.arrays",
    "from_texts": "kft.data.text",
    "from_tfds": "kft.data.tfds",
    "load_builtin": "kft.data.builtin",
    "load_fashion_mnist": "kft.data.builtin",
    "load_fortunes": "kft.data.text",
    "load_npz": "kft.data.arrays",
    "load_text_file": "kft.data.text",
    "load_wordnet_glosses": "kft.data.text",
    "preference_dataset": "kft.data.preference",
    "scan_image_folder": "kft.data.images",
    "sft_dataset": "kft.data.sft",
    "subset_per_class": "kft.data.arrays",
    "without_files": "kft.data.images",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
