"""Building blocks of span-based extraction models: word encoding, spans, pruning, pairs."""
