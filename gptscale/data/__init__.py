"""Data: tokenizer, embedded corpus, shard writer and the streaming loader (never imports model)."""
