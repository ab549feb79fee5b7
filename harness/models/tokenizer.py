"""A byte-level BPE tokenizer trained on the embedded task world's texts (no hub download, fully deterministic).

The NeMo chat tokens (<extra_id_0/1/2>) are special tokens, so a prompt rendered with them tokenizes to one id per
turn marker and an end string like "<extra_id_1>" is produced (and detected) as a single token.
"""

from __future__ import annotations

from pathlib import Path

import harness.determinism  # noqa: F401 - sets TOKENIZERS_PARALLELISM before tokenizers is imported
from harness.io import atomic_path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TOKENS = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *CHAT_TOKENS)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path | None = None):
    """Train a byte-level BPE on `texts`; same texts and vocab_size -> byte-identical tokenizer.json.

    Returns a transformers.PreTrainedTokenizerFast with bos/eos/pad set. With `out_dir`, also saved there
    (atomically) as an ordinary Hugging Face tokenizer directory loadable by AutoTokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials must fit
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a response decoded on its own must not gain a leading space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..5, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(CHAT_TOKENS),
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x
    )
    if out_dir is not None:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            hf.save_pretrained(tmp)
    return hf
