"""Background work of every engine process: webhook delivery, post-call analysis, crash recovery, the CallLog spill's
replay, recordings."""
