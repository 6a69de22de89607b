"""Transfer: task weights of OLD carried onto an unrelated NEW model of any shape (docs/methods.md,
section 8; in the spirit of LoRASuite and Cross-LoRA, for every PEFT kind and full fine-tunes).

NEW shares no growth maps with OLD, so its spaces are mapped from what both can be measured on: the
same token strings (`pairs`), blocks matched by CKA and linear maps fitted between paired activations
(`measure`, `fit`, `alignment`); then a PEFT module (`module`) or a full fine-tune's delta (`full`) is
carried through those maps.

    alignment = measure(old, new, old_tokenizer, new_tokenizer, texts)
    module, report = transfer_module(module, alignment, new.config)
    model, report = transfer_full(tuned, old, new, alignment)
"""

from bequest.transfer.alignment import Alignment
from bequest.transfer.full import transfer_full
from bequest.transfer.measure import measure
from bequest.transfer.module import transfer_module

__all__ = ["Alignment", "measure", "transfer_full", "transfer_module"]
