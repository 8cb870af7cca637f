"""Text restricted to a cut vocabulary, for the GPU artifact scripts (gpu_artifacts*.sh)."""


def in_vocab(tok, text, vocab):
    """(text, ids) with every token id < vocab: drops the character spans of out-of-vocabulary tokens
    and re-encodes, up to 8 times; then keeps only the ids below vocab."""
    for _ in range(8):
        enc = tok.encode(text, add_special_tokens=False)
        bad = [(a, b) for i, (a, b) in zip(enc.ids, enc.offsets) if i >= vocab]
        if not bad:
            return text, enc.ids
        keep, last = [], 0
        for a, b in bad:
            keep.append(text[last:a])
            last = b
        keep.append(text[last:])
        text = "".join(keep)
    enc = tok.encode(text, add_special_tokens=False)
    return text, [i for i in enc.ids if i < vocab]
