"""A byte-level tokenizer: every UTF-8 byte is a token.

Real LLMs use BPE vocabularies of 32k-256k tokens. A byte tokenizer needs no
training and no download, handles any language (one Chinese character is three
bytes, so three tokens), and keeps the vocabulary tiny: 256 byte ids plus a few
special ids. The vocabulary is padded to a multiple of 8 so tensor parallelism over
2, 4 or 8 ranks can split the embedding and the LM head into equal slices.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .validate import bad, check_choice, check_str, check_token_ids

PADDING_SIDES = ("left", "right")


class ByteTokenizer:
    """UTF-8 bytes 0..255 are ids 0..255; BOS, EOS and PAD follow.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("GPU 张量"))
    'GPU 张量'
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    n_special = 3
    vocab_size = 264  # 259 ids in use, rounded up to a multiple of 8

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``: optional BOS, its UTF-8 bytes, optional EOS."""
        check_str("text", text, allow_empty=True, why=f"got a {type(text).__name__}"
                  + (": decode bytes first" if isinstance(text, bytes) else ""))
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids``; special ids are skipped and broken UTF-8 becomes U+FFFD.

        A model can stop in the middle of a multi-byte character, so decoding must
        not raise on an incomplete sequence. An id outside the vocabulary is an error:
        it comes from a bug, not from the model.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise bad("ids", f"a tensor of shape {tuple(ids.shape)}", "one sequence (1-D ids)",
                          "decode each row on its own")
            ids = check_token_ids("ids", ids, self.vocab_size, allow_empty=True).tolist()
        else:
            if isinstance(ids, Iterable) and not isinstance(ids, (str, bytes)):
                ids = list(ids)                 # a generator is read once, here
            check_token_ids("ids", ids, self.vocab_size, allow_empty=True)
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str], padding_side: str = "left", bos: bool = True,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad a list of texts to one (batch, max_len) tensor.

        Returns ``(ids, attention_mask)`` where the mask is 1 for real tokens and 0
        for padding. Left padding is what generation wants: every row's last real
        token sits in the last column, so the next token is appended in one place.
        """
        check_choice("padding_side", padding_side, PADDING_SIDES)
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise bad("texts", texts, "a non-empty list of strings",
                      "wrap a single text in a list" if isinstance(texts, str) else "")
        for i, text in enumerate(texts):
            check_str(f"texts[{i}]", text, allow_empty=True)
        rows = [self.encode(t, bos=bos) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            start = width - len(r) if padding_side == "left" else 0
            ids[i, start:start + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, start:start + len(r)] = 1
        return ids, mask
