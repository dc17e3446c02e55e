"""Training: the reference loop (loop), resumable checkpoints, and the fast path that computes the
frozen blocks once (fast, prefix, prefix_cache, tail; release, memory, onednn; graphs on a GPU)."""
